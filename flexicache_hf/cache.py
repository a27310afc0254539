"""FlexiCache: a transformers `Cache` of `FlexiCacheLayer`s, and the decode path of one layer.

    update()  stores the new K/V (memory.py decides where: GPU buffer, GPU slots, host pool)
    attend()  called by the registered attention function (attention.py) with the query:
              multi-token forwards (prefill, chunked prefill, verification) run dense attention over
              the whole context; a one-token decode step selects pages (MinMax scores, top-K) and runs
              sparse paged attention over them (ops.py).

Unstable heads select their top-K pages every decode step; stable heads every `rerank_interval`
steps, attending in between to their selection plus the pages created since (the tail). The page that
holds the newest token (the current page) is always attended. Nothing is ever dropped: `full_kv`
reassembles every K/V that `update()` received.

The decode step has fixed shapes and no host sync: the token's position lives on the device (`pos_t`),
pages are scored over the whole capacity with the non-candidates masked, and the Python-side counters
advance in one place (`advance_decode`), so graphs.py can capture a step and replay it.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from flexicache_hf import ops
from flexicache_hf.config import FlexiCacheConfig
from flexicache_hf.memory import DenseHeads, OffloadedHeads, capacity_for, reserved_bytes
from flexicache_hf.profiles import HeadProfile


class FlexiKV:
    """What `update()` hands back to the model: the model passes it on to our attention function.

    It is not a tensor: any other attention code that reads it (a model switched to another
    attn_implementation after the cache was built) gets an error that says what to change."""

    __slots__ = ("layer",)

    def __init__(self, layer: "FlexiCacheLayer"):
        self.layer = layer

    def __getattr__(self, name):
        raise TypeError(
            f"FlexiCache's keys/values were read as a tensor (.{name}) by attention code other than FlexiCache's: "
            'load the model with attn_implementation="flexicache" (after `import flexicache_hf`) and keep it '
            "(model.set_attn_implementation(...) to another one needs another cache, e.g. DynamicCache)"
        )


class DecodeFlags(NamedTuple):
    """What a decode step does besides select + attend; decided by Python-side counters before the step."""

    new_page: bool  # the token starts a page: stable heads give it a slot
    fill: bool  # the token fills its page: MinMax metadata, and the stable heads' page goes to the host pool
    rerank: bool  # stable heads re-select and promote


class GraphState(NamedTuple):
    """What a captured decode step depends on (graphs.py): its device, each layer's step kind, and the
    identity of each layer's buffers (a version counter and capacities)."""

    device: torch.device
    flags: tuple
    buffers: tuple


class FlexiCacheLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, layer_idx: int, num_kv_heads: int, unstable_heads: list[int], config: FlexiCacheConfig):
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.cfg = layer_idx, num_kv_heads, config
        self.set_split(unstable_heads)
        self.length = 0
        self.version = 0  # bumped whenever state tensors are replaced: captured decode graphs go stale
        self.calibration = None  # profile="auto": shared OnlineCalibration while it records

    # ---- set-up --------------------------------------------------------------------------------
    def set_split(self, unstable_heads: list[int]) -> None:
        """Which heads are unstable (GPU pages) and stable (slots + host pool); takes effect at the next
        lazy initialisation (repartition() re-pages a layer that holds K/V)."""
        self.unstable = sorted(unstable_heads)
        self.stable = [h for h in range(self.num_kv_heads) if h not in set(self.unstable)]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, T, D = key_states.shape
        if H != self.num_kv_heads:
            raise ValueError(f"layer {self.layer_idx}: got {H} KV heads, the cache was built for {self.num_kv_heads}")
        if D * self.cfg.sketch_bits % 8:
            fits = [b for b in (1, 2, 4) if D * b % 8 == 0]
            raise ValueError(f"sketch_bits={self.cfg.sketch_bits} needs head_dim * sketch_bits to be a multiple of 8 "
                             f"(head_dim is {D}); use sketch_bits in {[0] + fits}")
        self.batch, self.head_dim = B, D
        self.dtype, self.device = key_states.dtype, key_states.device
        ps, cfg = self.cfg.page_size, self.cfg
        if cfg.max_cache_len is not None and cfg.max_cache_len >= T:
            pages = math.ceil(cfg.max_cache_len / ps)
        else:
            pages = capacity_for(math.ceil(max(T, 1) / ps), cfg.host_headroom_pages)
        self.dense = self.offloaded = None
        if self.unstable:
            self.dense = DenseHeads(B, len(self.unstable), D, ps, pages, cfg.sketch_bits, self.dtype, self.device)
        if self.stable:
            self.offloaded = OffloadedHeads(B, len(self.stable), D, ps, cfg.resident_slots, pages, pages,
                                            cfg.sketch_bits, self.dtype, self.device, cfg.host_headroom_pages)
        self.u_idx = torch.tensor(self.unstable, device=self.device, dtype=torch.long)
        self.s_idx = torch.tensor(self.stable, device=self.device, dtype=torch.long)
        # kv_valid[b, pos]: written and not padding (from the attention mask); page_valid: any such token
        self.kv_valid = torch.zeros(B, pages * ps, dtype=torch.bool, device=self.device)
        self.page_valid = torch.zeros(B, pages, dtype=torch.bool, device=self.device)
        self.pos_t = torch.zeros(1, dtype=torch.long, device=self.device)  # = length, on the device
        self._page_offsets = torch.arange(ps, device=self.device)
        self.length = 0
        self.version += 1
        self.meta_pages = 0  # pages 0 .. meta_pages-1 have selection metadata
        self.decode_steps = 0  # since the last full selection
        self.need_select = True  # after any multi-token forward every head selects afresh
        self.pending = None
        self.is_initialized = True

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Split [B, H, ...] into the unstable and the stable head groups."""
        if not self.stable:
            return x, None
        if not self.unstable:
            return None, x
        return x.index_select(1, self.u_idx), x.index_select(1, self.s_idx)

    def _merge(self, u: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
        if s is None or u is None:
            return u if s is None else s
        out = u.new_empty(u.shape[0], self.num_kv_heads, *u.shape[2:])
        out[:, self.u_idx] = u
        out[:, self.s_idx] = s
        return out

    def _reserve(self, length: int) -> None:
        if self._fits(length):
            return
        self.version += 1
        pages = capacity_for(math.ceil(length / self.cfg.page_size), self.cfg.host_headroom_pages)
        if pages > self.page_valid.shape[1]:
            self.kv_valid = _grow_cols(self.kv_valid, pages * self.cfg.page_size)
            self.page_valid = _grow_cols(self.page_valid, pages)
        if self.dense is not None:
            self.dense.reserve(pages)
        if self.offloaded is not None:
            self.offloaded.meta.reserve(pages)

    # ---- update: store -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # inference only: stored K/V never join an autograd graph (attention.py makes backward say so)
        key_states, value_states = key_states.detach(), value_states.detach()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.batch:
            raise ValueError(
                f"layer {self.layer_idx}: batch size changed from {self.batch} to {key_states.shape[0]}; "
                "call cache.reset() (or use a fresh FlexiCache) before a new request"
            )
        start, n = self.length, key_states.shape[2]
        self._reserve(start + n)
        handle = FlexiKV(self)
        if n == 1 and start > 0:  # decode step
            flags = self.decode_flags()
            self._store_token(key_states, value_states, flags)
            self.pending = (start, n, None, None, None, flags)
            return handle, handle
        k_u, k_s = self._split(key_states)
        v_u, v_s = self._split(value_states)
        if self.dense is not None:
            self.dense.write(k_u, v_u, start)
        stable_chunk = self._store_stable(k_s, v_s, start) if self.offloaded is not None else None
        self.kv_valid[:, start : start + n] = True  # refined from the attention mask in attend()
        self.length = start + n
        self.pos_t.fill_(self.length)
        self.pending = (start, n, key_states, value_states, stable_chunk, None)
        return handle, handle

    def decode_flags(self) -> DecodeFlags:
        L, ps = self.length, self.cfg.page_size
        rerank = self.offloaded is not None and (self.need_select or self.decode_steps % self.cfg.rerank_interval == 0)
        return DecodeFlags(new_page=L % ps == 0, fill=(L + 1) % ps == 0, rerank=rerank)

    def _store_token(self, k, v, flags: DecodeFlags) -> None:
        """Decode: one token at position pos_t; a token is always valid (its own attention mask entry)."""
        k_u, k_s = self._split(k)
        v_u, v_s = self._split(v)
        pos = self.pos_t
        if self.dense is not None:
            self.dense.write_at(k_u, v_u, pos)
        if self.offloaded is not None:
            self.offloaded.write_token(k_s, v_s, pos, flags.new_page)
        self.kv_valid.index_fill_(1, pos, True)
        if flags.fill:
            page = pos // self.cfg.page_size
            self._page_metadata(page)
            if self.offloaded is not None:
                self.offloaded.offload_current(page)

    def _page_metadata(self, page: torch.Tensor) -> None:
        """MinMax metadata of page `page` (device tensor [1]), whose keys are all on the GPU."""
        ps = self.cfg.page_size
        tokens = page * ps + self._page_offsets
        valid = self.kv_valid.index_select(1, tokens)  # [B, ps]
        for group in (self.dense, self.offloaded):
            if group is None:
                continue
            keys = group.k.index_select(2, tokens) if group is self.dense else group.current_page()[0][:, :, 0]
            group.meta.write(page, *self._metadata(keys, valid))
        self.page_valid.index_copy_(1, page, valid.any(-1, keepdim=True))

    def advance_decode(self, flags: DecodeFlags) -> None:
        """Every Python-side effect of one decode step (a replayed graph runs only the device side)."""
        self.length += 1
        self.decode_steps += 1
        self.need_select = False
        if flags.fill:
            self.meta_pages += 1
            if self.offloaded is not None:
                self.offloaded.host_len += 1

    def _fits(self, tokens: int) -> bool:
        """Whether `tokens` tokens fit without growing any buffer."""
        pages = math.ceil(tokens / self.cfg.page_size)
        caps = [self.page_valid.shape[1], self.kv_valid.shape[1] // self.cfg.page_size]
        caps += [g.meta.capacity_pages for g in (self.dense, self.offloaded) if g is not None]
        return pages <= min(caps)

    def graph_key(self):
        """What a captured decode step of this layer depends on, or None if the next step cannot be captured
        (not a CUDA decode step, a buffer would grow, a prefill offload is still to be waited for)."""
        return self.step_key() if self.is_initialized and self.device.type == "cuda" else None

    def step_key(self):
        """graph_key() on any device: (flags, buffer identity) of the next decode step, or None if that step
        must run eagerly."""
        if not self.is_initialized or self.length == 0 or not self._fits(self.length + 1):
            return None
        flags = self.decode_flags()
        off = self.offloaded
        host = 0
        if off is not None:
            if off.offloaded is not None or (flags.fill and off.host_len >= off.host_k.shape[0]):
                return None
            host = off.host_k.shape[0]
        return flags, self.version, self.kv_valid.shape[1], host

    def _store_stable(self, k, v, start):
        """Multi-token: current page into its GPU slot; every page that fills goes to the host pool, once."""
        off, ps = self.offloaded, self.cfg.page_size
        # multi-token: complete the partial current page, offload all full pages, keep the remainder
        # resident; every head re-selects (and promotes) at the next decode step.
        first = start - start % ps
        if start % ps:
            ck, cv = off.current_page()
            k = torch.cat([ck[:, :, 0, : start % ps], k], dim=2)
            v = torch.cat([cv[:, :, 0, : start % ps], v], dim=2)
        B, H, T, D = k.shape
        full = T // ps
        off.offload(first // ps, k[:, :, : full * ps].reshape(B, H, full, ps, D), v[:, :, : full * ps].reshape(B, H, full, ps, D))
        off.clear_slots()
        if T % ps:
            off.start_page(first // ps + full)
            off.write_current(k[:, :, full * ps :], v[:, :, full * ps :], 0)
        return first, k, v

    # ---- attend: select and attend -------------------------------------------------------------
    def attend(self, module, query, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if self.pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: attention called without a preceding cache update")
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("FlexiCache does not support attention logit softcapping (softcap)")
        start, n, key_states, value_states, stable_chunk, flags = self.pending
        self.pending = None
        if flags is not None:
            return self._decode(query, scaling if scaling is not None else module.scaling, flags), None
        self._record_validity(attention_mask, start, n)
        # multi-token forward: dense attention over the whole context, exactly as HF's sdpa
        self.need_select, self.decode_steps = True, 0
        sdpa = lambda q, k, v: sdpa_attention_forward(  # noqa: E731
            module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if start == 0:  # the new keys are the whole context
            self._write_metadata(merged=key_states)
            return sdpa(query, key_states, value_states)
        # later chunks (chunked prefill, multi-turn, verification): each head group attends to its own
        # context, so the whole layer's K/V is never copied into one tensor (that copy set the peak memory)
        parts = []
        if self.dense is not None:
            parts.append((self.dense, self.u_idx, *self.dense.read(self.length)))
        if self.offloaded is not None:
            parts.append((self.offloaded, self.s_idx, *self._stable_context(stable_chunk)))
        self._write_metadata(by_group=[(group, k) for group, _, k, _ in parts])
        if len(parts) == 1:
            return sdpa(query, *parts[0][2:])
        B, Hq, T, D = query.shape
        G = Hq // self.num_kv_heads
        out = query.new_empty(B, T, Hq, D)
        for _, heads, k, v in parts:
            q_heads = (heads.view(-1, 1) * G + torch.arange(G, device=heads.device)).view(-1)
            out[:, :, q_heads] = sdpa(query.index_select(1, q_heads), k, v)[0]
        return out, None

    def _record_validity(self, mask, start, n):
        if mask is None:
            return  # causal without padding: update() already marked the new tokens valid
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise NotImplementedError(f"FlexiCache needs a 4D attention mask or None, got {type(mask).__name__}")
        row = mask[:, 0, -1, start : start + n]
        if row.dtype != torch.bool:
            row = row == 0  # additive float mask: 0 attends, -inf / dtype-min does not
        self.kv_valid[:, start : start + n] = row.expand(self.batch, -1)

    def _metadata(self, keys, valid):
        """Selection metadata of whole pages: keys [B, H, n * page_size, D], valid [B, n * page_size] ->
        kmin, kmax [B, H, n, D] and the key sketch codes (None unless sketch_bits; memory.PageMetadata)."""
        ps, bits = self.cfg.page_size, self.cfg.sketch_bits
        kmin, kmax = ops.page_minmax(keys, valid, ps, self.cfg.use_kernels)
        return kmin, kmax, ops.page_sketch(keys, valid, kmin, kmax, ps, bits) if bits else None

    def _write_metadata(self, merged=None, by_group=None) -> None:
        """Selection metadata for the pages that filled since the last call, from the whole context's keys:
        `merged` [B, H, T, D] for every head, or `by_group` [(group, keys of its heads)]."""
        ps = self.cfg.page_size
        p0, p1 = self.meta_pages, self.length // ps
        if p1 <= p0:
            return
        lo, hi = p0 * ps, p1 * ps
        valid = self.kv_valid[:, p0 * ps : p1 * ps]
        if merged is not None:
            meta = [self._split(t) if t is not None else (None, None) for t in self._metadata(merged[:, :, lo:hi], valid)]
            pieces = zip((self.dense, self.offloaded), *meta)
        else:
            pieces = [(g, *self._metadata(k[:, :, lo:hi], valid)) for g, k in by_group]
        for group, *meta in pieces:
            if group is not None:
                group.meta.write(slice(p0, p1), *meta)
        self.page_valid[:, p0:p1] = valid.view(self.batch, -1, ps).any(-1)
        self.meta_pages = p1

    def _decode(self, query: torch.Tensor, scale: float, flags: DecodeFlags) -> torch.Tensor:
        current = self.pos_t // self.cfg.page_size  # the page that holds the new token, [1] on the device
        B, Hq, _, D = query.shape
        q = query.reshape(B, self.num_kv_heads, Hq // self.num_kv_heads, D)
        groups = []
        if self.dense is not None:  # unstable heads: select every step; the current page is the last entry
            table = self._select(q, self.u_idx, self.dense, current, scale, append_current=True)
            if self.calibration is not None:
                self.calibration.record(self.layer_idx, table[..., :-1], self.length // self.cfg.page_size)
            groups.append(ops.PageGroup(*self.dense.page_pools(), table, self.u_idx, by_entry=False, pending=True))
        promote = None
        if self.offloaded is not None:  # stable heads: every resident slot, re-selected at a rerank
            if flags.rerank:
                selected = self._select(q, self.s_idx, self.offloaded, current, scale)
                if self.need_select:  # the first decode step uses its top-K at once (nothing resident yet)
                    self.offloaded.promote(selected, current)
                else:  # a periodic rerank: this step still reads the old set, the new one from the next
                    promote = selected  # step on, its pages copied meanwhile (REFERENCE.md section 5)
            # first in the launch: with programmatic dependent launch its rows start before the unstable
            # heads' selection has finished (the unstable rows, later in the grid, wait for their table)
            groups.insert(0, ops.PageGroup(*self.offloaded.page_pools(), self.offloaded.slot_page, self.s_idx,
                                           by_entry=True, pending=flags.rerank and promote is None))
        # both head groups in one launch; a second stream running the unstable heads' selection beside
        # the stable heads' attention measured 0-10% faster per layer in CUDA graphs and added host time
        out = ops.paged_decode_attention(q, groups, self.kv_valid, scale, self.cfg.use_kernels)
        if promote is not None:
            self.offloaded.promote_in_background(promote, current)
        self.pos_t.add_(1)
        self.advance_decode(flags)
        if self.calibration is not None and self.calibration.ready() and self.layer_idx == self.calibration.num_layers - 1:
            self.calibration.finish()
        return out.reshape(B, 1, Hq, D)

    def _select(self, q: torch.Tensor, heads, group, current: torch.Tensor, scale: float, append_current=False
                ) -> torch.Tensor:
        """Top-K pages among the valid full pages before `current`, for the heads `heads` of the layer's
        query q [B, H, G, D] (the rows of `group`): [B, Hg, K] ids, best first, then -1
        (ops.select_pages_ref), with append_current `current` as a last column. Scores cover the whole
        metadata capacity (a fixed shape) with the non-candidates masked; with at most K candidates
        every one is selected. With key sketches ranked by mass, `scale` (the softmax scale) turns their
        q.k into the logits whose mass is predicted."""
        kmin, kmax, codes = group.meta.rows()
        mass_scale = scale if codes is not None and self.cfg.sketch_score == "mass" else None
        ids = ops.select_pages(
            q, kmin, kmax, self.page_valid, current, self.cfg.topk_pages, append_current, heads,
            self.cfg.use_kernels, self.cfg.score_spread, codes, mass_scale,
        )
        return ids.view(self.batch, len(heads), -1)

    # ---- whole-context views -------------------------------------------------------------------
    def _assemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every K/V of this layer, [B, H, length, D], from the GPU buffer, the host pool and the slots."""
        k_u = v_u = k_s = v_s = None
        if self.dense is not None:
            k_u, v_u = self.dense.read(self.length)
        if self.offloaded is not None:
            k_s, v_s = self._stable_context()
        return self._merge(k_u, k_s), self._merge(v_u, v_s)

    def _stable_context(self, stable_chunk=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every K/V of the stable heads, [B, Hs, length, D]: host pages, then the newest tokens (the chunk a
        multi-token update kept, or the partial current page), each copied once into the result."""
        L, ps, off = self.length, self.cfg.page_size, self.offloaded
        if stable_chunk is not None:
            first, tail_k, tail_v = stable_chunk
        else:
            first = off.host_len * ps
            ck, cv = off.current_page()
            tail_k, tail_v = ck[:, :, 0, : L - first], cv[:, :, 0, : L - first]
        B, H, D = self.batch, len(self.stable), self.head_dim
        k = torch.empty(B, H, L, D, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        if first:
            for dst, src in zip((k, v), off.host_pages(0, first // ps)):
                dst[:, :, :first].view(B, H, first // ps, ps, D).copy_(src)
        k[:, :, first:] = tail_k
        v[:, :, first:] = tail_v
        return k, v

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            raise ValueError(f"layer {self.layer_idx} holds no K/V yet: run a forward pass first")
        return self._assemble()

    # ---- CacheLayerMixin -----------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if getattr(self, "offloaded", None) is not None:  # (reset also runs before lazy initialisation)
            self.offloaded.join()  # a background promotion writes the slots being dropped
        for name in ("dense", "offloaded", "kv_valid", "page_valid", "pending"):
            setattr(self, name, None)
        self.length, self.is_initialized = 0, False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens (negative argument), or keep the first `n` (positive, the legacy form)."""
        if not self.is_initialized:
            return
        keep = self.length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self.length)
        if keep == self.length:
            return
        if keep < 0:
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens from a cache holding {self.length}")
        keys, values = self._assemble()
        valid = self.kv_valid[:, :keep].clone()
        self._rebuild(keys[:, :, :keep], values[:, :, :keep], valid)

    def _rebuild(self, keys, values, valid) -> None:
        """Re-page a whole context (crop): same storage rules as a prefill, every head re-selects."""
        self.reset()
        self.update(keys, values)
        self.kv_valid[:, : keys.shape[2]] = valid
        self.pending = None
        self._write_metadata(merged=keys)
        self.need_select, self.decode_steps = True, 0

    def repartition(self, unstable_heads: list[int]) -> None:
        """Move to a new stable/unstable split (after online calibration); every K/V is kept."""
        if not self.is_initialized:
            return self.set_split(unstable_heads)
        keys, values = self._assemble()
        valid = self.kv_valid[:, : self.length].clone()
        self.set_split(unstable_heads)
        self._rebuild(keys, values, valid)

    def _select_batch(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.device)
        for group in (self.dense, self.offloaded):
            if group is not None:
                group.select_batch(idx)
        self.kv_valid = self.kv_valid.index_select(0, idx)
        self.page_valid = self.page_valid.index_select(0, idx)
        self.batch = idx.numel()
        self.version += 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self.length > 0:
            self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    # ---- accounting ----------------------------------------------------------------------------
    def memory_report(self) -> dict:
        if not self.is_initialized:
            return dict.fromkeys(MEMORY_KEYS, 0)
        es = torch.finfo(self.dtype).bits // 8
        unstable = self.dense.gpu_bytes(self.length) if self.dense is not None else 0
        stable = self.offloaded.gpu_bytes() if self.offloaded is not None else 0
        gpu_reserved, host_reserved = reserved_bytes(self)
        return {
            "gpu_kv_bytes": unstable + stable,
            "unstable_gpu_kv_bytes": unstable,
            "stable_gpu_kv_bytes": stable,
            "host_kv_bytes": self.offloaded.host_bytes() if self.offloaded is not None else 0,
            "metadata_bytes": sum(g.meta.nbytes(self.meta_pages) for g in (self.dense, self.offloaded) if g is not None),
            "dense_kv_bytes": 2 * self.batch * self.num_kv_heads * self.length * self.head_dim * es,
            "gpu_reserved_bytes": gpu_reserved,
            "host_reserved_bytes": host_reserved,
        }


