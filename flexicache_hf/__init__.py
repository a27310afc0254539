"""flexicache-hf: FlexiCache (stability-aware hierarchical KV cache) as a Transformers drop-in.

    import flexicache_hf   # registers attn_implementation="flexicache"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flexicache")
    cache = flexicache_hf.FlexiCache(model.config, profile=..., topk_pages=64)
    model.generate(ids, cache=cache, max_new_tokens=512)   # past_key_values=cache below transformers 5.24

On CUDA, `flexicache_hf.enable_cuda_graphs(model)` replays decode steps from CUDA graphs (graphs.py).
"""

__version__ = "0.1.0"

from flexicache_hf.cache import FlexiCache
from flexicache_hf.config import FlexiCacheConfig
from flexicache_hf.scorers import MinMaxBound, SketchMass, SketchMax
from flexicache_hf.layer import FlexiCacheLayer
from flexicache_hf.layer import register as _register
from flexicache_hf.graphs import disable_cuda_graphs, enable_cuda_graphs
from flexicache_hf.profiles import HeadProfile

_register()

__all__ = ["FlexiCache", "FlexiCacheLayer", "FlexiCacheConfig", "HeadProfile", "MinMaxBound", "SketchMax",
           "SketchMass", "enable_cuda_graphs", "disable_cuda_graphs", "__version__"]
