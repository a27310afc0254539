"""LayerMemory: every K/V of one layer, where it lives, and the one door to it.

The layer's KV heads form two groups: unstable heads keep every page on the GPU (`GpuPages`), stable heads
keep a few GPU slots and every full page in the host pool (`OffloadedPages`). Beside them: page metadata
(one `PageMetadata` per group) and validity (`kv_valid[b, pos]`: written and not padding; `page_valid[b, p]`:
a page with such a token). The layer above appends tokens and asks for what selection reads (metadata),
what attention reads (page groups: pools + block tables) and whole-context views; nothing else indexes
pools, slots or the host pool.

State is the length: `pos` on the device and `length`, the same number in Python, and the length at
the last multi-token append (`selected_at`, after which every head selects afresh). Pages with metadata are
the full pages, `length // page_size`; the host pool holds every token of the stable heads (written
through as each arrives).

A decode step appends its token eagerly (append_token with the step kind: Python branches on it) or
compiled (no Python length; append_token(k, v, None, None) decides the kind on the device, a compiled plain
step passes False, False; the same state results, and `length` catches up from `pos` when next read).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from flexicache_hf import ops
from flexicache_hf.memory.alloc import capacity_for, reserved_bytes
from flexicache_hf.memory.gpu_pages import GpuPages
from flexicache_hf.memory.offload import OffloadedPages


class Chunk(NamedTuple):
    """The stable heads' newest tokens of a multi-token append, still on the GPU: positions first .. length-1."""

    first: int
    k: torch.Tensor
    v: torch.Tensor


