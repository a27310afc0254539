"""The demo: a pass key hidden in a few thousand tokens, answered with dense attention and with FlexiCache
at a budget far below the context. Prints both answers, GPU-resident vs host KV bytes, and time.

    flexicache demo [--tokens 3000] [--topk-pages 16] [--device cpu|cuda] [--sketch-bits 2] [--plots DIR]

With --plots DIR it also records the pages every KV head selects during FlexiCache's decode and writes three
pictures (flexicache_hf.viz; needs matplotlib: pip install 'flexicache-hf[viz]'): memory.png (the memory
report against dense), page_selection.png (pages selected per decode step by a few heads, the pass key's pages
marked) and head_stability.png (the head profile). Both runs then decode all --new-tokens steps (default 48
with --plots) instead of stopping at the end of the answer, so that the picture spans several reranks.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from pathlib import Path

from flexicache_hf.cli import available_device, check_knobs, load_profile, positive_int
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.config import SKETCH_BITS, SKETCH_SCORES

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PLOT_NEW_TOKENS = 48  # --new-tokens with --plots: three reranks of the stable heads at the default interval


def passkey_prompt(tokenizer, n_tokens: int, depth: float, seed: int) -> tuple[str, str]:
    """A chat prompt of about n_tokens tokens with a 5-digit pass key at `depth` (0..1); returns (prompt, key)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(key=key)
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    reps = max(1, (n_tokens - 60) // per)
    cut = int(reps * depth)
    haystack = FILLER * cut + needle + FILLER * (reps - cut)
    question = "There is a pass key hidden in the text above. What is the pass key? Answer with the number only."
    messages = [{"role": "user", "content": haystack + "\n\n" + question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt, key


def needle_pages(tokenizer, prompt: str, key: str, page_size: int) -> list[int]:
    """The cache pages (of `page_size` tokens, batch of one, no padding) holding the pass key's sentences in the
    tokenized `prompt` (tokenized as the demo does: add_special_tokens=False)."""
    text = NEEDLE.format(key=key).strip()
    start = prompt.index(text)
    end = start + len(text)
    try:
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # a slow tokenizer has no offsets: count tokens instead
        first = len(tokenizer(prompt[:start], add_special_tokens=False).input_ids)
        last = len(tokenizer(prompt[:end], add_special_tokens=False).input_ids) - 1
    else:
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        first, last = inside[0], inside[-1]
    return list(range(first // page_size, last // page_size + 1))


def plots_dir(parser: argparse.ArgumentParser, path: str) -> Path:
    """--plots DIR: matplotlib importable and DIR a folder we can write (made if missing), or a usage error."""
    from flexicache_hf import viz

    try:
        viz.require_matplotlib()
    except ImportError as e:
        parser.error(f"--plots: {e}")
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an existing file, no permission, ...
        parser.error(f"--plots {path}: cannot make a folder there ({e.strerror or e}): give a folder for the PNGs")
    return folder


def _fraction(text: str) -> float:
    """`type=` for --depth."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")  # not a number at all: the same message
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1 (0 = start of the prompt, 1 = end)")
    return value


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexicache demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), qwen-coder-0.5b, or a local HF folder")
    ap.add_argument("--tokens", type=positive_int, default=3000, help="prompt length in tokens")
    ap.add_argument("--depth", type=_fraction, default=0.35, help="where the pass key sits, 0 = start, 1 = end")
    ap.add_argument("--topk-pages", type=int, default=16, help="FlexiCache budget in pages")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--rerank-interval", type=int, default=16)
    ap.add_argument("--sketch-bits", type=int, default=None, choices=SKETCH_BITS,
                    help="score pages by per-token key sketches of this many bits (default: the cache's, 2; "
                         "0: the paper's MinMax bound)")
    ap.add_argument("--sketch-score", default="mass", choices=SKETCH_SCORES,
                    help="with --sketch-bits: rank pages by predicted attention mass (default) or best q.k")
    ap.add_argument("--new-tokens", type=positive_int, default=None,
                    help=f"tokens to generate (default 16; {PLOT_NEW_TOKENS} with --plots, all of them decoded)")
    ap.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", default=None, help="head profile JSON (default: the shipped one for the model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plots", metavar="DIR", default=None,
                    help="write memory.png, page_selection.png and head_stability.png into DIR (needs matplotlib)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    # the cache's own rules, checked now rather than after the model loaded and the dense run finished
    knobs = dict(page_size=args.page_size, topk_pages=args.topk_pages, rerank_interval=args.rerank_interval,
                 sketch_bits=args.sketch_bits, sketch_score=args.sketch_score)  # sketch_bits None: the default scorer
    check_knobs(ap, **knobs)
    if args.profile is not None:
        args.profile = load_profile(ap, args.profile)
    if args.plots is not None:
        args.plots = plots_dir(ap, args.plots)
    if args.new_tokens is None:
        args.new_tokens = 16 if args.plots is None else PLOT_NEW_TOKENS

    import flexicache_hf
    from flexicache_hf.models import load_model

    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=dtype, attn_implementation="flexicache")
    model.to(args.device)
    print(f"loaded {model.config._name_or_path} on {args.device} ({dtype}) in {time.perf_counter() - t0:.1f} s")
    prompt, key = passkey_prompt(tok, args.tokens, args.depth, args.seed)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).to(args.device)
    n = ids.input_ids.shape[1]
    print(f"prompt: {n} tokens, pass key {key} at depth {args.depth:.0%}")
    # with --plots every step is decoded (no stop at the answer's end): the picture spans several reranks
    steps = dict(min_new_tokens=args.new_tokens) if args.plots is not None else {}

    def run(cache):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, **cache_kwargs(cache), max_new_tokens=args.new_tokens, do_sample=False, **steps)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return tok.decode(out[0, n:], skip_special_tokens=True).strip(), time.perf_counter() - start

    # With a DynamicCache our attention function is plain sdpa: the dense baseline, same weights.
    from transformers import DynamicCache

    dense = run(DynamicCache(config=model.config))
    cache = flexicache_hf.FlexiCache(model.config, profile=args.profile, **knobs)
    recorder = cache.record_selections() if args.plots is not None else None
    flexi = run(cache)
    _report(args, key, n, dense, flexi, cache)
    if recorder is not None:
        _write_plots(args, cache, recorder, needle_pages(tok, prompt, key, args.page_size), n + args.new_tokens - 1)
    return 0 if key in flexi[0] else 1


def _write_plots(args, cache, recorder, needle, tokens) -> None:
    from flexicache_hf import viz

    device = "GPU" if args.device.startswith("cuda") else args.device.upper()
    written = viz.write_pictures(args.plots, report=cache.memory_report(), recorder=recorder, profile=cache.profile,
                                 needle_pages=needle, device=device, rerank_interval=args.rerank_interval,
                                 tokens=tokens)
    print()
    print(f"pictures ({len(recorder.positions())} decode steps recorded, the pass key on page(s) "
          f"{', '.join(map(str, needle))}; FlexiCache's time above includes the recording):")
    for path in written:
        print(f"  {path}")


def _report(args, key, n, dense, flexi, cache) -> None:
    budget = args.topk_pages * args.page_size
    print()
    print("| method | answer | correct | time |")
    print("|---|---|---|---|")
    print(f"| dense sdpa (DynamicCache) | {dense[0]!r} | {key in dense[0]} | {dense[1]:.1f} s |")
    print(f"| FlexiCache, budget {budget} tokens ({budget / (n + args.new_tokens):.0%} of context) | {flexi[0]!r} | "
          f"{key in flexi[0]} | {flexi[1]:.1f} s |")
    print()
    p, r = cache.profile, cache.memory_report()
    print(f"head profile: {len(p.unstable)} of {p.num_layers * p.num_kv_heads} KV heads unstable ({p.metadata.get('source', p.model_id)})")
    print(f"scorer: {cache.config.scorer}")
    print(f"KV bytes       dense would hold: {_mib(r['dense_kv_bytes'])}")
    print(f"  on the device ({args.device}), in use: {_mib(r['gpu_kv_bytes'])} K/V (unstable heads "
          f"{_mib(r['unstable_gpu_kv_bytes'])}, stable-head slots {_mib(r['stable_gpu_kv_bytes'])}) + "
          f"{_mib(r['metadata_bytes'])} page metadata")
    print(f"  on the device, reserved:   {_mib(r['gpu_reserved_bytes'])}  (every byte the cache's tensors hold)")
    print(f"  host pool, in use / reserved: {_mib(r['host_kv_bytes'])} / {_mib(r['host_reserved_bytes'])}")


if __name__ == "__main__":
    raise SystemExit(main())
