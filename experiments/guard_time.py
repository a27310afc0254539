"""How long dynamo's guard check takes before each compiled decode step (CPU, SmolLM2): the profiler's
"TorchDynamo Cache Lookup" per step of a 40-token request, after a warm-up request on the same cache, through
transformers' compile path with the "eager" backend (the guards are the same with inductor; they are built from
the Python state the step reads, not from the compiled code). Dense StaticCache against FlexiCache.

    .venv/bin/python experiments/guard_time.py [dense] [flexicache]
"""
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig

import flexicache_hf
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.models import load_smollm2

torch.set_num_threads(2)
model, _ = load_smollm2(attn_implementation="sdpa")
ids = torch.randint(100, 10000, (1, 512), generator=torch.Generator().manual_seed(0))


def request(cache, tokens=40):
    kw = {"cache_implementation": "static"} if cache is None else cache_kwargs(cache)
    cfg = CompileConfig(backend="eager", fullgraph=True, mode=None)
    cfg._compile_all_devices = True  # transformers compiles on CUDA only unless told
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, compile_config=cfg, **kw)


for method in sys.argv[1:] or ("dense", "flexicache"):
    torch._dynamo.reset()
    model.set_attn_implementation("flexicache" if method == "flexicache" else "sdpa")
    cache = flexicache_hf.FlexiCache(model.config) if method == "flexicache" else None
    request(cache)  # compiles every graph the measured request needs
    if cache is not None:
        cache.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        request(cache)
    us = sorted(e.cpu_time_total for e in prof.events() if e.name == "TorchDynamo Cache Lookup")
    print(f"{method}: {len(us)} steps, guard check median {statistics.median(us):.0f} us, "
          f"p90 {us[int(0.9 * len(us))]:.0f} us")
