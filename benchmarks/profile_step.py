"""Where a decode step's time goes on the path users take: torch.profiler over a few steps of generate().

    python benchmarks/profile_step.py --shape 32768x1 [--methods flexicache dense-flex] [--trace DIR]
    python benchmarks/profile_step.py --model smollm2 --shape 7936x1 --at 6 21 32 33   # one step of each kind

Same model and set-up as decode_speed.py (warm-up request first, then a reused cache / a warm compiled
model). For each method it prints, per profiled step: wall time, GPU kernel time (the sum of kernel
durations), the number of kernels and of CUDA graph launches, the top host-side ops by self CPU time and
the top kernels by GPU time. A step whose wall time is well above its kernel time is bound by the host
(Python, guards, launches), one near it by the GPU. --trace writes a chrome trace per method. --at profiles
single steps instead (one request each; step j decodes the prompt's j-th next token), labelled with their kind.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_speed as D  # noqa: E402

import flexicache_hf  # noqa: E402
from flexicache_hf import FlexiCache  # noqa: E402
from flexicache_hf.compat import cache_kwargs  # noqa: E402


class ProfileSteps(D.StepClock):
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


def prepare(model, method):
    """generate() kwargs for `method` (as decode_speed.run), and a function giving the next request's."""
    impl = {"dense-sdpa": "sdpa", "dense-flex": "flex_attention"}.get(method, "flexicache")
    model.set_attn_implementation(impl)
    if method.startswith("dense"):
        return lambda: {"cache_implementation": "static"}
    if method == "flexicache-graphs":
        flexicache_hf.enable_cuda_graphs(model)
    cache = FlexiCache(model.config)

    def next_request():
        cache.reset()
        return cache_kwargs(cache)

    return next_request


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="32768x1", help="context x batch")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--start", type=int, default=20, help="first profiled step (after a rerank, mid-period)")
    ap.add_argument("--steps", type=int, default=6, help="steps profiled")
    ap.add_argument("--methods", nargs="+", default=["flexicache"],
                    choices=["flexicache", "flexicache-graphs", "dense-sdpa", "dense-flex"])
    ap.add_argument("--trace", default=None, help="folder for chrome traces")
    ap.add_argument("--model", help="a real model (decode_speed's --model) instead of the Llama-3.1-8B shape")
    ap.add_argument("--at", type=int, nargs="+", help="profile these single steps, one request each")
    args = ap.parse_args(argv)
    ctx, batch = map(int, args.shape.split("x"))
    if args.model:
        from flexicache_hf.models import load_model

        model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
        model = model.cuda().eval()
        ids = D.real_prompt(tokenizer, ctx, batch)
    else:
        from gpu_e2e import llama8b

        model = llama8b(args.layers)
        ids = torch.randint(0, 32000, (batch, ctx), device="cuda")
    torch._dynamo.config.cache_size_limit = 64
    windows = [(j, 1) for j in args.at] if args.at else [(args.start, args.steps)]
    for method in args.methods:
        next_request = prepare(model, method)
        try:
            D.generate(model, ids, D.warm_up_tokens(), D.StepClock(), **next_request())  # compiles every graph
            for start, n in windows:
                clock = ProfileSteps(start, n)
                kw = next_request()
                D.generate(model, ids, start + n + 2, clock, **kw)
                report(method, clock, n, args.trace, step_kind(kw, ids.shape[1], start - 1) if args.at else "")
        finally:
            flexicache_hf.disable_cuda_graphs(model)


def step_kind(kw, prompt_len, j) -> str:
    """The label of decode step j (the window opened by the start-th token, after the prefill's, profiles step
    start - 1)."""
    cache = next((v for v in kw.values() if isinstance(v, FlexiCache)), None)
    return f", step {j}" + (f" ({D.step_kind(cache, prompt_len, j)})" if cache is not None else "")


if __name__ == "__main__":
    main()
