"""Where a compiled FlexiCache step's compile time goes, against dense StaticCache (CPU, SmolLM2).

generate() on a 512-token prompt, 64 new tokens (every step kind), once eagerly and once through transformers'
compile path with a given backend: "eager" (dynamo's tracing alone) or "aot_eager" (plus AOTAutograd's
functionalisation). The compiled request's extra wall time over the eager one is the compile cost; dynamo's
own breakdown (torch._dynamo.utils.compile_times) follows; "inductor" compiles fully (inductor's CPU backend, ~4
min) and also counts the kernels it generated. "nodes" counts each graph's FX nodes instead (what inductor gets
to lower: the size of each step kind's graph).

    .venv/bin/python experiments/compile_time.py [eager|aot_eager|inductor|nodes]
"""
import collections
import sys
import time

import torch
import torch._inductor.metrics
from torch._dynamo.utils import compile_times, counters
from transformers import CompileConfig

import flexicache_hf
from flexicache_hf.compat import cache_kwargs
from flexicache_hf.models import load_smollm2

backend = sys.argv[1] if len(sys.argv) > 1 else "eager"
nodes = []


def counting(gm, example_inputs):
    nodes.append(collections.Counter(n.op for n in gm.graph.nodes))
    return gm.forward


torch.set_num_threads(2)
model, _ = load_smollm2(attn_implementation="sdpa")
ids = torch.randint(100, 10000, (1, 512), generator=torch.Generator().manual_seed(0))


def request(method, compiled):
    model.set_attn_implementation("flexicache" if method == "flexicache" else "sdpa")
    kw = {"cache_implementation": "static"} if method == "dense" else cache_kwargs(flexicache_hf.FlexiCache(model.config))
    if compiled:
        cfg = CompileConfig(backend=counting if backend == "nodes" else backend, fullgraph=True, mode=None)
        cfg._compile_all_devices = True  # transformers compiles on CUDA only unless told
        kw["compile_config"] = cfg
    else:
        kw["disable_compile"] = True
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, **kw)
    return time.perf_counter() - t


for method in ("dense", "flexicache"):
    torch._dynamo.reset()
    eager = request(method, False)
    graphs, kernels = counters["stats"]["unique_graphs"], torch._inductor.metrics.generated_kernel_count
    compiled = request(method, True)
    print(f"{method}: eager request {eager:.1f} s, compiled request {compiled:.1f} s, "
          f"graphs {counters['stats']['unique_graphs'] - graphs}, "
          f"inductor kernels {torch._inductor.metrics.generated_kernel_count - kernels}", flush=True)
    print(compile_times(repr="str", aggregate=True) if backend != "nodes" else
          "\n".join(f"  graph {i}: {sum(c.values())} nodes, {c['placeholder']} inputs" for i, c in enumerate(nodes)),
          flush=True)
    nodes.clear()
