"""Scorers: how a page is summarised when it fills (its selection metadata) and how pages are ranked for a
decode query. Engine-neutral (no transformers). Chosen with FlexiCacheConfig(scorer=...).

`MinMaxBound` is the paper's (Quest's) bound; `SketchMax` / `SketchMass` keep every token's key at a few
bits per channel inside its page's box and rank by the best sketched q.k or by the attention mass the
sketches predict (docs/method.md, "Page selection" and "Key sketches"). `SketchMass(2)` is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexicache_hf import ops


class PageSummary:
    """What every scorer keeps of a page: its keys' min/max box and, with sketch_bits > 0, their key sketch."""

    def summarise(self, keys, valid, page_size, use_kernels="auto"):
        """keys [B, H, n * page_size, D], valid [B, n * page_size] -> kmin, kmax [B, H, n, D], codes (None without
        a sketch): ops.page_summary. A decode step summarises its page in place with the same op's in-place form
        (ops.summarise_page), at the bits its metadata was allocated with (FlexiCacheConfig.sketch_bits)."""
        return ops.page_summary(keys, valid, page_size, self.sketch_bits, use_kernels)


@dataclass(frozen=True)
class MinMaxBound(PageSummary):
    """Quest's bound on a page's largest q.k from the channel-wise min/max of its keys: q.c + spread * |q|.r
    (c, r: the key box's centre and half-width). spread 1.0 is the bound; smaller values rank closer to the
    true attention on small models but are no longer a bound."""

    spread: float = 1.0
    sketch_bits = 0

    def select(self, q, kmin, kmax, codes, page_valid, current, k, heads, scale, append_current, use_kernels,
               skip=None):
        """Top-k candidate pages per row (ops.select_pages_ref): [B*Hg, k (+1 with append_current)]; none where
        the device flag `skip` holds."""
        return ops.select_pages(q, kmin, kmax, page_valid, current, k, append_current, heads, use_kernels,
                                spread=self.spread, skip=skip)


@dataclass(frozen=True)
class SketchMax(PageSummary):
    """Every token's key at `bits` bits per channel inside its page's min/max box; a page ranks by its best
    sketched q.k."""

    bits: int = 2

    @property
    def sketch_bits(self) -> int:
        return self.bits

    def select(self, q, kmin, kmax, codes, page_valid, current, k, heads, scale, append_current, use_kernels,
               skip=None):
        return ops.select_pages(q, kmin, kmax, page_valid, current, k, append_current, heads, use_kernels,
                                codes=codes, mass_scale=self._mass_scale(scale), skip=skip)

    def _mass_scale(self, scale):
        return None


@dataclass(frozen=True)
class SketchMass(SketchMax):
    """Key sketches as in SketchMax; a page ranks by the attention mass its sketched keys predict, each
    query head's softmax over the candidate pages summed over the GQA group (ops.page_mass_ref)."""

    def _mass_scale(self, scale):
        return scale


SCORERS = {"minmax": MinMaxBound, "sketch_max": SketchMax, "sketch_mass": SketchMass}
