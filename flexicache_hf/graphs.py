"""CUDA graphs for the one-token decode step: the whole model forward, captured once, then replayed.

    model = flexicache_hf.enable_cuda_graphs(model)   # once; returns the model
    model.generate(ids, cache=FlexiCache(model.config), max_new_tokens=512)   # past_key_values= below 5.24

Why: in eager PyTorch a decode step is mostly Python and kernel launches (a Llama-3.1-8B-shaped model at
a 32k context: ~70 ms per step on the H100, of which a few ms are GPU work). A graph replays every
kernel of the step from one launch.

What is replayed: only a one-token decode step with a `FlexiCache` on one CUDA device, with no gradient,
whose next step needs no buffer growth. Everything else (prefill, chunked or multi-token forwards, other
caches, the first decode step after a prefill, online calibration, beam reorders) runs the model's own
forward, unchanged. The cache's decode step has fixed shapes and keeps the position on the device
(cache.py), so one graph serves every step of the same kind (`DecodeFlags`: new page, page fill,
rerank; a handful per request). A kind is captured the second time it occurs (the first runs eagerly and
compiles the Triton kernels for these shapes) and replayed from then on; a replay advances each layer's
length (`count_replayed_step`), the one Python-side number a decode step changes. Graphs bake in the
addresses of the cache's buffers, so they belong to the cache and are dropped whenever a buffer is
replaced (growth past the reserved capacity, batch reorders).

A replay copies the call's tensors into the graph's inputs. The attention mask is not an input: a decode
step reads padding from the cache's own validity table (recorded at prefill), and the new token is
always valid. When the caller passes no positions, they are the cache length, as the model would make.
"""

from __future__ import annotations

import gc
import inspect

import torch

from flexicache_hf.cache import FlexiCache
from flexicache_hf.compat import CACHE_KWARGS, find_cache


def enable_cuda_graphs(model):
    """Replay FlexiCache decode steps of `model` from CUDA graphs (see the module doc). Returns `model`."""
    if not isinstance(model.forward, GraphedForward):
        model.forward = GraphedForward(model.forward)
        model.generation_config.disable_compile = True  # the graphs replace generate()'s own compilation
    return model


def disable_cuda_graphs(model):
    """Undo `enable_cuda_graphs`: every call runs the model's own forward again. Returns `model`."""
    if isinstance(model.forward, GraphedForward):
        del model.forward  # the instance attribute shadowed the class's forward
        model.generation_config.disable_compile = False
    return model


class GraphedForward:
    """Stands in for `model.forward`: decode steps that qualify are replayed, all other calls pass through."""

    def __init__(self, forward):
        self.eager = forward
        # generate() reads forward's signature to decide which inputs to pass (position_ids, ...)
        self.__signature__ = inspect.signature(forward)
        self.__doc__ = forward.__doc__
        params = self.__signature__.parameters
        self.takes_cache_position = "cache_position" in params  # transformers < 5.2x: must be an input too
        self.first_arg = next(iter(params), None)

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and self.first_arg == "input_ids" and "input_ids" not in kwargs:
            kwargs["input_ids"] = args[0]
        elif args:
            return self.eager(*args, **kwargs)
        cache = find_cache(kwargs)  # generate() passes it as cache= from transformers 5.24, past_key_values= before
        if not isinstance(cache, FlexiCache) or not self._one_token_call(kwargs):
            return self.eager(**kwargs)
        state = cache.graph_state()
        if state is None or state.device != kwargs["input_ids"].device:
            return self.eager(**kwargs)
        inputs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        B, L = inputs["input_ids"].shape[0], cache.get_seq_length()
        if inputs.get("position_ids") is None:
            inputs["position_ids"] = torch.full((B, 1), L, dtype=torch.long, device=state.device)
        if self.takes_cache_position and inputs.get("cache_position") is None:
            inputs["cache_position"] = torch.full((1,), L, dtype=torch.long, device=state.device)
        try:
            call = tuple(sorted((k, _describe(v)) for k, v in inputs.items() if k not in CACHE_KWARGS))
            hash(call)
        except TypeError:  # an input we cannot key a graph on
            return self.eager(**kwargs)
        if cache.decode_graphs is None:
            cache.decode_graphs = _CacheGraphs()
        return cache.decode_graphs.step(self.eager, cache, state, call, inputs)

    @staticmethod
    def _one_token_call(kwargs) -> bool:
        ids = kwargs.get("input_ids")
        if ids is None or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or not ids.is_cuda:
            return False
        if kwargs.get("inputs_embeds") is not None or kwargs.get("labels") is not None or kwargs.get("return_dict") is False:
            return False
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        return not torch.is_grad_enabled() and not torch.cuda.is_current_stream_capturing()


def _describe(v):
    return ("tensor", tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v


class _CacheGraphs:
    """The graphs of one cache: one per (step kinds of every layer, call signature)."""

    def __init__(self):
        self.graphs: dict = {}
        self.seen: set = set()
        self.buffers = None
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = self.replays = 0  # counts, for tests and benchmarks

    def reset(self) -> None:
        """Drop every graph, and start a new memory pool: once its graphs are gone, PyTorch refuses to
        capture into a pool that still holds live tensors (an INTERNAL ASSERT, use_count > 0, at the next
        capture), and a graph's outputs may outlive it."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = torch.cuda.graph_pool_handle()

    def step(self, forward, cache: FlexiCache, state, call, inputs):
        cache.join_promotions()  # an eager step's background promotion, before a replay reads the slots
        if state.buffers != self.buffers:  # some buffer was replaced: every graph reads stale addresses
            self.reset()
            self.buffers = state.buffers
        key = (state.flags, call)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen:  # first of its kind: eager (compiles the kernels for these shapes)
                self.seen.add(key)
                return forward(**inputs)
            static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            graph = torch.cuda.CUDAGraph()
            # the capture runs the Python side once (the cache's counters advance here) and records the
            # device side, which the replay right after performs
            # No garbage collection during the capture: a collection there may destroy an unreachable
            # earlier cache and its CUDA graphs, which CUDA forbids while a stream captures (it invalidates
            # the capture, and the next CUDA call, often an event record in a tensor's destructor, aborts
            # the process). torch.cuda.graph no longer collects before capturing by default.
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    out = forward(**static)
                    cache.join_promotions()  # side-stream work must rejoin the capture before it ends
            finally:
                if collecting:
                    gc.enable()
            self.graphs[key] = (graph, static, out)
            self.captures += 1
            graph.replay()
        else:
            graph, static, out = entry
            for k, v in inputs.items():
                if isinstance(v, torch.Tensor):
                    static[k].copy_(v)
            graph.replay()
            self.replays += 1
            for layer in cache.layers:
                layer.count_replayed_step()
        # the next replay overwrites the graph's outputs: hand out a copy of the logits
        return out.__class__(**{k: (v.clone() if k == "logits" else v) for k, v in out.items()})

