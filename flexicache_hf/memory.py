"""The memory hierarchy of one layer: where every page of K/V lives, and the copies between places.

Two head groups per layer, each owning its storage:

* `DenseHeads` (unstable heads): every page stays in a GPU buffer [B, H, capacity, D]; page p of row
  (b, h) is pool slot (b*H + h) * capacity_pages + p of the buffer viewed as a page pool.
* `PageMetadata`: what page selection reads, for every page of every head, always on the GPU (also for
  pages that live on the host): each full page's key min/max and, optionally, a per-token key sketch.
* `OffloadedHeads` (stable heads): a fixed number of GPU page slots per row [B, H, slots, page, D]
  holding the row's selected pages, the tail and the current page (`slot_page` is the block table: the
  page each slot holds, -1 = free); and a host pool [pages, B, H, page, D] (pinned on CUDA) holding a
  copy of every full page, written once when the page fills (offload). Re-selection copies only newly
  promoted pages host -> GPU, into slots freed by demoted pages (promote).

The host pool is page-major so that offloading one page of every row is a single contiguous copy.
Nothing outside this module indexes the pools; the cache asks for pages, slots and bytes.

Decode-step operations (`write_at`, `write_token`, `offload_current`, `promote`) take positions and pages
as device tensors, keep every shape fixed and never wait for the host, so a whole decode step can be
captured in a CUDA graph (graphs.py): they update state tensors in place and never reallocate them.
"""

from __future__ import annotations

import torch