class ContextViews:
    """LayerMemory's whole-context reads (prefill chunks, crop, full_kv) and its byte counts."""

    def valid_tokens(self, n: int | None = None) -> torch.Tensor:
        """[B, n] bool (the whole reserved width by default): which positions hold a real token (not padding,
        written). Decode attention reads it in place; callers that keep it past the next append clone it."""
        return self.kv_valid if n is None else self.kv_valid[:, :n]

    def context(self, chunk: Chunk | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each head group's whole context: [(its KV heads [Hg], K, V [B, Hg, length, D])]."""
        parts = []
        if self.unstable is not None:
            parts.append((self.unstable_heads, *self.unstable.read(self.length)))
        if self.stable is not None:
            parts.append((self.stable_heads, *self._stable_context(chunk)))
        return parts

    def _stable_context(self, chunk: Chunk | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every K/V of the stable heads, [B, Hs, length, D]: host pages, then the newest tokens (a multi-token
        append's chunk, or the partial current page), each copied once into the result."""
        L, ps, off = self.length, self.page_size, self.stable
        if chunk is not None:
            first, tail_k, tail_v = chunk
        else:
            first = self.full_pages * ps
            ck, cv = off.current_page()
            tail_k, tail_v = ck[:, :, 0, : L - first], cv[:, :, 0, : L - first]
        B, H, D = self.batch, len(self.stable_heads), self.head_dim
        k = torch.empty(B, H, L, D, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        if first:
            for dst, src in zip((k, v), off.host_pages(0, first // ps)):
                dst[:, :, :first].view(B, H, first // ps, ps, D).copy_(src)
        k[:, :, first:] = tail_k
        v[:, :, first:] = tail_v
        return k, v

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every K/V of this layer, [B, H, length, D], from the GPU pages, the host pool and the slots."""
        k_u = v_u = k_s = v_s = None
        if self.unstable is not None:
            k_u, v_u = self.unstable.read(self.length)
        if self.stable is not None:
            k_s, v_s = self._stable_context()
        return self.merge(k_u, k_s), self.merge(v_u, v_s)

    def report(self) -> dict:
        es = torch.finfo(self.dtype).bits // 8
        unstable = self.unstable.bytes_in_use(self.length) if self.unstable is not None else 0
        stable = self.stable.gpu_bytes() if self.stable is not None else 0
        gpu_reserved, host_reserved = reserved_bytes(self)
        return {
            "gpu_kv_bytes": unstable + stable,
            "unstable_gpu_kv_bytes": unstable,
            "stable_gpu_kv_bytes": stable,
            "host_kv_bytes": self.stable.host_bytes(self.full_pages) if self.stable is not None else 0,
            "metadata_bytes": sum(g.meta.nbytes(self.full_pages) for g in self.groups),
            "dense_kv_bytes": 2 * self.batch * self.num_heads * self.length * self.head_dim * es,
            "gpu_reserved_bytes": gpu_reserved,
            "host_reserved_bytes": host_reserved,
        }


class LayerMemory(ContextViews):
    def __init__(self, keys: torch.Tensor, unstable: list[int], cfg, summarise):
        """keys: the first forward's keys [B, H, T, D] (shapes, dtype, device); unstable: the unstable KV heads;
        cfg: a FlexiCacheConfig; summarise(keys, valid) -> kmin, kmax, codes: a page's selection metadata."""
        B, H, T, D = keys.shape
        self.batch, self.num_heads, self.head_dim, self.dtype, self.device = B, H, D, keys.dtype, keys.device
        self.page_size, self.headroom, self.summarise = cfg.page_size, cfg.host_headroom_pages, summarise
        self.use_kernels = cfg.use_kernels
        self.rerank_interval, self.warmup_steps = cfg.rerank_interval, cfg.warmup_steps
        stable = [h for h in range(H) if h not in set(unstable)]
        self.unstable_heads = torch.tensor(sorted(unstable), device=self.device, dtype=torch.long)
        self.stable_heads = torch.tensor(stable, device=self.device, dtype=torch.long)
        ps, bits = cfg.page_size, cfg.sketch_bits
        pages = math.ceil(cfg.max_cache_len / ps) if cfg.max_cache_len and cfg.max_cache_len >= T else \
            capacity_for(math.ceil(max(T, 1) / ps), self.headroom)
        self.unstable = GpuPages(B, len(unstable), D, ps, pages, bits, keys.dtype, self.device) if unstable else None
        self.stable = OffloadedPages(B, len(stable), D, ps, cfg.resident_slots, pages, bits, keys.dtype, self.device,
                                     self.headroom) if stable else None
        self.kv_valid = torch.zeros(B, pages * ps, dtype=torch.bool, device=self.device)
        self.page_valid = torch.zeros(B, pages, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # = length, on the device
        self.sel_at = torch.zeros(1, dtype=torch.long, device=self.device)  # = selected_at, on the device
        self._length, self._stale, self.selected_at = 0, False, 0
        self.version = 0  # bumped whenever a state tensor is replaced: captured decode graphs go stale
        self._marked = None  # the version whose tensors are marked as static addresses (torch.compile)

    @property
    def length(self) -> int:
        if self._stale:  # compiled decode steps advanced `pos` only
            self._length, self._stale = int(self.pos.item()), False
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length, self._stale = value, False

    def clear(self) -> None:
        """Empty, keeping every buffer (a new request on a reused cache: its compiled graphs stay valid)."""
        self.join()
        self.length = self.selected_at = 0
        for t in (self.pos, self.sel_at):
            t.zero_()
        self.kv_valid.zero_()
        self.page_valid.zero_()
        if self.stable is not None:
            self.stable.clear()

    @property
    def groups(self) -> list:
        return [g for g in (self.unstable, self.stable) if g is not None]

    @property
    def full_pages(self) -> int:
        return self.length // self.page_size

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """[B, H, ...] -> the unstable and the stable heads' parts (None for an empty group)."""
        if self.stable is None or self.unstable is None:
            return (x, None) if self.stable is None else (None, x)
        return x.index_select(1, self.unstable_heads), x.index_select(1, self.stable_heads)

    def merge(self, u: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
        if s is None or u is None:
            return u if s is None else s
        out = u.new_empty(u.shape[0], self.num_heads, *u.shape[2:])
        out[:, self.unstable_heads] = u
        out[:, self.stable_heads] = s
        return out

    # ---- capacity ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens that fit without replacing any buffer."""
        caps = [self.page_valid.shape[1]] + [g.meta.capacity_pages for g in self.groups]
        if self.stable is not None:
            caps.append(self.stable.host_capacity)
        return min(caps) * self.page_size

    def fits(self, tokens: int) -> bool:
        return tokens <= self.capacity

    def reserve(self, tokens: int) -> None:
        if self.fits(tokens):
            return
        self.version += 1
        pages = capacity_for(math.ceil(tokens / self.page_size), self.headroom)
        if pages > self.page_valid.shape[1]:
            self.kv_valid = _grow_cols(self.kv_valid, pages * self.page_size)
            self.page_valid = _grow_cols(self.page_valid, pages)
        if self.unstable is not None:
            self.unstable.reserve(pages)
        if self.stable is not None:
            self.stable.meta.reserve(pages)
            self.stable.reserve_host(pages)

    def ready_for_static_step(self) -> None:
        """Before a compiled decode step (eagerly): room for its token, no side-stream work in flight, and
        every state tensor marked as a static address (CUDA graphs read them in place; torch.compile would
        otherwise copy them into the graph's own buffers at every replay)."""
        self.reserve(self.length + 1)
        self.join()
        if self.stable is not None:
            self.stable.wait_offloads(host_reader=False)
        if self._marked != self.version and self.device.type == "cuda":
            for t in state_tensors(self):
                torch._dynamo.mark_static_address(t)
            self._marked = self.version

    def graph_buffers(self, fill: bool):
        """What a captured decode step of this layer bakes in (buffer identity), or None if the next step
        must run eagerly (a buffer would grow, a prefill offload is still in flight)."""
        if not self.fits(self.length + 1):
            return None
        host = 0
        if self.stable is not None:
            if self.stable.offloaded is not None:
                return None
            host = self.stable.host_capacity
        return self.version, self.kv_valid.shape[1], host

    # ---- multi-token append (prefill, chunked prefill, verification) ----------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> Chunk | None:
        """Store tokens [B, H, n, D] at positions length .. length+n-1 (valid until mark_valid says not).
        Returns the stable heads' chunk (context() reads it instead of the host pool)."""
        start, n = self.length, k.shape[2]
        self.reserve(start + n)
        k_u, k_s = self.split(k)
        v_u, v_s = self.split(v)
        if self.unstable is not None:
            self.unstable.write(k_u, v_u, start)
        chunk = Chunk(*self.stable.append(k_s, v_s, start)) if self.stable is not None else None
        self.kv_valid[:, start : start + n] = True
        self.length = self.selected_at = start + n
        self.pos.fill_(self.length)
        self.sel_at.fill_(self.length)
        return chunk

    def mark_valid(self, valid: torch.Tensor, start: int) -> None:
        """valid [B or 1, n]: which of the tokens appended at `start` may be attended (not padding)."""
        self.kv_valid[:, start : start + valid.shape[1]] = valid.expand(self.batch, -1)

    def summarise_pages(self, first_page: int, keys=None, keys_by_group=None) -> None:
        """Selection metadata of the full pages from `first_page` on, from the keys of the whole context:
        `keys` [B, H, T, D] of every head, or `keys_by_group` (one per group, as context() orders them)."""
        ps = self.page_size
        p0, p1 = first_page, self.full_pages
        if p1 <= p0:
            return
        lo, hi = p0 * ps, p1 * ps
        valid = self.kv_valid[:, lo:hi]
        if keys is not None:
            meta = [self.split(t) if t is not None else (None, None) for t in self.summarise(keys[:, :, lo:hi], valid)]
            pieces = [(g, *m) for g, *m in zip((self.unstable, self.stable), *meta) if g is not None]
        else:
            pieces = [(g, *self.summarise(k[:, :, lo:hi], valid)) for g, k in zip(self.groups, keys_by_group)]
        for group, *meta in pieces:
            group.meta.write(slice(p0, p1), *meta)
        self.page_valid[:, p0:p1] = valid.view(self.batch, -1, ps).any(-1)

    # ---- decode: one token -------------------------------------------------------------------
    def append_token(self, k: torch.Tensor, v: torch.Tensor, new_page: bool | None, fill: bool | None) -> None:
        """Decode: one token [B, H, 1, D] at position `pos`, always valid; when it fills its page, the page's
        metadata is written.

        new_page = fill = None: a compiled step. Whether the token starts a page is decided on the device, and
        the current page's metadata is rewritten at every step (it is read only once the page is full, when it
        equals what the fill step writes). Room was made beforehand (ready_for_static_step): a compiled step
        cannot grow a buffer."""
        if not torch.compiler.is_compiling():  # a compiled step's room was made before it
            self.reserve(self.length + 1)
        k_u, k_s = self.split(k)
        v_u, v_s = self.split(v)
        if self.unstable is not None:
            self.unstable.write_at(k_u, v_u, self.pos)
        if self.stable is not None:
            self.stable.write_token(k_s, v_s, self.pos, new_page)
        self.kv_valid.index_fill_(1, self.pos, True)
        if fill is None or fill:
            self._summarise_current()

    def _summarise_current(self) -> None:
        """Metadata and validity of the page that holds `pos`, from its tokens so far, written in place where the
        page lives (one launch per head group on CUDA). The summary is the one every scorer writes (min/max box
        and a sketch at the metadata's bits: `summarise` for whole spans)."""
        page, page_valid = self.pos // self.page_size, self.page_valid
        for group in self.groups:
            group.summarise_page(self.kv_valid, page, page_valid, self.use_kernels)
            page_valid = None  # written once, with the first group

    def current_page(self) -> torch.Tensor:
        """The page that holds the newest token (after append_token), [1] on the device."""
        return self.pos // self.page_size

    def selection_inputs(self, group) -> tuple:
        """What page selection reads for a group: kmin, kmax, codes (rows = batch x heads) and page_valid."""
        return (*group.meta.rows(), self.page_valid)

    def attention_groups(self, unstable_table: torch.Tensor | None, stable_pending: bool) -> list[ops.PageGroup]:
        """What decode attention reads: the stable heads' slots (first: with programmatic dependent launch
        their rows start before the unstable heads' selection has finished) and the unstable heads' pages
        through `unstable_table` [B, Hu, M] (page ids, -1 = none)."""
        groups = []
        if self.stable is not None:
            groups.append(self.stable.attention_group(self.stable_heads, stable_pending))
        if self.unstable is not None:
            groups.append(self.unstable.attention_group(unstable_table, self.unstable_heads))
        return groups

    def rerank_flags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """DecodeFlags' rerank and first, on the device ([1] bool each): for a compiled step. The same rule as
        DecodeFlags.at: promote at once at the first step after a multi-token forward and through the warm-up
        (`warmup_steps`), then a periodic rerank every `rerank_interval` steps."""
        since = self.pos - self.sel_at
        first = (since == 0) | (since < self.warmup_steps)
        return first | (since % self.rerank_interval == 0), first

    def promote(self, selected: torch.Tensor, background: bool, active: torch.Tensor | None = None,
                after: torch.Tensor | None = None) -> None:
        """The stable heads' resident pages become `selected` [B, Hs, K] and the current page (only where
        `active`, a device bool, holds: a compiled step's promotion, which follows `after`)."""
        if background:
            self.stable.promote_in_background(selected, self.current_page())
        else:
            self.stable.promote(selected, self.current_page(), active, after)

    def next_position(self) -> None:
        """The decode step is done: the device position advances (in the step) and the length with it; a
        compiled step leaves the length to catch up when next read."""
        self.pos.add_(1)
        if torch.compiler.is_compiling():
            self._stale = True
        else:
            self.length += 1

    def join(self) -> None:
        if self.stable is not None:
            self.stable.join()

    # ---- whole context, batch, accounting ------------------------------------------------------
    def select_batch(self, idx: torch.Tensor) -> None:
        idx = idx.to(self.device)
        for group in self.groups:
            group.select_batch(idx)
        self.kv_valid = self.kv_valid.index_select(0, idx)
        self.page_valid = self.page_valid.index_select(0, idx)
        self.batch = idx.numel()
        self.version += 1



def sync_lengths(memories) -> None:
    """Catch up the lengths that compiled steps advanced on the device only, with one read for every layer
    (LayerMemory.length alone would wait for the device once per layer)."""
    stale = [m for m in memories if m._stale]
    if stale:
        lengths = torch.cat([m.pos.to(stale[0].device) for m in stale]).tolist()
        for m, n in zip(stale, lengths):
            m.length = n


def state_tensors(owner) -> list[torch.Tensor]:
    """Every tensor the memory room holds (the host pool's CUDA views included)."""
    found = []
    for value in vars(owner).values():
        if type(value).__module__.startswith(__package__):
            found += state_tensors(value)
        elif isinstance(value, torch.Tensor) and value.device.type != "cpu":
            found.append(value)
    return found


def _grow_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], cols)
    out[:, : t.shape[1]] = t
    return out
