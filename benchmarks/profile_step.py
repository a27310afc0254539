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
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_speed as D  # noqa: E402

import flexicache_hf  # noqa: E402
from flexicache_hf import FlexiCache  # noqa: E402
from flexicache_hf.compat import cache_kwargs  # noqa: E402


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
                clock = D.ProfileSteps(start, n)
                kw = next_request()
                D.generate(model, ids, start + n + 2, clock, **kw)
                D.report(method, clock, n, args.trace, D.step_label(kw, ids.shape[1], start - 1) if args.at else "")
        finally:
            flexicache_hf.disable_cuda_graphs(model)


if __name__ == "__main__":
    main()
