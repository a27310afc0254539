"""PageMetadata: what page selection reads, for every page of a head group, always on the GPU."""

from __future__ import annotations

import torch

from flexicache_hf.memory.alloc import grow


class PageMetadata:
    """Selection metadata of one head group, [B, H, capacity_pages, ...]: kmin / kmax, the channel-wise min
    and max of each full page's keys, and with key sketches the page's per-token `codes`
    [..., page_size, head_dim * sketch_bits // 8] uint8 (what a scorer summarises a page into:
    decode.py). Written once per page, when it fills; pages that live on the host have theirs here too."""

    def __init__(self, batch, heads, head_dim, page_size, capacity_pages, sketch_bits, dtype, device):
        self.kmin = torch.zeros(batch, heads, capacity_pages, head_dim, dtype=dtype, device=device)
        self.kmax = torch.zeros_like(self.kmin)
        self.codes = None
        if sketch_bits:
            self.codes = torch.zeros(batch, heads, capacity_pages, page_size, head_dim * sketch_bits // 8,
                                     dtype=torch.uint8, device=device)

    def _names(self):
        return [n for n in ("kmin", "kmax", "codes") if getattr(self, n) is not None]

    @property
    def capacity_pages(self) -> int:
        return self.kmin.shape[2]

    def reserve(self, pages: int) -> None:
        """Grow to exactly `pages` (the layer's memory decides how many: capacity_for)."""
        if pages > self.capacity_pages:
            for name in self._names():
                setattr(self, name, grow(getattr(self, name), 2, pages))

    def write(self, pages: slice, kmin, kmax, codes=None) -> None:
        """Pages `pages` of every row get this metadata (a prefill's; a decode step's page is summarised in
        place: ops.summarise_page)."""
        for dst, src in zip(self.buffers(), (kmin, kmax, codes)):
            if dst is not None:
                dst[:, :, pages] = src

    def buffers(self):
        """kmin, kmax and codes (or None) as held, [B, H, capacity, ...]: what a page's summary is written into."""
        return self.kmin, self.kmax, self.codes

    def rows(self):
        """kmin, kmax [B*H, capacity, D] and codes [B*H, capacity, page_size, bytes] (or None): one row per
        (batch, head), as page selection takes them."""
        return tuple(None if t is None else t.flatten(0, 1) for t in self.buffers())

    def select_batch(self, idx: torch.Tensor) -> None:
        for name in self._names():
            setattr(self, name, getattr(self, name).index_select(0, idx))

    def nbytes(self, pages: int) -> int:
        """Bytes of the metadata of `pages` pages (every row)."""
        return sum(getattr(self, n)[:, :, :pages].nbytes for n in self._names())
