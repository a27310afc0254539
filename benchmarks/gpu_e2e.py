"""End-to-end checks and benchmark of FlexiCache inside generate() on one GPU, in one run.

    python benchmarks/gpu_e2e.py [--skip-real] [--shapes 32768x1 32768x4 10240x16] [--new 64] [--layers 32]
                                 [--sketch-bits 1 2 [--sketch-scores mass max]]
                                 [--throughput --budget-gib 40 --prompt 30000 --outputs 1000]

1. Correctness on SmolLM2-135M-Instruct (fp32, Triton kernels): full budget -> the same greedy tokens
   as HF dense sdpa; pass-key retrieval at a small budget; no data loss (batch 2, left padding, sparse).
2. Speed and memory on a Llama-3.1-8B-shaped bf16 model with random weights (time and bytes do not depend
   on weight values): prefill time, decode ms/token (median over steps), peak GPU memory and GPU KV bytes,
   HF dense sdpa (DynamicCache) against FlexiCache (64 pages of 16, the shipped Llama-3.1-8B profile: 25%
   unstable heads, R = 16), measured in the same run: HF dense eager, HF's offloaded DynamicCache, FlexiCache
   eager and FlexiCache with CUDA-graph decode steps (`enable_cuda_graphs`).
3. --throughput: a fixed GPU memory budget (weights included; enforced with
   torch.cuda.set_per_process_memory_fraction), prompts of --prompt tokens, --outputs greedy tokens through
   model.generate() (chunked prefill, 4096 tokens a chunk, for both): the largest batch each method fits
   (from the measured peak at batch 1 and 2), then output tokens/s at that batch.
Prints markdown tables last.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import flexicache_hf
from flexicache_hf.compat import cache_kwargs
from flexicache_hf import FlexiCache
from flexicache_hf.config import SKETCH_SCORES
from flexicache_hf.testing import UpdateRecorder


def _sync():
    torch.cuda.synchronize()


def check_real_model(results: list[str]) -> None:
    from transformers import DynamicCache

    from flexicache_hf.demo import passkey_prompt
    from flexicache_hf.models import load_smollm2

    model, tok = load_smollm2(torch.float32, attn_implementation="flexicache")
    model.cuda()
    text = " ".join(f"On day {i} the keeper counted {i * 7 % 13} ships and wrote it in the log." for i in range(60))
    ids = tok(text, return_tensors="pt").to("cuda")
    n, new = ids.input_ids.shape[1], 64

    def gen(cache, ids=ids, new=new, **kw):
        with torch.no_grad():
            return model.generate(**ids, **cache_kwargs(cache), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True, **kw)

    dense = gen(DynamicCache(config=model.config))
    full = gen(FlexiCache(model.config, topk_pages=-(-(n + new) // 16)))
    same = torch.equal(dense.sequences, full.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(dense.logits, full.logits))
    results.append(f"| SmolLM2 fp32, full budget, {n}+{new} tokens | greedy tokens equal dense: {same} | max logit diff {diff:.2e} |")

    for ps, k in ((16, 16), (8, 16), (8, 32)):
        ok = []
        for seed, depth in ((0, 0.35), (1, 0.2), (2, 0.5)):
            prompt, key = passkey_prompt(tok, 3000, depth, seed)
            pids = tok(prompt, return_tensors="pt", add_special_tokens=False).to("cuda")
            cache = FlexiCache(model.config, topk_pages=k, page_size=ps)
            with torch.no_grad():
                out = model.generate(**pids, **cache_kwargs(cache), max_new_tokens=12, do_sample=False)
            ok.append(key in tok.decode(out[0, pids.input_ids.shape[1]:], skip_special_tokens=True))
        source = cache.profile.metadata.get("source", "?") if cache.profile else "auto (still calibrating)"
        results.append(f"| SmolLM2 pass key, ~3k tokens, {k} pages of {ps} (profile: {source}) | {sum(ok)}/3 | |")

    # no data loss: record every update, sparse budget, batch 2 with left padding, 300 steps
    print("\n".join(results), flush=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pids = tok([text[:3000], text[:2000]], return_tensors="pt", padding=True, padding_side="left").to("cuda")
    cache = FlexiCache(model.config, topk_pages=4, page_size=16, rerank_interval=4)
    rec = UpdateRecorder(cache)
    with torch.no_grad():
        model.generate(**pids, **cache_kwargs(cache), max_new_tokens=300, min_new_tokens=300, do_sample=False)
    exact = rec.all_exact()
    results.append(f"| no data loss, batch 2 left-padded, 300 sparse steps | full_kv bit-exact: {exact} | |")
    del model
    torch.cuda.empty_cache()


def llama8b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5,
    )
    cfg._name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="flexicache", dtype=torch.bfloat16)
    return model.eval()


def bench(model, cache_fn, ctx, batch, new, graphs=False) -> dict:
    if graphs:
        flexicache_hf.enable_cuda_graphs(model)
    try:
        return _bench(model, cache_fn, ctx, batch, new)
    finally:
        flexicache_hf.disable_cuda_graphs(model)


def _bench(model, cache_fn, ctx, batch, new) -> dict:
    ids = torch.randint(0, 32000, (batch, ctx), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cache = cache_fn()
    step_times = []
    with torch.no_grad():
        _sync()
        t0 = time.perf_counter()
        out = model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        _sync()
        prefill = time.perf_counter() - t0
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            t = time.perf_counter()
            out = model(tok, **cache_kwargs(cache), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            _sync()
            step_times.append(time.perf_counter() - t)
    steady = step_times[40:] if len(step_times) >= 56 else (step_times[4:] or step_times)
    rep = cache.memory_report() if hasattr(cache, "memory_report") else {}
    kv = rep.get("gpu_kv_bytes") or sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    # what the allocator gives back when the cache goes: its tensors (and, with graphs, their pools)
    del out, tok
    held = torch.cuda.memory_allocated()
    cache.join_promotions() if hasattr(cache, "join_promotions") else None
    del cache
    gc.collect()
    freed = held - torch.cuda.memory_allocated()
    return {
        "gpu_reserved_gib": rep.get("gpu_reserved_bytes", kv) / 2**30,
        "host_reserved_gib": rep.get("host_reserved_bytes", 0) / 2**30,
        "freed_gib": freed / 2**30,
        "prefill_s": prefill,
        "decode_ms": 1000 * statistics.median(step_times[4:] or step_times),
        # steady state, reranks in: from step 40 on every step kind (new page, fill, rerank: each repeats every
        # 16 steps) has had its eager first run and its capture; the mean counts the rerank steps (selection
        # and promotion of the stable heads, 1 in 16) that the median hides
        "decode_mean_ms": 1000 * statistics.mean(steady),
        "decode_max_ms": 1000 * max(steady),
        "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
        "gpu_kv_gib": kv / 2**30,
        "host_kv_gib": rep.get("host_kv_bytes", 0) / 2**30,
        "metadata_gib": rep.get("metadata_bytes", 0) / 2**30,
    }


class _Clock:
    """A logits processor that notes when the first token is chosen: prefill ends there."""

    def __init__(self):
        self.first = None

    def __call__(self, input_ids, scores):
        if self.first is None:
            torch.cuda.synchronize()
            self.first = time.perf_counter()
        return scores


def _generate_run(model, make_cache, batch, prompt, outputs, graphs) -> dict:
    from transformers import LogitsProcessorList

    ids = torch.randint(0, 32000, (batch, prompt), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    clock = _Clock()
    if graphs:
        flexicache_hf.enable_cuda_graphs(model)
    try:
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(make_cache()),
                                 max_new_tokens=outputs, min_new_tokens=outputs, do_sample=False,
                                 prefill_chunk_size=4096, logits_processor=LogitsProcessorList([clock]))
        _sync()
        t1 = time.perf_counter()
    finally:
        flexicache_hf.disable_cuda_graphs(model)
    assert out.shape == (batch, prompt + outputs)
    return {"batch": batch, "peak": torch.cuda.max_memory_allocated(), "prefill_s": clock.first - t0,
            "decode_s": t1 - clock.first, "total_s": t1 - t0, "tok_s": batch * outputs / (t1 - t0),
            "decode_tok_s": batch * (outputs - 1) / (t1 - clock.first)}


def throughput(model, budget_gib, prompt, outputs) -> list[str]:
    """Largest batch under a GPU memory budget, then output tokens/s at that batch, dense vs FlexiCache."""
    from transformers import DynamicCache

    total = torch.cuda.get_device_properties(0).total_memory
    budget = budget_gib * 2**30
    torch.cuda.set_per_process_memory_fraction(budget / total)
    flexi = lambda: FlexiCache(model.config, topk_pages=64, page_size=16, rerank_interval=16,  # noqa: E731
                               max_cache_len=prompt + outputs)
    methods = {
        "HF dense (DynamicCache, sdpa, eager)": (lambda: DynamicCache(config=model.config), False),
        "FlexiCache (64 pages of 16, R = 16, max_cache_len set), CUDA-graph decode": (flexi, True),
    }
    rows = []
    try:
        for name, (make, graphs) in methods.items():
            # peak at batch 1 and 2 (a few outputs, then the growth of 1000 more tokens of KV is added)
            p = [_generate_run(model, make, b, prompt, 8, graphs)["peak"] for b in (1, 2)]
            per_seq = p[1] - p[0]
            fits = max(1, int((budget * 0.92 - (p[0] - per_seq)) // (per_seq * (prompt + outputs) / (prompt + 8))))
            print(f"{name}: peak b1 {p[0] / 2**30:.2f} GiB, b2 {p[1] / 2**30:.2f} GiB -> batch {fits}", flush=True)
            while True:
                try:
                    r = _generate_run(model, make, fits, prompt, outputs, graphs)
                    break
                except torch.OutOfMemoryError:
                    print(f"{name}: batch {fits} ran out of the budget; trying {fits - 1}", flush=True)
                    fits -= 1
                    if fits == 0:
                        raise
            print(name, r, flush=True)
            rows.append((name, r))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    base = rows[0][1]["tok_s"]
    lines = [f"\nFixed GPU memory budget {budget_gib} GiB (weights included), {prompt}-token prompts, {outputs} output tokens, "
             "generate() with prefill_chunk_size=4096\n",
             "| method | largest batch | peak GiB | prefill s | decode s | output tokens/s | decode tokens/s | vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['batch']} | {r['peak'] / 2**30:.1f} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} | "
                     f"{r['tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['tok_s'] / base:.2f}x |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--shapes", nargs="*", default=["32768x1", "32768x4", "10240x16"], help="CTXxBATCH")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--sketch-bits", nargs="*", type=int, default=[],
                    help="per shape, also FlexiCache (graphs) scoring pages by a key sketch of this many bits")
    ap.add_argument("--sketch-scores", nargs="*", default=["mass"], choices=SKETCH_SCORES,
                    help="with --sketch-bits: one FlexiCache run per way of ranking by the sketch (sketch_score)")
    ap.add_argument("--sweep", nargs="*", type=int, default=[], help="contexts for a batch-1 sweep (dense vs graphs)")
    ap.add_argument("--json", help="write the sweep here (benchmarks/plot_e2e.py draws it)")
    ap.add_argument("--chunked", nargs="*", type=int, default=[],
                    help="batches for a chunked-prefill timing (--prompt tokens, chunks of 4096)")
    ap.add_argument("--budget-gib", type=float, default=40)
    ap.add_argument("--prompt", type=int, default=30000)
    ap.add_argument("--outputs", type=int, default=1000)
    args = ap.parse_args(argv)
    from flexicache_hf import kernels

    assert kernels.AVAILABLE, "Triton kernels not importable: install the package (pip install -e .)"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    import transformers

    print(f"transformers {transformers.__version__}", flush=True)
    results: list[str] = []
    if not args.skip_real:
        check_real_model(results)
        print("\n".join(results), flush=True)
    from transformers import DynamicCache

    model = llama8b(args.layers)
    rows = []
    sketched = []
    sweep = []
    if args.sweep:  # batch 1 across contexts: dense eager against FlexiCache with CUDA-graph decode
        bench(model, lambda: DynamicCache(config=model.config), 2048, 1, 4)  # warm-up: the first run is cold
        for ctx in args.sweep:
            d = bench(model, lambda: DynamicCache(config=model.config), ctx, 1, args.new)
            g = bench(model, lambda: FlexiCache(model.config, topk_pages=64, page_size=16, rerank_interval=16), ctx, 1,
                      args.new, graphs=True)
            sweep.append({"ctx": ctx, "dense": d, "flexicache_graphs": g})
            print(sweep[-1], flush=True)
        if args.json:
            import json

            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "sweep": sweep}, f, indent=1)
    for shape in args.shapes:
        ctx, batch = (int(x) for x in shape.split("x"))
        bench(model, lambda: DynamicCache(config=model.config), ctx, batch, 4)  # warm-up: the first run is cold
        dense = bench(model, lambda: DynamicCache(config=model.config), ctx, batch, args.new)
        make = lambda: FlexiCache(model.config, topk_pages=64, page_size=16, rerank_interval=16)  # noqa: E731
        # the first request page-locks its host pool (cudaHostAlloc, ~3 GB/s); later requests of the same
        # shape reuse it through torch's caching host allocator: the eager run is the first request
        eager = bench(model, make, ctx, batch, args.new)
        graphs = bench(model, make, ctx, batch, args.new, graphs=True)
        offl = bench(model, lambda: DynamicCache(config=model.config, offloading=True), ctx, batch, args.new)
        rows.append((ctx, batch, dense, eager, graphs, offl))
        print(ctx, batch, dense, eager, graphs, offl, flush=True)
        for bits, score in ((b, s) for b in args.sketch_bits for s in args.sketch_scores):
            sk = bench(model, lambda: FlexiCache(model.config, topk_pages=64, page_size=16, rerank_interval=16,
                                                 sketch_bits=bits, sketch_score=score),
                       ctx, batch, args.new, graphs=True)
            sketched.append((ctx, batch, dense, graphs, sk, f"{bits}-bit {score}"))
            print("sketch", bits, score, sk, flush=True)
    tput = throughput(model, args.budget_gib, args.prompt, args.outputs) if args.throughput else []
    chunked = []
    for batch in args.chunked:  # generate(prefill_chunk_size=4096, max_new_tokens=1): prefill time
        flexi = lambda: FlexiCache(model.config, max_cache_len=args.prompt + 1)  # noqa: E731
        d = _generate_run(model, lambda: DynamicCache(config=model.config), batch, args.prompt, 1, False)
        first = _generate_run(model, flexi, batch, args.prompt, 1, False)
        steady = _generate_run(model, flexi, batch, args.prompt, 1, False)
        chunked.append(f"| {args.prompt} | {batch} | {d['prefill_s']:.2f} | {steady['prefill_s']:.2f} | "
                       f"{first['prefill_s']:.2f} | {steady['prefill_s'] / d['prefill_s']:.2f}x |")
        print(chunked[-1], flush=True)
    print(f"\n## generate()-path decode, Llama-3.1-8B-shaped bf16 ({args.layers} layers, random weights), {torch.cuda.get_device_name()}\n")
    print("| check | result | |\n|---|---|---|")
    print("\n".join(results))
    print("\n| ctx | batch | dense prefill s | FlexiCache prefill s: steady (first request) | dense decode ms/tok (eager) | HF offloaded ms/tok | FlexiCache eager ms/tok | FlexiCache graphs ms/tok | FlexiCache graphs, steps 40+: mean / slowest ms | graphs vs dense | dense GPU KV GiB | FlexiCache GPU KV GiB in use | reserved (allocator freed) | KV saved, reserved | host KV GiB in use / reserved | dense peak GiB | FlexiCache peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for ctx, batch, d, e, g, o in rows:
        print(
            f"| {ctx} | {batch} | {d['prefill_s']:.2f} | {g['prefill_s']:.2f} ({e['prefill_s']:.2f}) | {d['decode_ms']:.1f} | "
            f"{o['decode_ms']:.1f} | {e['decode_ms']:.1f} | {g['decode_ms']:.1f} | {g['decode_mean_ms']:.1f} / {g['decode_max_ms']:.1f} | {d['decode_ms'] / g['decode_ms']:.2f}x | {d['gpu_kv_gib']:.2f} | "
            f"{e['gpu_kv_gib'] + e['metadata_gib']:.2f} | {e['gpu_reserved_gib']:.2f} ({e['freed_gib']:.2f}) | "
            f"{1 - e['gpu_reserved_gib'] / d['gpu_kv_gib']:.0%} | {e['host_kv_gib']:.2f} / {e['host_reserved_gib']:.2f} | "
            f"{d['peak_gib']:.1f} | {g['peak_gib']:.1f} |"
        )
    if sketched:
        print("\n| ctx | batch | dense decode ms/tok | FlexiCache graphs ms/tok: MinMax bound | key sketch | "
              "sketch vs bound | sketch vs dense | metadata GiB: bound | sketch | peak GiB: bound | sketch |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
        for ctx, batch, d, g, k, score in sketched:
            print(f"| {ctx} | {batch} | {d['decode_ms']:.1f} | {g['decode_ms']:.1f} | {k['decode_ms']:.1f} ({score}) | "
                  f"{k['decode_ms'] / g['decode_ms']:.2f}x | {d['decode_ms'] / k['decode_ms']:.2f}x | {g['metadata_gib']:.2f} | "
                  f"{k['metadata_gib']:.2f} | {g['peak_gib']:.1f} | {k['peak_gib']:.1f} |")
    print("\n".join(tput))
    if chunked:
        print("\n| prompt | batch | dense chunked prefill s | FlexiCache steady s | FlexiCache first request s | "
              "steady vs dense |\n|---|---|---|---|---|---|")
        print("\n".join(chunked))
    if sweep:
        print("\n| ctx (batch 1) | dense decode ms/tok (eager) | FlexiCache graphs ms/tok | speedup | dense GPU KV GiB | "
              "FlexiCache GPU KV GiB | KV saved | dense prefill s | FlexiCache prefill s |\n|---|---|---|---|---|---|---|---|---|")
        for r in sweep:
            d, g = r["dense"], r["flexicache_graphs"]
            print(f"| {r['ctx']} | {d['decode_ms']:.1f} | {g['decode_ms']:.1f} | {d['decode_ms'] / g['decode_ms']:.2f}x | "
                  f"{d['gpu_kv_gib']:.2f} | {g['gpu_kv_gib']:.2f} | {1 - g['gpu_kv_gib'] / d['gpu_kv_gib']:.0%} | "
                  f"{d['prefill_s']:.2f} | {g['prefill_s']:.2f} |")


if __name__ == "__main__":
    main()