from flexicache_hf import ops


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def capacity_for(pages: int, headroom: int) -> int:
    """Pages to reserve when `pages` must fit: an eighth more (at least `headroom`), so that growing stays
    amortised O(1) per token while what is reserved stays close to what is used."""
    return pages + max(pages // 8, headroom)


def reserved_bytes(*owners) -> tuple[int, int]:
    """(device, host) bytes of every tensor storage the owners hold, the memory groups below included, each
    storage counted once: what the cache holds allocated, whatever part of it is in use."""
    seen: set = set()
    device = host = 0

    def walk(obj):
        nonlocal device, host
        for name, value in vars(obj).items():
            if isinstance(value, (PageMetadata, DenseHeads, OffloadedHeads)):
                walk(value)
            elif isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                if name.startswith("host_"):
                    host += value.untyped_storage().nbytes()
                else:
                    device += value.untyped_storage().nbytes()

    for owner in owners:
        walk(owner)
    return device, host


def _grow(t: torch.Tensor, dim: int, new_size: int, pin: bool = False) -> torch.Tensor:
    """A copy of `t` with dimension `dim` enlarged to `new_size` (new entries uninitialised: every reader
    masks what was never written)."""
    shape = list(t.shape)
    shape[dim] = new_size
    try:
        out = torch.empty(shape, dtype=t.dtype, device=t.device, pin_memory=pin)
    except RuntimeError as e:  # nothing is lost: the old tensor is still referenced by the caller
        where = "pinned host" if pin else str(t.device)
        size = t.element_size() * torch.Size(shape).numel()
        raise MemoryError(
            f"FlexiCache could not grow its {where} pool to {list(shape)} ({size / 2**30:.2f} GiB): {e}. "
            "Nothing was lost; reduce the batch size or the context length, or free memory."
        ) from e
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class PageMetadata:
    """Selection metadata of one head group, [B, H, capacity_pages, ...] on the GPU: kmin / kmax, the
    channel-wise min and max of each full page's keys (ops.page_minmax_ref), and with sketch_bits > 0 the
    page's per-token key sketch `codes` [..., page_size, head_dim * sketch_bits // 8] uint8
    (ops.page_sketch_ref). Written once per page, when it fills."""

    def __init__(self, batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device):
        self.kmin = torch.zeros(batch, heads, capacity_pages, head_dim, dtype=dtype, device=device)
        self.kmax = torch.zeros_like(self.kmin)
        self.codes = None
        if sketch_bits:
            self.codes = torch.zeros(batch, heads, capacity_pages, page_size, head_dim * sketch_bits // 8,
                                     dtype=torch.uint8, device=device)

    def _tensors(self):
        return [n for n in ("kmin", "kmax", "codes") if getattr(self, n) is not None]

    @property
    def capacity_pages(self) -> int:
        return self.kmin.shape[2]

    def reserve(self, pages: int) -> None:
        """Grow to exactly `pages` (the layer decides how much: capacity_for)."""
        if pages > self.capacity_pages:
            for name in self._tensors():
                setattr(self, name, _grow(getattr(self, name), 2, pages))

    def write(self, pages, kmin, kmax, codes=None) -> None:
        """Pages `pages` (a slice, or a device tensor [n] at decode) of every row get this metadata."""
        for name, src in zip(("kmin", "kmax", "codes"), (kmin, kmax, codes)):
            dst = getattr(self, name)
            if dst is None:
                continue
            if isinstance(pages, slice):
                dst[:, :, pages] = src
            else:
                dst.index_copy_(2, pages, src)

    def rows(self):
        """kmin, kmax [B*H, capacity, D] and codes [B*H, capacity, page_size, bytes] (or None): one row per
        (batch, head), as ops.select_pages takes them."""
        return tuple(None if t is None else t.flatten(0, 1) for t in (self.kmin, self.kmax, self.codes))

    def select_batch(self, idx: torch.Tensor) -> None:
        for name in self._tensors():
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def nbytes(self, pages: int) -> int:
        """Bytes of the metadata of `pages` pages (every row)."""
        return sum(getattr(self, n)[:, :, :pages].numel() * getattr(self, n).element_size() for n in self._tensors())


class DenseHeads:
    """Unstable heads: every page on the GPU, re-selected every decode step."""

    def __init__(self, batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device):
        self.heads, self.page_size = heads, page_size
        tokens = capacity_pages * page_size
        self.k = torch.zeros(batch, heads, tokens, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.meta = PageMetadata(batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device)

    @property
    def capacity_pages(self) -> int:
        return self.meta.capacity_pages

    def reserve(self, pages: int) -> None:
        """Grow to exactly `pages` (the layer decides how much: capacity_for)."""
        if pages > self.capacity_pages:
            self.k = _grow(self.k, 2, pages * self.page_size)
            self.v = _grow(self.v, 2, pages * self.page_size)
            self.meta.reserve(pages)

    def write(self, k, v, start: int) -> None:
        self.k[:, :, start : start + k.shape[2]] = k
        self.v[:, :, start : start + v.shape[2]] = v

    def write_at(self, k, v, pos: torch.Tensor) -> None:
        """Decode: one token [B, H, 1, D] at position `pos` (device tensor [1])."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, :length], self.v[:, :, :length]

    def page_pools(self):
        """K and V as pools of pages: row r = b * heads + h holds its page p in slot r * capacity_pages + p."""
        D = self.k.shape[-1]
        return self.k.view(-1, self.page_size, D), self.v.view(-1, self.page_size, D)

    def select_batch(self, idx: torch.Tensor) -> None:
        for name in ("k", "v"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        self.meta.select_batch(idx)

    def gpu_bytes(self, length: int) -> int:
        B, H, _, D = self.k.shape
        return 2 * B * H * length * D * self.k.element_size()


class OffloadedHeads:
    """Stable heads: selected pages + tail + current page in GPU slots; every full page in host memory."""

    def __init__(self, batch, heads, head_dim, page_size, num_slots, host_pages, capacity_pages, sketch_bits,
                 dtype, device, headroom=0):
        self.heads, self.page_size, self.device = heads, page_size, torch.device(device)
        self.headroom = headroom  # host pool growth: capacity_for(pages, headroom)
        self.pin = self.device.type == "cuda"
        self.k = torch.zeros(batch, heads, num_slots, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_page = torch.full((batch, heads, num_slots), -1, dtype=torch.long, device=device)
        self.cur_slot = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self._index_tensors()
        # uninitialised: only pages below host_len are ever read, and zeroing GiBs of host memory is slow
        host_shape = (host_pages, batch, heads, page_size, head_dim)
        self.host_k = torch.empty(host_shape, dtype=dtype, pin_memory=self.pin)
        self.host_v = torch.empty(host_shape, dtype=dtype, pin_memory=self.pin)
        self.host_len = 0  # pages 0 .. host_len-1 have been offloaded
        self.meta = PageMetadata(batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device)
        # D2H offloads run on a low-priority side stream; readers of the host pool wait on this event.
        self.copy_stream = torch.cuda.Stream(self.device, priority=0) if self.pin else None
        self.offloaded = None
        self.promoting = None  # (event, tensors it uses) of a promotion still running on copy_stream

    def _index_tensors(self) -> None:
        # made once, eagerly: a tensor first allocated inside a graph capture holds nothing until replay
        B, H, S = self.slot_page.shape
        self._b = torch.arange(B, device=self.device).view(B, 1)
        self._h = torch.arange(H, device=self.device).view(1, H)
        self._rows = torch.arange(B * H, device=self.device).view(B, H, 1)  # row = b * H + h

    # ---- capacity ------------------------------------------------------------------------------
    def _reserve_host(self, pages: int) -> None:
        if pages > self.host_k.shape[0]:
            # kernels read and write the old pool in place: let them finish before it is freed
            self.wait_offloads(host_reader=True)
            pages = capacity_for(pages, self.headroom)
            self.host_k = _grow(self.host_k, 0, pages, pin=self.pin)
            self.host_v = _grow(self.host_v, 0, pages, pin=self.pin)

    # ---- offload: GPU -> host, once per full page ----------------------------------------------
    def offload(self, first_page: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        """Copy full pages [B, H, n, page, D] (pages first_page .. first_page+n-1) to the host pool."""
        self.join()
        n = k_pages.shape[2]
        if n == 0:
            return
        if first_page != self.host_len:
            raise RuntimeError(f"offload of page {first_page} out of order (host holds {self.host_len} pages)")
        self._reserve_host(first_page + n)
        # page-major staging: one contiguous copy per pool; staging decouples the copy from the slots,
        # so a slot may be reused right away while the copy is still in flight.
        sk = k_pages.permute(2, 0, 1, 3, 4).contiguous()
        sv = v_pages.permute(2, 0, 1, 3, 4).contiguous()
        dst = slice(first_page, first_page + n)
        if self.copy_stream is None:
            self.host_k[dst].copy_(sk)
            self.host_v[dst].copy_(sv)
        else:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.host_k[dst].copy_(sk, non_blocking=True)
                self.host_v[dst].copy_(sv, non_blocking=True)
                sk.record_stream(self.copy_stream)
                sv.record_stream(self.copy_stream)
                self.offloaded = torch.cuda.Event()
                self.offloaded.record(self.copy_stream)
        self.host_len = first_page + n

    def offload_current(self, page: torch.Tensor) -> None:
        """Decode: the current page just filled; copy it (page `page`, device tensor [1]) to the host pool.

        A kernel writes the mapped pinned pool directly (zero-copy), on the compute stream: no staging, no
        host sync, and the page slot stays untouched until the copy has read it (same stream)."""
        self.join()
        self._reserve_host(self.host_len + 1)
        B, H, S, ps, D = self.k.shape
        src = (self._rows * S + self.cur_slot.unsqueeze(-1)).view(-1)
        dst = (page * (B * H) + self._rows).view(-1)  # host pool [pages, B, H]: index (page * B + b) * H + h
        for gpu, host in ((self.k, self.host_k), (self.v, self.host_v)):
            ops.copy_pages(gpu.view(-1, ps, D), src, host.view(-1, ps, D), dst)
        # host_len advances in the layer's advance_decode (a replayed graph runs none of this Python)

    def wait_offloads(self, host_reader: bool) -> None:
        """Order a read of the host pool after the writes in flight.

        CPU reader: block until the copy stream (prefill offloads) and the compute stream (decode offloads,
        written by kernels in stream order) are done. GPU reader: the compute stream waits for the prefill
        offloads once; decode offloads are already in its order."""
        if host_reader:
            if self.pin:
                torch.cuda.synchronize(self.device)
            return
        if self.offloaded is not None:
            torch.cuda.current_stream(self.device).wait_event(self.offloaded)
            self.offloaded = None

    def host_pages(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pages first .. last-1 from the host pool, on the GPU, as [B, H, n, page, D]."""
        # a GPU reader: the copies below are queued on the compute stream, after the offloads they need
        # (no device-wide sync: chunked prefill reads the host pool once per layer and chunk)
        self.wait_offloads(host_reader=not self.pin)
        k = self.host_k[first:last].to(self.device, non_blocking=True).permute(1, 2, 0, 3, 4)
        v = self.host_v[first:last].to(self.device, non_blocking=True).permute(1, 2, 0, 3, 4)
        return k, v

    # ---- writes into slots ---------------------------------------------------------------------
    def clear_slots(self) -> None:
        self.join()
        self.slot_page.fill_(-1)

    def start_page(self, page: int | torch.Tensor) -> None:
        """Give every row a free slot for its new current page `page` (an int, or a device tensor [1])."""
        self.join()
        free = self.slot_page < 0
        # first free slot per row; the slot count guarantees one exists (topk + current + tail pages)
        self.cur_slot.copy_(free.to(torch.int8).argmax(-1))
        idx = self.cur_slot.unsqueeze(-1)
        if isinstance(page, torch.Tensor):
            self.slot_page.scatter_(-1, idx, page.view(1, 1, 1).expand_as(idx))
        else:
            self.slot_page.scatter_(-1, idx, page)

    def write_token(self, k, v, pos: torch.Tensor, new_page: bool) -> None:
        """Decode: one token [B, H, 1, D] at position `pos` (device tensor [1]) into the current page."""
        self.join()
        if new_page:
            self.start_page(pos // self.page_size)
        idx = (self._b, self._h, self.cur_slot, pos % self.page_size)
        self.k.index_put_(idx, k[:, :, 0])
        self.v.index_put_(idx, v[:, :, 0])

    def write_current(self, k, v, offset: int) -> None:
        """Write tokens [B, H, n, D] into every row's current page from `offset` on."""
        self.join()
        B, H = self.cur_slot.shape
        b = torch.arange(B, device=self.k.device).view(B, 1)
        h = torch.arange(H, device=self.k.device).view(1, H)
        self.k[b, h, self.cur_slot, offset : offset + k.shape[2]] = k
        self.v[b, h, self.cur_slot, offset : offset + v.shape[2]] = v

    def current_page(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current page of every row, [B, H, 1, page, D]."""
        self.join()
        idx = self.cur_slot.view(*self.cur_slot.shape, 1, 1, 1).expand(-1, -1, 1, *self.k.shape[3:])
        return self.k.gather(2, idx), self.v.gather(2, idx)

    # ---- promotion: host -> GPU slots ----------------------------------------------------------
    def promote(self, selected: torch.Tensor, current_page: torch.Tensor) -> None:
        """Make the resident set exactly `selected` [B, H, K] (page ids, -1 = none) plus the current page.

        Slots of demoted pages are freed; newly selected pages are copied from the host pool into them.
        Fixed shapes, no host sync: every (row, k) entry is a copy job, and the ones with nothing to copy
        carry index -1, which the copy skips.
        """
        self.join()
        sp = self.slot_page
        B, H, S = sp.shape
        keep = (sp.unsqueeze(-1) == selected.unsqueeze(-2)).any(-1) | (sp == current_page)
        sp.masked_fill_(~keep & (sp >= 0), -1)
        resident = (selected.unsqueeze(-1) == sp.unsqueeze(-2)).any(-1)
        missing = (selected >= 0) & ~resident  # [B, H, K]
        # pair the r-th missing page of a row with the r-th free slot of that row
        free_first = torch.argsort((sp >= 0).to(torch.int8), dim=-1, stable=True)
        rank = (missing.cumsum(-1) - 1).clamp(min=0)
        dst = free_first.gather(-1, rank)
        # block table: missing pages into their slots; everything else lands in a spare column S
        table = torch.cat([sp, sp.new_full((B, H, 1), -1)], dim=-1)
        table.scatter_(-1, torch.where(missing, dst, S), selected)
        sp.copy_(table[..., :S])
        src_idx = torch.where(missing, selected * (B * H) + self._rows, -1).view(-1)  # host [pages, B, H]
        dst_idx = torch.where(missing, self._rows * S + dst, -1).view(-1)
        ps, D = self.k.shape[3:]
        self.wait_offloads(host_reader=not self.pin)
        for host, gpu in ((self.host_k, self.k), (self.host_v, self.v)):
            ops.copy_pages(host.view(-1, ps, D), src_idx, gpu.view(-1, ps, D), dst_idx)

    def promote_in_background(self, selected: torch.Tensor, current_page: torch.Tensor) -> None:
        """A rerank's promotion, overlapped with the rest of the step: queued after everything the compute
        stream has issued (this step's attention reads the old slots) on the low-priority copy stream; the
        next user of the slots, the pools or the slot table waits for it (`join`). On the CPU: at once."""
        if self.copy_stream is None:
            return self.promote(selected, current_page)
        self.join()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self.promote(selected, current_page)
            # the caching allocator must not hand these blocks to another stream while the copy stream
            # still uses them (even if the cache is dropped first)
            for t in (selected, current_page, self.k, self.v, self.slot_page):
                t.record_stream(self.copy_stream)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.promoting = (done, self.host_k, self.host_v)  # the pinned pools stay alive until it is done

    def join(self) -> None:
        """Order the compute stream after a background promotion (a GPU-side wait, no host sync)."""
        if self.promoting is not None:
            torch.cuda.current_stream(self.device).wait_event(self.promoting[0])
            self.promoting = None

    def __del__(self):
        # dropped with a promotion in flight: its kernel still reads the pinned pools, which must not be
        # released before it is done (GPU blocks are protected by record_stream)
        if getattr(self, "promoting", None) is not None:
            self.promoting[0].synchronize()

    def page_pools(self):
        """K and V as pools of pages: row r = b * heads + h holds slot_page[b, h, e] in slot r * num_slots + e
        (the same view DenseHeads.page_pools gives of its buffer, addressed by entry instead of page id)."""
        self.join()
        ps, D = self.k.shape[3:]
        return self.k.view(-1, ps, D), self.v.view(-1, ps, D)

    # ---- batch ops and accounting --------------------------------------------------------------
    def select_batch(self, idx: torch.Tensor) -> None:
        self.join()
        self.wait_offloads(host_reader=True)
        for name in ("k", "v", "slot_page", "cur_slot"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        self.meta.select_batch(idx)
        self._index_tensors()
        cpu_idx = idx.cpu()
        for name in ("host_k", "host_v"):
            t = getattr(self, name).index_select(1, cpu_idx)
            setattr(self, name, t.pin_memory() if self.pin else t)

    def gpu_bytes(self) -> int:
        return _nbytes(self.k, self.v)

    def host_bytes(self) -> int:
        B, H, ps, D = self.host_k.shape[1:]
        return 2 * self.host_len * B * H * ps * D * self.host_k.element_size()
