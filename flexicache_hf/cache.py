"""FlexiCache: a transformers `Cache` of `FlexiCacheLayer`s (layer.py) and, on sliding-window layers,
transformers' own dense window layer. Construction refuses, before anything is allocated, what it
cannot serve; `reset()` readies it for a new request.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from flexicache_hf import ops
from flexicache_hf.config import FlexiCacheConfig
from flexicache_hf.layer import FlexiCacheLayer
from flexicache_hf.memory import sync_lengths
from flexicache_hf.profiles import HeadProfile


class GraphState(NamedTuple):
    """What a captured decode step depends on (graphs.py): its device, each layer's step kind, and the
    identity of each layer's buffers (a version counter and capacities)."""

    device: torch.device
    flags: tuple
    buffers: tuple


class FlexiCache(Cache):
    """A drop-in cache for `generate()` (`cache=`, or `past_key_values=` below transformers 5.24) on a model
    loaded with attn_implementation="flexicache". Inference only.

    Args:
        model_config: the model's config (`model.config`).
        profile: which KV heads are unstable: a `HeadProfile`, a path to a profile JSON, a shipped
            profile's model id, "auto" (calibrate online from the first decode steps, see
            calibration.py), or None: the shipped profile of this model if there is one, else "auto".
        config: a `FlexiCacheConfig`; or pass its fields (topk_pages, page_size, rerank_interval, ...)
            directly as keyword arguments.

    Full-attention layers are FlexiCache layers; sliding-window layers keep their window densely on the
    GPU, as transformers' own sliding layers do (their attention never reads further back).
    """

    def __init__(self, model_config, profile=None, *, config: FlexiCacheConfig | None = None, **knobs):
        if config is not None and knobs:
            raise ValueError(f"pass either config=FlexiCacheConfig(...) or its fields {sorted(knobs)}, not both")
        try:
            self.config = config or FlexiCacheConfig(**knobs)
        except TypeError as e:
            raise TypeError(f"FlexiCache: {e}; valid knobs are the fields of FlexiCacheConfig") from None
        text, kinds = check_model_config(model_config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if head_dim * self.config.sketch_bits % 8:
            fits = [b for b in (1, 2, 4) if head_dim * b % 8 == 0]
            raise ValueError(f"{self.config.scorer} needs head_dim * bits to be a multiple of 8 (this model's head_dim "
                             f"is {head_dim}): pass sketch_bits in {fits} or scorer=MinMaxBound()")
        num_layers = text.num_hidden_layers
        num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.profile = resolve_profile(profile, text, num_layers, num_kv_heads)
        self.auto = self.profile is None  # "auto": every head unstable until the calibration decides
        if self.auto and profile is None:  # the silent fallback: say what it costs and how to avoid it
            name = getattr(text, "_name_or_path", None) or text.model_type
            warnings.warn(f"FlexiCache: no shipped head profile for {name}, so it calibrates one online "
                          f"(profile='auto'): the first {self.config.calibration_steps} decode steps of the first "
                          "request hold every head on the GPU and that request runs uncompiled. Reuse this cache "
                          "(cache.reset() keeps the split), or save cache.profile (.save(path)) and pass profile=path",
                          stacklevel=2)
        self.paged = [i for i, kind in enumerate(kinds) if kind is None]
        from flexicache_hf.stability import resolve_count

        self.unstable_count = resolve_count(self.config.auto_unstable, len(self.paged) * num_kv_heads) if self.auto else None
        layers = [
            FlexiCacheLayer(i, num_kv_heads, self._unstable(i, num_kv_heads), self.config) if window is None
            else DynamicSlidingWindowLayer(sliding_window=window)
            for i, window in enumerate(kinds)
        ]
        self.decode_graphs = None  # graphs.py keeps this cache's captured decode steps here
        super().__init__(layers=layers)
        self._start_calibration()

    def _unstable(self, layer_idx: int, num_kv_heads: int) -> list[int]:
        return list(range(num_kv_heads)) if self.profile is None else self.profile.unstable_heads(layer_idx)

    @property
    def flexi_layers(self) -> list["FlexiCacheLayer"]:
        """The paged layers (full attention); sliding-window layers are transformers' own."""
        return [self.layers[i] for i in self.paged]

    def _start_calibration(self) -> None:
        """profile="auto": start recording; every paged head is unstable until it decides."""
        self.calibration = None
        if self.auto and self.paged:
            from flexicache_hf.calibration import OnlineCalibration

            cfg, layer = self.config, self.layers[self.paged[0]]
            self.profile = None
            self.calibration = OnlineCalibration(len(self.layers), layer.num_kv_heads, self.paged, cfg.calibration_steps,
                                                 self.unstable_count, cfg.topk_pages)
            self.calibration.finish = self._finish_calibration
        for layer in self.flexi_layers:
            layer.calibration = self.calibration
            if self.calibration is not None:
                layer.set_split(list(range(layer.num_kv_heads)))

    def reset(self) -> None:
        """Empty the cache for a new request (same model, any batch size). profile="auto": a split the calibration
        has decided stays (head stability is the model's, not the request's), so later requests run compiled on
        CUDA; a calibration that had not finished starts afresh."""
        super().reset()
        if self.calibration is not None and self.calibration.active:
            self._start_calibration()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """transformers asks this before every forward (eagerly, for a compiled decode step): each layer makes
        room for the coming token then, since a compiled step cannot grow a buffer (layer.get_mask_sizes)."""
        if query_length == 1 and not torch.compiler.is_compiling():
            sync_lengths([layer.memory for layer in self.flexi_layers if layer.is_initialized])
            for layer in self.flexi_layers:
                layer.ready_for_compiled_step()
        return super().get_mask_sizes(query_length, layer_idx)

    def record_selections(self, recorder=None):
        """Record the pages every head selects from the next decode step on (a recorder.SelectionRecorder,
        made if none is given; returned). Recording needs the Python side of each step: recorded steps run
        eagerly (no graph replay). `record_selections(False)` stops it."""
        if recorder is None:
            from flexicache_hf.recorder import SelectionRecorder

            recorder = SelectionRecorder(self.config.page_size)
        for layer in self.flexi_layers:
            layer.recorder = recorder or None
        return recorder

    def graph_state(self) -> GraphState | None:
        """The state a captured decode step depends on, or None when the next step must run eagerly."""
        if self.calibration is not None and self.calibration.active:
            return None
        if len(self.paged) != len(self.layers):  # sliding-window layers grow by concatenation: eager
            return None
        keys = [layer.step_key() for layer in self.layers]
        if any(k is None for k in keys):
            return None
        devices = {layer.device for layer in self.layers}
        if len(devices) != 1 or (device := devices.pop()).type != "cuda":
            return None
        if not ops.kernels_available(device, self.config.use_kernels):  # the references wait for the host
            return None
        return GraphState(device, tuple(k[0] for k in keys), tuple(k[1:] for k in keys))

    def _finish_calibration(self) -> None:
        self.profile = self.calibration.result = self.calibration.classify()
        for layer in self.flexi_layers:
            layer.calibration = None
            layer.repartition(self.profile.unstable_heads(layer.layer_idx))

    def full_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every K/V that `update()` received for this layer, bit-exact: [batch, kv_heads, seq_len, head_dim].
        A sliding-window layer holds only its window (all its attention can read), as in transformers."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, FlexiCacheLayer):
            raise ValueError(f"layer {layer_idx} is a sliding-window layer: it keeps only its last "
                             f"{layer.sliding_window} tokens, like transformers' own sliding layers")
        return layer.full_kv()

    def join_promotions(self) -> None:
        """Order the current stream after every layer's background promotion (a rerank's page copies). Each
        layer does this itself before it next touches its slots; graphs.py calls it at the end of a captured
        step, whose side-stream work must rejoin the capture, and before a replay."""
        for layer in self.flexi_layers:
            if layer.memory is not None:
                layer.memory.join()

    def memory_report(self) -> dict:
        """Bytes held by the cache, summed over layers; `dense_kv_bytes` is what a DynamicCache would hold.

        `gpu_reserved_bytes` / `host_reserved_bytes`: every byte the cache's tensors hold allocated (what a
        memory profiler sees), headroom included; the other figures count the bytes in use. `by_device`
        splits the same sums by the device of each layer (layers follow their inputs, so a model spread
        with `device_map` keeps each layer's pages on that layer's device)."""
        total: dict = {}
        by_device: dict = {}
        for layer in self.layers:
            if isinstance(layer, FlexiCacheLayer):
                report = layer.memory.report() if layer.is_initialized else dict.fromkeys(MEMORY_KEYS, 0)
            else:
                report = _window_report(layer)
            where = str(layer.device) if layer.is_initialized else "uninitialized"
            for key, value in report.items():
                total[key] = total.get(key, 0) + value
                dev = by_device.setdefault(where, {})
                dev[key] = dev.get(key, 0) + value
        total["by_device"] = by_device
        return total


MEMORY_KEYS = ("gpu_kv_bytes", "unstable_gpu_kv_bytes", "stable_gpu_kv_bytes", "host_kv_bytes", "metadata_bytes",
               "dense_kv_bytes", "gpu_reserved_bytes", "host_reserved_bytes")


def _window_report(layer) -> dict:
    """memory_report() of a sliding-window layer: its window, all of it on the device."""
    report = dict.fromkeys(MEMORY_KEYS, 0)
    if layer.is_initialized and layer.keys is not None and layer.keys.numel():
        held = layer.keys.nbytes + layer.values.nbytes
        # a DynamicCache built from the config holds the same window on this layer
        report.update(gpu_kv_bytes=held, unstable_gpu_kv_bytes=held, gpu_reserved_bytes=held, dense_kv_bytes=held)
    return report


def check_model_config(model_config):
    """The text config of a model FlexiCache can serve, and per layer its sliding window (None: a full
    attention layer, paged by FlexiCache). Refuses, before anything is allocated, what it cannot serve."""
    from transformers import PretrainedConfig

    if isinstance(model_config, torch.nn.Module):
        raise TypeError("FlexiCache takes the model's config: FlexiCache(model.config), not FlexiCache(model)")
    if not isinstance(model_config, PretrainedConfig):
        raise TypeError(f"FlexiCache takes a transformers model config (model.config), got {type(model_config).__name__}")
    if getattr(model_config, "is_encoder_decoder", False):
        raise NotImplementedError(
            f"{model_config.model_type} is an encoder-decoder model: FlexiCache serves decoder-only models "
            "(use transformers' EncoderDecoderCache for this one)")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if getattr(text, "kv_lora_rank", None):
        raise NotImplementedError(
            f"{text.model_type} uses multi-head latent attention (compressed K/V, kv_lora_rank="
            f"{text.kv_lora_rank}): FlexiCache pages per-head keys and values and cannot serve it")
    impl = getattr(text, "_attn_implementation", None) or getattr(model_config, "_attn_implementation", None)
    if impl not in (None, "flexicache"):
        raise ValueError(
            f'the model uses attn_implementation="{impl}"; FlexiCache needs the model loaded with '
            'attn_implementation="flexicache" (after `import flexicache_hf`)'
        )
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None) or (
        ["sliding_attention" if window else "full_attention"] * text.num_hidden_layers)
    odd = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if odd:
        raise NotImplementedError(f"FlexiCache serves full and sliding-window attention layers; this model has {odd} layers")
    if "sliding_attention" in layer_types and not window:
        raise ValueError(f"{text.model_type}: layer_types names sliding layers but the config has no sliding_window")
    if "full_attention" not in layer_types:
        warnings.warn(f"every layer of this {text.model_type} model is a sliding-window layer (window {window}): "
                      "FlexiCache pages none of them, and holds what transformers' own sliding cache would", stacklevel=3)
    return text, [window if t == "sliding_attention" else None for t in layer_types]


def resolve_profile(profile, model_config, num_layers: int, num_kv_heads: int) -> HeadProfile | None:
    """The HeadProfile to use, or None for online calibration ("auto")."""
    from flexicache_hf.profiles_registry import find_profile

    model_id = getattr(model_config, "_name_or_path", None) or None
    if isinstance(profile, str) and profile == "auto":
        return None
    if isinstance(profile, os.PathLike) or (isinstance(profile, str) and os.path.exists(profile)):
        profile = HeadProfile.load(profile)
    elif isinstance(profile, str):
        found = find_profile(profile)
        if found is None:
            raise ValueError(f"profile={profile!r} is neither a file nor the model id of a shipped profile")
        profile = found
    elif profile is None:
        profile = find_profile(model_config)
        if profile is None:
            return None  # no shipped profile for this model: calibrate online
    if not isinstance(profile, HeadProfile):
        raise TypeError(f"profile must be a HeadProfile, a path, a model id or 'auto', got {type(profile).__name__}")
    profile.check_model(num_layers, num_kv_heads, model_id)
    return profile
