"""How long dynamo's guard check takes before each compiled decode step (CPU, SmolLM2): the profiler's
"TorchDynamo Cache Lookup" per step of a 40-token request, after a warm-up request on the same cache, through
transformers' compile path with the "eager" backend (the guards are the same with inductor; they are built from
the Python state the step reads, not from the compiled code). Dense StaticCache against FlexiCache, and
FlexiCache without marking its tensors as static addresses ("flexicache-unmarked": what CUDA graphs need, so
only a diagnosis). On a GPU machine without the SmolLM2 package, --random builds a model of SmolLM2's shape with
random weights (the guards depend on shapes, not on weights).

    .venv/bin/python experiments/guard_time.py [--random] [dense] [flexicache] [flexicache-unmarked]
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
args = [a for a in sys.argv[1:] if a != "--random"]
dev = "cuda" if torch.cuda.is_available() else "cpu"
if "--random" in sys.argv:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
        attn_implementation="sdpa")).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32).eval()
else:
    model, _ = load_smollm2(attn_implementation="sdpa")
    model = model.to(dev)
ids = torch.randint(100, 10000, (1, 512), generator=torch.Generator().manual_seed(0)).to(dev)


def request(cache, tokens=40):
    kw = {"cache_implementation": "static"} if cache is None else cache_kwargs(cache)
    cfg = CompileConfig(backend="eager", fullgraph=True, mode=None)
    cfg._compile_all_devices = True  # transformers compiles on CUDA only unless told
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, compile_config=cfg, **kw)


mark = torch._dynamo.mark_static_address
for method in args or ("dense", "flexicache"):
    torch._dynamo.reset()
    torch._dynamo.mark_static_address = (lambda t, **kw: None) if method == "flexicache-unmarked" else mark
    fc = method.startswith("flexicache")
    model.set_attn_implementation("flexicache" if fc else "sdpa")
    cache = flexicache_hf.FlexiCache(model.config) if fc else None
    request(cache)  # compiles every graph the measured request needs
    if cache is not None:
        cache.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        request(cache)
    us = sorted(e.cpu_time_total for e in prof.events() if e.name == "TorchDynamo Cache Lookup")
    print(f"{method} ({dev}): {len(us)} steps, guard check median {statistics.median(us):.0f} us, "
          f"p90 {us[int(0.9 * len(us))]:.0f} us")