def _grow_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], cols)
    out[:, : t.shape[1]] = t
    return out


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
        num_layers = text.num_hidden_layers
        num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.profile = resolve_profile(profile, text, num_layers, num_kv_heads)
        self.auto = self.profile is None  # "auto": every head unstable until the calibration decides
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
        """profile="auto": (re)start recording; every paged head is unstable until it decides."""
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
        """Empty the cache for a new request (same model, any batch size); profile="auto" calibrates afresh."""
        super().reset()
        self._start_calibration()

    def graph_state(self) -> GraphState | None:
        """The state a captured decode step depends on, or None when the next step must run eagerly."""
        if self.calibration is not None and self.calibration.active:
            return None
        if len(self.paged) != len(self.layers):  # sliding-window layers grow by concatenation: eager
            return None
        keys = [layer.graph_key() for layer in self.layers]
        if any(k is None for k in keys):
            return None
        devices = {layer.device for layer in self.layers}
        if len(devices) != 1:
            return None
        device = devices.pop()
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
            if getattr(layer, "offloaded", None) is not None:
                layer.offloaded.join()

    def memory_report(self) -> dict:
        """Bytes held by the cache, summed over layers; `dense_kv_bytes` is what a DynamicCache would hold.

        `gpu_reserved_bytes` / `host_reserved_bytes`: every byte the cache's tensors hold allocated (what a
        memory profiler sees), headroom included; the other figures count the bytes in use. `by_device`
        splits the same sums by the device of each layer (layers follow their inputs, so a model spread
        with `device_map` keeps each layer's pages on that layer's device)."""
        total: dict = {}
        by_device: dict = {}
        for layer in self.layers:
            report = layer.memory_report() if isinstance(layer, FlexiCacheLayer) else _window_report(layer)
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
        report.update(gpu_kv_bytes=held, unstable_gpu_kv_bytes=held, gpu_reserved_bytes=held,
                      dense_kv_bytes=held * layer.get_seq_length() // max(layer.keys.shape[2], 1))
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
