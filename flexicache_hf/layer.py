"""The transformers side of one layer: `FlexiCacheLayer` (a CacheLayerMixin) and the attention function
registered as attn_implementation="flexicache".

    update()  stores the new K/V in the layer's memory (memory/: GPU pages, slots, host pool)
    attend()  called by the attention function with the query: a multi-token forward (prefill, chunked
              prefill, verification) runs HF's sdpa over the whole context; a one-token decode step runs
              decode.decode_step (select pages, attend to them)

Layer state is the memory's: its length and the length at the last multi-token forward (every head selects
afresh after one); the step kind (DecodeFlags) is derived from the two.

Under torch.compile (generate() compiles the decode step on CUDA: `is_compileable`) a decode step reads no
Python state that changes from step to step except its kind, `next_flags`, so three compiled graphs serve
every step: plain steps (no new page, no fill, no rerank: most steps) run DecodeFlags.PLAIN, a lean graph
without the stable heads' selection, promotion and page summary; page steps (a new page or a fill, no rerank)
run DecodeFlags.PAGE, which starts the page or summarises it as the device decides; reranks (and the
warm-up) run `append_token(k, v, None, None)` and decode_step with flags=None, which decide everything on the
device. Before each step, transformers asks the cache for the mask sizes (eagerly, in
prepare_inputs_for_generation): that is where room for the step's token is made, since a compiled step cannot
grow a buffer, and `next_flags` is set.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flexicache_hf.config import FlexiCacheConfig
from flexicache_hf.decode import DecodeFlags, decode_step
from flexicache_hf.memory import LayerMemory

NAME = "flexicache"


class FlexiKV:
    """What `update()` hands back to the model: the model passes it on to our attention function.

    It is not a tensor: any other attention code that reads it (a model switched to another
    attn_implementation after the cache was built) gets an error that says what to change."""

    __slots__ = ("layer",)

    def __init__(self, layer: "FlexiCacheLayer"):
        self.layer = layer

    def __getattr__(self, name):
        if name.startswith("__"):  # Python's own protocol lookups (copy, pickle, torch.compile's tracer)
            raise AttributeError(name)
        raise TypeError(
            f"FlexiCache's keys/values were read as a tensor (.{name}) by attention code other than FlexiCache's: "
            'load the model with attn_implementation="flexicache" (after `import flexicache_hf`) and keep it '
            "(model.set_attn_implementation(...) to another one needs another cache, e.g. DynamicCache)"
        )


class WholeContext:
    """FlexiCacheLayer's operations on the whole context: read it, crop it, re-page it, reorder the batch."""

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            raise ValueError(f"layer {self.layer_idx} holds no K/V yet: run a forward pass first")
        return self.memory.full_kv()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens (negative argument), or keep the first `n` (positive, the legacy form)."""
        if not self.is_initialized:
            return
        keep = self.length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self.length)
        if keep < 0:
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens from a cache holding {self.length}")
        if keep != self.length:
            keys, values = self.full_kv()
            self.rebuild(keys[:, :, :keep], values[:, :, :keep], self.memory.valid_tokens(keep).clone())

    def rebuild(self, keys, values, valid) -> None:
        """Re-page a whole context (crop, repartition, a prefill made elsewhere): the storage rules of a
        prefill; every head selects afresh at the next decode step (new buffers: keys/values may be views of
        the old ones)."""
        self.release()
        self.update(keys, values)
        self.pending = None
        self.memory.mark_valid(valid, 0)
        self.memory.summarise_pages(0, keys=keys)

    def repartition(self, unstable_heads: list[int]) -> None:
        """Move to a new stable/unstable split (after online calibration); every K/V is kept."""
        if not self.is_initialized:
            return self.set_split(unstable_heads)
        keys, values = self.full_kv()
        valid = self.memory.valid_tokens(self.length).clone()
        self.set_split(unstable_heads)
        self.rebuild(keys, values, valid)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self.length > 0:
            self.memory.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.memory.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.memory.select_batch(torch.arange(self.memory.batch, device=self.device).repeat_interleave(repeats))


class FlexiCacheLayer(WholeContext, CacheLayerMixin):
    is_croppable = True
    is_sliding = False

    def __init__(self, layer_idx: int, num_kv_heads: int, unstable_heads: list[int], config: FlexiCacheConfig):
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.cfg = layer_idx, num_kv_heads, config
        self.set_split(unstable_heads)
        self.memory: LayerMemory | None = None
        # what update() leaves for attend(): (start, n, keys, values, chunk, flags); keys None for a decode step,
        # whose flags are None where a compiled step decides its kind on the device
        self.pending = None
        self.calibration = None  # profile="auto": the cache's OnlineCalibration while it records
        self.recorder = None  # a SelectionRecorder (cache.record_selections): sees every selection, eager steps only
        # the next compiled step's kind, set eagerly before it: DecodeFlags.PLAIN or .PAGE, or None (decided on the
        # device: reranks, the warm-up, and any step get_mask_sizes did not ready)
        self.next_flags = None

    def set_split(self, unstable_heads: list[int]) -> None:
        """Which heads are unstable (GPU pages) and stable (slots + host pool), from the next initialisation
        on (repartition() re-pages a layer that holds K/V)."""
        self.unstable = sorted(unstable_heads)
        self.stable = [h for h in range(self.num_kv_heads) if h not in set(self.unstable)]

    @property
    def is_compileable(self) -> bool:
        """Whether generate() may compile decode steps: not while a step must run Python (online
        calibration, a selection recorder) or without kernels (the references wait for the host)."""
        return self.calibration is None and self.recorder is None and self.cfg.use_kernels is not False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, T, D = key_states.shape
        if H != self.num_kv_heads:
            raise ValueError(f"layer {self.layer_idx}: got {H} KV heads, the cache was built for {self.num_kv_heads}")
        m = self.memory
        if m is not None and (m.batch, m.dtype, m.device) == (B, key_states.dtype, key_states.device) and \
                m.unstable_heads.tolist() == self.unstable:
            m.clear()  # a reused cache: same buffers, so compiled and captured graphs stay valid
            self.is_initialized = True
            return
        scorer, ps, kernels = self.cfg.scorer, self.cfg.page_size, self.cfg.use_kernels
        self.memory = LayerMemory(key_states, self.unstable, self.cfg,
                                  lambda keys, valid: scorer.summarise(keys, valid, ps, kernels))
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @property
    def length(self) -> int:
        return self.memory.length if self.is_initialized else 0

    def decode_flags(self, as_if_stable: bool = False) -> DecodeFlags:
        m, c = self.memory, self.cfg
        has_stable = as_if_stable or m.stable is not None
        return DecodeFlags.at(m.length, m.selected_at, c.page_size, c.rerank_interval, has_stable, c.warmup_steps)

    # ---- update: store -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # inference only: stored K/V never join an autograd graph (the attention function says so on backward)
        key_states, value_states = key_states.detach(), value_states.detach()
        if torch.compiler.is_compiling():
            return self._update_compiled(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.memory.batch:
            raise ValueError(f"layer {self.layer_idx}: batch size changed from {self.memory.batch} to "
                             f"{key_states.shape[0]}; call cache.reset() (or use a fresh FlexiCache) before a new request")
        start, n = self.length, key_states.shape[2]
        if n == 1 and start > 0:  # decode step
            flags = self.decode_flags()
            self.memory.append_token(key_states, value_states, flags.new_page, flags.fill)
            self.pending = (start, n, None, None, None, flags)
        else:
            chunk = self.memory.append(key_states, value_states)
            self.pending = (start, n, key_states, value_states, chunk, None)
        handle = FlexiKV(self)
        return handle, handle

    def _update_compiled(self, key_states, value_states):
        if key_states.shape[2] != 1 or not self.is_initialized:
            raise RuntimeError("FlexiCache compiles decode steps only: run the prefill (the first forward of a "
                               "request, and any multi-token forward) without torch.compile, as generate() does")
        # the step kind is Python state that torch.compile guards on: three graphs (plain, page, rerank); each
        # step consumes it, so a step not readied by get_mask_sizes runs the graph that decides all on the device
        flags, self.next_flags = self.next_flags, None
        self.memory.append_token(key_states, value_states, *(flags[:2] if flags is not None else (None, None)))
        self.pending = (None, 1, None, None, None, flags)
        handle = FlexiKV(self)
        return handle, handle

    # ---- attend --------------------------------------------------------------------------------
    def attend(self, module, query, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if self.pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: attention called without a preceding cache update")
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("FlexiCache does not support attention logit softcapping (softcap)")
        scale = scaling if scaling is not None else module.scaling
        start, n, keys, values, chunk, flags = self.pending
        self.pending = None
        if keys is None:  # a decode step
            return self._decode(query, scale, flags), None
        self._record_validity(attention_mask, start, n)
        sdpa = lambda q, k, v: sdpa_attention_forward(  # noqa: E731
            module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if start == 0:  # the new keys are the whole context: exactly HF's sdpa
            self.memory.summarise_pages(0, keys=keys)
            return sdpa(query, keys, values)
        # later chunks (chunked prefill, multi-turn, verification): each head group attends to its own
        # context, so the whole layer's K/V is never copied into one tensor (that copy set the peak memory)
        parts = self.memory.context(chunk)
        self.memory.summarise_pages(start // self.cfg.page_size, keys_by_group=[k for _, k, _ in parts])
        if len(parts) == 1:
            return sdpa(query, *parts[0][1:])
        B, Hq, T, D = query.shape
        G = Hq // self.num_kv_heads
        out = query.new_empty(B, T, Hq, D)
        for heads, k, v in parts:
            q_heads = (heads.view(-1, 1) * G + torch.arange(G, device=heads.device)).view(-1)
            out[:, :, q_heads] = sdpa(query.index_select(1, q_heads), k, v)[0]
        return out, None

    def _record_validity(self, mask, start, n):
        if mask is None:
            return  # causal without padding: every new token is valid
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise NotImplementedError(f"FlexiCache needs a 4D attention mask or None, got {type(mask).__name__}")
        row = mask[:, 0, -1, start : start + n]
        self.memory.mark_valid(row if row.dtype == torch.bool else row == 0, start)  # additive: 0 attends

    def _decode(self, query: torch.Tensor, scale: float, flags: DecodeFlags | None) -> torch.Tensor:
        B, Hq, _, D = query.shape
        q = query.reshape(B, self.num_kv_heads, Hq // self.num_kv_heads, D)
        record, cal, rec = None, self.calibration, self.recorder
        if flags is not None and (cal is not None or rec is not None):  # nothing at all is recorded unless asked for
            position, full = self.memory.length, self.memory.full_pages

            def record(group, pages):
                if cal is not None and group == "unstable":
                    cal.record(self.layer_idx, pages, full)
                if rec is not None:
                    rec.record(self.layer_idx, position, self.unstable if group == "unstable" else self.stable, pages)
        out = decode_step(q, self.memory, self.cfg.scorer, flags, self.cfg.topk_pages, scale, self.cfg.use_kernels, record)
        if cal is not None and cal.ready() and self.layer_idx == cal.last_layer:
            cal.finish()
        return out.reshape(B, 1, Hq, D)

    # ---- what graphs.py needs ------------------------------------------------------------------
    def step_key(self):
        """(flags, buffer identity) of the next decode step, or None if it must run eagerly."""
        if not self.is_initialized or self.length == 0 or self.recorder is not None:
            return None
        flags = self.decode_flags()
        buffers = self.memory.graph_buffers(flags.fill)
        return None if buffers is None else (flags, *buffers)

    def count_replayed_step(self) -> None:
        """A replayed decode step ran only the device side: the length advances here."""
        self.memory.length += 1

    def ready_for_compiled_step(self) -> None:
        if self.is_initialized and self.length > 0:
            self.memory.ready_for_static_step()
            # the kind as if the layer had stable heads: every layer then takes the same kind at each step, so
            # one graph serves each kind (a layer without stable heads runs the rerank graph's append, harmlessly)
            flags = self.decode_flags(as_if_stable=True)
            self.next_flags = None if flags.rerank else DecodeFlags.PAGE if flags.new_page or flags.fill else DecodeFlags.PLAIN

    def get_seq_length(self) -> int:
        if torch.compiler.is_compiling():  # the length as a tensor, as transformers' static layers give it
            return self.memory.pos[0] if self.memory is not None else 0
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """A decode step's mask covers the reserved capacity, as a static cache's does (its shape must not
        change from step to step under torch.compile); FlexiCache's decode attention reads validity from
        the cache, never the mask. Asked eagerly before a compiled step: room for its token is made here."""
        if torch.compiler.is_compiling():
            return (self.memory.capacity if self.is_initialized else query_length), 0
        if query_length == 1 and self.length > 0:
            self.ready_for_compiled_step()
            return self.memory.capacity, 0
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Empty; the memory's buffers stay for the next request if it fits them (lazy_initialization)."""
        if getattr(self, "memory", None) is not None:
            self.memory.join()  # a background promotion writes the slots being dropped
        self.pending, self.is_initialized = None, False

    def release(self) -> None:
        """Empty and drop every buffer."""
        self.reset()
        self.memory = None


# ---- attn_implementation="flexicache" ---------------------------------------------------------------
class _InferenceOnly(torch.autograd.Function):
    """Identity forward; a backward through FlexiCache attention says why it cannot be (the cache stores
    detached K/V and selects pages: there is no gradient to give)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "FlexiCache is inference-only: no gradient flows through its attention. Run generation under "
            "torch.no_grad() (generate() does), and train with another cache or none (use_cache=False)")


def flexicache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """With a FlexiCache the model hands us the FlexiKV that update() returned and the layer does the rest;
    with any other cache (or none), and on sliding-window layers (a FlexiCache keeps them as transformers'
    own dense window), this is plain sdpa."""
    if isinstance(key, FlexiKV):
        out, weights = key.layer.attend(module, query, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return (_InferenceOnly.apply(out) if out.requires_grad else out), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def flexicache_mask(*args, **kwargs):
    """HF's sdpa boolean mask (None when a plain causal mask suffices): prefill runs exactly as sdpa does.
    It must be registered beside the attention function: without it transformers drops the padding mask."""
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, flexicache_attention)
    AttentionMaskInterface.register(NAME, flexicache_mask)
