"""OffloadedPages: the stable heads' K/V, a few GPU page slots each and every full page in the host pool.

GPU slots [B, H, slots, page, D] hold each row's selected pages, the tail (pages made since the last
rerank) and the current page; `slot_page` is their block table (the page each slot holds, -1 = free). The
host pool [pages, B, H, page, D] (pinned on CUDA) holds a copy of every token: a prefill offloads its
pages (the partial last one too), a decode step writes its token through; page-major, so that offloading
one page of every row is one contiguous copy. A rerank copies only newly promoted pages host -> GPU, into
slots freed by demoted pages (promote).

Decode-step operations (`write_token`, `promote`) take positions and pages as device tensors, keep every
shape fixed and never wait for the host, so a decode step can be captured in a CUDA graph or compiled:
they update state tensors in place and never reallocate them. On CUDA they reach the pinned pool through
`host_*_mapped`, CUDA tensors over the same memory (alloc.mapped), which kernels read and write in place.
"""

from __future__ import annotations

import torch

from flexicache_hf import ops
from flexicache_hf.memory.alloc import allocate, capacity_for, grow, mapped
from flexicache_hf.memory.metadata import PageMetadata


class OffloadedPages:
    def __init__(self, batch, heads, head_dim, page_size, num_slots, capacity_pages, sketch_bits, dtype, device,
                 headroom=0):
        self.page_size, self.device, self.headroom = page_size, torch.device(device), headroom
        self.pin = self.device.type == "cuda"
        self.k = torch.zeros(batch, heads, num_slots, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slot_page = torch.full((batch, heads, num_slots), -1, dtype=torch.long, device=device)
        self.cur_slot = torch.zeros(batch, heads, dtype=torch.long, device=device)
        self._index_tensors()
        # uninitialised: only offloaded pages are ever read, and zeroing GiBs of host memory is slow
        host_shape = (capacity_pages, batch, heads, page_size, head_dim)
        self.host_k = allocate(host_shape, dtype, "cpu", pin=self.pin)
        self.host_v = allocate(host_shape, dtype, "cpu", pin=self.pin)
        self._map_host()
        self.meta = PageMetadata(batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device)
        # prefill offloads run on a low-priority side stream; readers of the host pool wait on this event
        self.copy_stream = torch.cuda.Stream(self.device, priority=0) if self.pin else None
        self.offloaded = None
        self.promoting = None  # (event, tensors it uses) of a promotion still running on copy_stream

    def _index_tensors(self) -> None:
        # made once, eagerly: a tensor first allocated inside a graph capture holds nothing until replay
        B, H, S = self.slot_page.shape
        self._b = torch.arange(B, device=self.device).view(B, 1)
        self._h = torch.arange(H, device=self.device).view(1, H)
        self._rows = torch.arange(B * H, device=self.device).view(B, H, 1)  # row = b * H + h

    def _map_host(self) -> None:
        """The host pool as decode-step kernels address it: CUDA views of the pinned pool on CUDA."""
        self.host_k_mapped = mapped(self.host_k, self.device) if self.pin else self.host_k
        self.host_v_mapped = mapped(self.host_v, self.device) if self.pin else self.host_v

    @property
    def host_capacity(self) -> int:
        return self.host_k.shape[0]

    def reserve_host(self, pages: int) -> None:
        if pages > self.host_capacity:
            # kernels read and write the old pool in place: let them finish before it is freed
            self.wait_offloads(host_reader=True)
            pages = capacity_for(pages, self.headroom)
            self.host_k = grow(self.host_k, 0, pages, pin=self.pin)
            self.host_v = grow(self.host_v, 0, pages, pin=self.pin)
            self._map_host()

    # ---- offload: GPU -> host, once per full page ----------------------------------------------
    def offload(self, first_page: int, k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
        """Copy full pages [B, H, n, page, D] (pages first_page .. first_page+n-1) to the host pool."""
        self.join()
        n = k_pages.shape[2]
        if n == 0:
            return
        self.reserve_host(first_page + n)
        # page-major staging: one contiguous copy per pool; staging decouples the copy from the slots,
        # so a slot may be reused right away while the copy is still in flight
        sk = k_pages.permute(2, 0, 1, 3, 4).contiguous()
        sv = v_pages.permute(2, 0, 1, 3, 4).contiguous()
        dst = slice(first_page, first_page + n)
        if self.copy_stream is None:
            self.host_k[dst].copy_(sk)
            self.host_v[dst].copy_(sv)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self.host_k[dst].copy_(sk, non_blocking=True)
            self.host_v[dst].copy_(sv, non_blocking=True)
            sk.record_stream(self.copy_stream)
            sv.record_stream(self.copy_stream)
            self.offloaded = torch.cuda.Event()
            self.offloaded.record(self.copy_stream)

    def write_through(self, k, v, pos: torch.Tensor) -> None:
        """Decode: the token [B, H, 1, D] at `pos` (device tensor [1]) into the host pool too (reserved
        beforehand). A kernel writes the mapped pinned pool in place, on the compute stream: a few hundred
        bytes per row, no staging, no host sync."""
        B, H, S, ps, D = self.k.shape
        rows = self._rows.view(-1)
        dst = ops.host_index(pos // ps, rows, B * H) * ps + pos % ps
        ops.copy_pages(k.reshape(B * H, 1, D), rows, self.host_k_mapped.view(-1, 1, D), dst,
                       pair=(v.reshape(B * H, 1, D), self.host_v_mapped.view(-1, 1, D)))

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
        # a GPU reader: the copies are queued on the compute stream, after the offloads they need
        self.wait_offloads(host_reader=not self.pin)
        k = self.host_k[first:last].to(self.device, non_blocking=True).permute(1, 2, 0, 3, 4)
        v = self.host_v[first:last].to(self.device, non_blocking=True).permute(1, 2, 0, 3, 4)
        return k, v

    # ---- writes into slots ---------------------------------------------------------------------
    def append(self, k, v, start: int):
        """Multi-token: complete the partial current page, offload every page it touches, keep the partial
        last page resident, free every other slot (the next decode step selects afresh). Returns the tokens from
        the first page touched on (first position, K, V), still on the GPU."""
        ps = self.page_size
        first = start - start % ps
        if start % ps:
            ck, cv = self.current_page()
            k = torch.cat([ck[:, :, 0, : start % ps], k], dim=2)
            v = torch.cat([cv[:, :, 0, : start % ps], v], dim=2)
        B, H, T, D = k.shape
        full = T // ps
        self.offload(first // ps, k[:, :, : full * ps].reshape(B, H, full, ps, D), v[:, :, : full * ps].reshape(B, H, full, ps, D))
        if T % ps:  # the partial last page goes to the host too (decode steps write the rest through)
            pad = (0, 0, 0, ps - T % ps)
            tail = [torch.nn.functional.pad(t[:, :, full * ps :], pad).unsqueeze(2) for t in (k, v)]
            self.offload(first // ps + full, *tail)
        self.join()
        self.slot_page.fill_(-1)
        if T % ps:
            self.start_page(first // ps + full)
            self.write_current(k[:, :, full * ps :], v[:, :, full * ps :], 0)
        return first, k, v

    def start_page(self, page: int | torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Give every row a free slot for its new current page `page` (an int, or a device tensor [1]); with
        `where` (a device bool [1], a compiled step) only where it holds, with no Python branch."""
        self.join()
        # first free slot per row; the slot count guarantees one exists (topk + current + tail pages)
        free = (self.slot_page < 0).to(torch.int8).argmax(-1)
        self.cur_slot.copy_(free if where is None else torch.where(where, free, self.cur_slot))
        idx = self.cur_slot.unsqueeze(-1)
        page = torch.as_tensor(page, device=self.device).view(1, 1, 1).expand_as(idx)
        self.slot_page.scatter_(-1, idx, page if where is None else torch.where(where, page, self.slot_page.gather(-1, idx)))

    def write_token(self, k, v, pos: torch.Tensor, new_page: bool | None) -> None:
        """Decode: one token [B, H, 1, D] at position `pos` (device tensor [1]) into the current page, which
        it starts if `new_page` (None: decided on the device, for a compiled step), and into the host pool."""
        self.join()
        if new_page is None:
            self.start_page(pos // self.page_size, where=pos % self.page_size == 0)
        elif new_page:
            self.start_page(pos // self.page_size)
        idx = (self._b, self._h, self.cur_slot, pos % self.page_size)
        self.k.index_put_(idx, k[:, :, 0])
        self.v.index_put_(idx, v[:, :, 0])
        self.write_through(k, v, pos)

    def clear(self) -> None:
        """Nothing resident (a reused cache's next request)."""
        self.join()
        self.slot_page.fill_(-1)
        self.cur_slot.zero_()

    def write_current(self, k, v, offset: int) -> None:
        """Write tokens [B, H, n, D] into every row's current page from `offset` on."""
        self.join()
        self.k[self._b, self._h, self.cur_slot, offset : offset + k.shape[2]] = k
        self.v[self._b, self._h, self.cur_slot, offset : offset + v.shape[2]] = v

    def current_page(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current page of every row, [B, H, 1, page, D]."""
        self.join()
        idx = self.cur_slot.view(*self.cur_slot.shape, 1, 1, 1).expand(-1, -1, 1, *self.k.shape[3:])
        return self.k.gather(2, idx), self.v.gather(2, idx)

    def summarise_page(self, valid, page: torch.Tensor, page_valid=None, use_kernels="auto") -> None:
        """The metadata of the current page, `page` (device tensor [1]), from its slot (ops.summarise_page)."""
        self.join()
        ops.summarise_page(self.k, valid, page, self.page_size, *self.meta.buffers(), page_valid, self.cur_slot,
                           use_kernels)

    # ---- promotion: host -> GPU slots ----------------------------------------------------------
    def promote(self, selected: torch.Tensor, current_page: torch.Tensor, active: torch.Tensor | None = None,
                after: torch.Tensor | None = None) -> None:
        """Make the resident set exactly `selected` [B, H, K] (page ids, -1 = none) plus the current page;
        with `active` (a device bool [1], a compiled step's rerank flag), only where it holds, and after `after`.

        Slots of demoted pages are freed; newly selected pages are copied from the host pool into them.
        Fixed shapes, no host sync: every (row, k) entry is a copy job, and the ones with nothing to copy
        carry index -1, which the copy skips (ops.plan_promotion)."""
        self.join()
        src_idx, dst_idx = ops.plan_promotion(self.slot_page, selected, current_page, active, after=after)
        ps, D = self.k.shape[3:]
        self.wait_offloads(host_reader=not self.pin)
        ops.copy_pages(self.host_k_mapped.view(-1, ps, D), src_idx, self.k.view(-1, ps, D), dst_idx,
                       pair=(self.host_v_mapped.view(-1, ps, D), self.v.view(-1, ps, D)))

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
        self.promoting = (done, self.host_k, self.host_v, self.host_k_mapped, self.host_v_mapped)  # alive until done

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

    def attention_group(self, heads: torch.Tensor, pending: bool) -> ops.PageGroup:
        """What decode attention reads: the slots as page pools, addressed by entry of the slot table."""
        self.join()
        ps, D = self.k.shape[3:]
        return ops.PageGroup(self.k.view(-1, ps, D), self.v.view(-1, ps, D), self.slot_page, heads,
                             by_entry=True, pending=pending)

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
        self._map_host()

    def gpu_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def host_bytes(self, pages: int) -> int:
        """Bytes of the first `pages` pages of the host pool (K and V)."""
        return 2 * pages * self.host_k[0].nbytes

