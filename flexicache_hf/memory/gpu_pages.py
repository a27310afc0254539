"""GpuPages: the unstable heads' K/V, every page on the GPU."""

from __future__ import annotations

import torch

from flexicache_hf import ops
from flexicache_hf.memory.alloc import grow
from flexicache_hf.memory.metadata import PageMetadata


class GpuPages:
    """Unstable heads: a GPU buffer [B, H, capacity, D]; page p of row r = b * H + h is pool slot
    ops.slot_index(r, p, capacity_pages) of the buffer viewed as a page pool."""

    def __init__(self, batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device):
        self.page_size = page_size
        self.k = torch.zeros(batch, heads, capacity_pages * page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.meta = PageMetadata(batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device)

    def reserve(self, pages: int) -> None:
        if pages > self.meta.capacity_pages:
            self.k = grow(self.k, 2, pages * self.page_size)
            self.v = grow(self.v, 2, pages * self.page_size)
            self.meta.reserve(pages)

    def write(self, k, v, start: int) -> None:
        """Tokens [B, H, n, D] at positions start .. start+n-1."""
        self.k[:, :, start : start + k.shape[2]] = k
        self.v[:, :, start : start + v.shape[2]] = v

    def write_at(self, k, v, pos: torch.Tensor) -> None:
        """Decode: one token [B, H, 1, D] at position `pos` (device tensor [1])."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)

    def summarise_page(self, valid, page: torch.Tensor, page_valid=None, use_kernels="auto") -> None:
        """The metadata of page `page` (device tensor [1]) of every row, from its tokens (ops.summarise_page)."""
        ops.summarise_page(self.k, valid, page, self.page_size, *self.meta.buffers(), page_valid, None, use_kernels)

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, :length], self.v[:, :, :length]

    def attention_group(self, table: torch.Tensor, heads: torch.Tensor) -> ops.PageGroup:
        """What decode attention reads: the buffer as page pools, addressed by page id."""
        D = self.k.shape[-1]
        pools = self.k.view(-1, self.page_size, D), self.v.view(-1, self.page_size, D)
        return ops.PageGroup(*pools, table, heads, by_entry=False, pending=True)

    def select_batch(self, idx: torch.Tensor) -> None:
        self.k, self.v = self.k.index_select(0, idx), self.v.index_select(0, idx)
        self.meta.select_batch(idx)

    def bytes_in_use(self, length: int) -> int:
        B, H, _, D = self.k.shape
        return 2 * B * H * length * D * self.k.element_size()
