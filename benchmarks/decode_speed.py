"""Decode speed on the path users take: model.generate(), against transformers' fastest dense path, in one run.

    python benchmarks/decode_speed.py --shape 32768x1 [--steps 300] [--layers 32] [--methods ...]
    python benchmarks/decode_speed.py --model smollm2 --shape 7936x1 --steps 255   # a real model, real text

A Llama-3.1-8B-shaped bf16 model with random weights (step time and bytes do not depend on weight values;
which pages a rerank promotes does: random weights promote nearly every stable page, the worst case), or with
--model a real one (flexicache_hf.models.load_model) on CPython's language reference, one shape per run.
Every method runs a warm-up request (compilation, CUDA graph capture) and then the measured request of
--steps new tokens; per-step times are the gaps between consecutive tokens (a logits processor notes each,
after a device sync: generate() waits for every token anyway).

    dense-eager        DynamicCache, sdpa, no compilation (fewer steps: it is slow)
    dense-sdpa         StaticCache + generate()'s own torch.compile, attn_implementation="sdpa"
    dense-flex         the same with "flex_attention"
    flexicache         FlexiCache(model.config) through generate()'s default path (it compiles the step);
                       the measured request reuses the warm-up's cache after reset()
    flexicache-fresh   the same with a new FlexiCache per request (every request re-records its CUDA graphs)
    flexicache-graphs  enable_cuda_graphs(model) instead (our own captured steps)

--profile-at J [J ...] then profiles single decode steps J (0: the first after the prefill) of one more request
each, on the same warm state (`report`: wall and kernel time, kernels per step, top ops): what
profile_step.py --at measures, without compiling every graph a second time.

The bandwidth floor of a step is the bytes it must read (the weights but the embedding table, the K/V it
attends to, the page metadata it scores) divided by the HBM bandwidth measured in the same run (a device copy).
Prints a markdown table last.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile
from torch._dynamo.utils import compilation_time_metrics, compile_times

import flexicache_hf
from flexicache_hf import FlexiCache
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.config import FlexiCacheConfig

METHODS = ["dense-eager", "dense-sdpa", "dense-flex", "flexicache", "flexicache-fresh", "flexicache-graphs"]


def warm_up_tokens() -> int:
    """A warm-up request long enough to run every step kind once. FlexiCache compiles a kind when it first runs:
    at the defaults (16-step warm-up, rerank every 16, pages of 16) the first page-fill step that is no rerank
    comes ~31 steps after the prefill, so a 24-token warm-up left the page graph's compilation (78 s for SmolLM2
    on the H200) inside the measured request. Every method gets the same length (64 at the defaults)."""
    c = FlexiCacheConfig()  # the defaults FlexiCache(model.config) runs with
    return c.warmup_steps + c.rerank_interval + 2 * c.page_size


class StepClock:
    """A logits processor that notes when each token is chosen."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def hbm_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 4 GiB (read + write counted)."""
    x = torch.empty(2**31, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 10 * 2 * x.nbytes / (time.perf_counter() - t)


def real_prompt(tokenizer, ctx: int, batch: int) -> torch.Tensor:
    """The first ctx tokens of CPython's language reference (the eval's docs haystack), for each row."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics.values()), return_tensors="pt").input_ids[:, :ctx]
    if ids.shape[1] < ctx:
        raise SystemExit(f"the language reference has {ids.shape[1]} tokens for this tokenizer; ask for fewer")
    return ids.repeat(batch, 1).cuda()


def generate(model, ids, new, clock, **kw):
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, logits_processor=[clock], **kw)
    torch.cuda.synchronize()
    return clock.times[0] - t0  # time to the first token


def run(model, method, ids, steps, profile_at=()):
    impl = {"dense-eager": "sdpa", "dense-sdpa": "sdpa", "dense-flex": "flex_attention"}.get(method, "flexicache")
    model.set_attn_implementation(impl)
    kw, cache = {}, None
    if method == "dense-eager":
        kw, steps = {"disable_compile": True}, min(steps, 64)
    elif method.startswith("dense"):
        kw = {"cache_implementation": "static"}
    else:
        cache = FlexiCache(model.config)
        if method == "flexicache-graphs":
            flexicache_hf.enable_cuda_graphs(model)
    try:
        warm = StepClock()
        compilation_time_metrics.clear()  # what this method's warm-up request compiles, by phase
        t0 = time.perf_counter()
        warm_tokens = warm_up_tokens()
        ttft_first = generate(model, ids, warm_tokens, warm, **kw, **(cache_kwargs(cache) if cache else {}))
        # a run cut short by a time limit still says where its time went (compilation is in this request)
        print(f"{method}: warm-up request ({warm_tokens} tokens) {time.perf_counter() - t0:.1f} s", flush=True)
        print(compile_times(repr="str", aggregate=True), flush=True)
        if cache is not None:
            if method == "flexicache-fresh":
                cache = FlexiCache(model.config)
            else:
                cache.reset()
                if cache.calibration is not None:  # no profile fits: the warm-up request calibrated, uncompiled;
                    # the split stays, and the next request compiles its graphs
                    generate(model, ids, warm_tokens, StepClock(), **kw, **cache_kwargs(cache))
                    print(f"{method}: a second warm-up request (the first calibrated the split online)", flush=True)
                    cache.reset()
            kw.update(cache_kwargs(cache))
        clock = StepClock()
        torch.cuda.reset_peak_memory_stats()
        ttft = generate(model, ids, steps + 1, clock, **kw)
        rep = cache.memory_report() if cache is not None else None
        for j in profile_at:
            profile_step(model, ids, method, j, cache, kw)
    finally:
        flexicache_hf.disable_cuda_graphs(model)
    steps_ms = [1000 * (b - a) for a, b in zip(clock.times, clock.times[1:])]
    gaps = sorted(steps_ms)
    from torch._dynamo.utils import counters

    # whether the compiled step is one CUDA graph: graph breaks and skipped cudagraphs show up here
    print(method, "graph breaks:", dict(counters["graph_break"]), "graphs:", counters["stats"]["unique_graphs"],
          "inductor:", {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}, flush=True)
    row = {"method": method, "ttft_s": ttft, "ttft_first_s": ttft_first, "median_ms": statistics.median(gaps),
           "p99_ms": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "max_ms": gaps[-1], "steps": len(gaps)}
    if cache is not None:
        row["by_kind"] = by_kind(steps_ms, cache, ids.shape[1])
        row["kv_reserved_gib"] = (rep["gpu_reserved_bytes"]) / 2**30
        row["report"] = rep
    return row


# ---- profiling steps (here with --profile-at; profile_step.py uses the same pieces) ------------------
def profile_step(model, ids, method, j, cache, kw):
    """Profile decode step j of one more request on the warm state (the reused cache after reset())."""
    if cache is not None:
        cache.reset()
        kw.update(cache_kwargs(cache))
    clock = ProfileSteps(j + 1, 1)  # the window opened by token j + 1 (the prefill's is token 0) is step j
    generate(model, ids, j + 3, clock, **kw)
    report(method, clock, 1, None, step_label(kw, ids.shape[1], j))


class ProfileSteps(StepClock):
    """Notes each token's time, and profiles the steps between token `start` and token `start + n`."""

    def __init__(self, start, n):
        super().__init__()
        self.start, self.n = start, n
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def __call__(self, input_ids, scores):
        scores = super().__call__(input_ids, scores)
        i = len(self.times)
        if i == self.start:
            self.prof.start()
        elif i == self.start + self.n:
            torch.cuda.synchronize()
            self.prof.stop()
        return scores


def report(method, clock, n, trace_dir, label=""):
    events = clock.prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.device_time for e in kernels) / 1000 / n
    launches = sum(1 for e in events if e.name in ("cudaGraphLaunch", "cuGraphLaunch")) / n
    walls = [1000 * (b - a) for a, b in zip(clock.times[clock.start - 1:], clock.times[clock.start:clock.start + n])]
    print(f"\n=== {method}{label}: {n} steps profiled; wall per step (ms): {[round(w, 2) for w in walls]}")
    print(f"kernel time per step {gpu_ms:.2f} ms, {len(kernels) / n:.0f} kernels and {launches:.1f} graph launches "
          f"per step")
    avg = clock.prof.key_averages()
    print(avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    print(avg.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    if trace_dir:
        path = Path(trace_dir) / f"{method}.json"
        clock.prof.export_chrome_trace(str(path))
        with open(path, "rb") as f, gzip.open(f"{path}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
        os.remove(path)


def step_label(kw, prompt_len, j) -> str:
    """The label of decode step j (the window opened by the start-th token, after the prefill's, profiles step
    start - 1)."""
    cache = next((v for v in kw.values() if isinstance(v, FlexiCache)), None)
    return f", step {j}" + (f" ({step_kind(cache, prompt_len, j)})" if cache is not None else "")


def by_kind(steps_ms, cache, prompt_len) -> dict:
    """Count, median and max step time per step kind (step_kind). Step j decodes the token at prompt_len + j."""
    kinds = {"plain": [], "page": [], "rerank": [], "warm-up": []}
    for j, ms in enumerate(steps_ms):
        kinds[step_kind(cache, prompt_len, j)].append(ms)
    return {k: (len(v), statistics.median(v), max(v)) for k, v in kinds.items() if v}


def step_kind(cache, prompt_len, j) -> str:
    """plain (the compiled lean graph), page (a new page or a page fill), rerank (the periodic one) or warm-up
    (the stable heads re-select at once, the first warmup_steps steps); page steps run the page graph, reranks
    and the warm-up the rerank graph."""
    from flexicache_hf.decode import DecodeFlags

    cfg = cache.config
    has_stable = any(layer.memory.stable is not None for layer in cache.layers)
    f = DecodeFlags.at(prompt_len + j, prompt_len, cfg.page_size, cfg.rerank_interval, has_stable, cfg.warmup_steps)
    return "warm-up" if f.first else "rerank" if f.rerank else "page" if f.new_page or f.fill else "plain"


def step_bytes(model, method, batch, ctx, report=None) -> float:
    """Bytes one decode step must read (see the module doc)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.get_input_embeddings().weight.nbytes  # a lookup reads a row per token
    cfg = model.config
    layers, kv_heads, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if not method.startswith("flexicache"):
        return weights + 2 * layers * batch * kv_heads * ctx * d * 2
    c = FlexiCache(model.config).config
    tokens = min(ctx, (c.topk_pages + 1) * c.page_size)  # the selected pages and the current one, every head
    selected = 2 * layers * batch * kv_heads * tokens * d * 2
    meta = report["metadata_bytes"] if report else 0
    return weights + selected + meta  # every page's metadata is scored (stable heads: every step in v1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="32768x1", help="context x batch")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--model", help="a real model (load_model's names: smollm2, qwen-coder-0.5b, ...) instead of the "
                                    "random-weight Llama-3.1-8B shape; --layers is then ignored")
    ap.add_argument("--profile-at", type=int, nargs="*", default=[],
                    help="then profile these decode steps, one request each (0: the first after the prefill)")
    args = ap.parse_args(argv)
    ctx, batch = map(int, args.shape.split("x"))
    torch._dynamo.config.cache_size_limit = 64  # one model, several attention implementations and shapes
    bw = hbm_bandwidth()
    if args.model:
        from flexicache_hf.models import load_model

        model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
        model = model.cuda().eval()
        ids = real_prompt(tokenizer, ctx, batch)
        what = f"{args.model} bf16 (real weights, language-reference prompt)"
    else:
        from gpu_e2e import llama8b

        model = llama8b(args.layers)
        ids = torch.randint(0, 32000, (batch, ctx), device="cuda")
        what = f"Llama-3.1-8B shape bf16, {args.layers} layers"
    rows = []
    for method in args.methods:
        row = run(model, method, ids, args.steps, args.profile_at)
        row["floor_ms"] = 1000 * step_bytes(model, method, batch, ctx, row.get("report")) / bw
        rows.append(row)
        print(row, flush=True)
    name = torch.cuda.get_device_name()
    best = min((r["median_ms"] for r in rows if r["method"] in ("dense-sdpa", "dense-flex")), default=None)
    print(f"\n{name}, torch {torch.__version__}, transformers {transformers.__version__}, HBM copy bandwidth "
          f"{bw / 1e12:.2f} TB/s, {what}, context {ctx} x batch {batch}, {args.steps} measured steps after a "
          "warm-up request\n")
    print("| method | median ms | p99 ms | max ms | floor ms | median / floor | vs fastest compiled dense | "
          "TTFT s (warm) | TTFT s (first request) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{best / r['median_ms']:.2f}x" if best else "-"
        print(f"| {r['method']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['median_ms'] / r['floor_ms']:.2f} | {speedup} | {r['ttft_s']:.2f} | {r['ttft_first_s']:.2f} |")
    for r in rows:
        if "by_kind" in r:
            print(f"\n{r['method']}: " + "; ".join(f"{k} steps: {n}, median {med:.2f} ms, max {mx:.2f} ms"
                                                  for k, (n, med, mx) in r["by_kind"].items()))


if __name__ == "__main__":
    main()
