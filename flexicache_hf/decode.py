"""One decode step of one layer: select pages, attend to them. Engine-neutral (no transformers).

    decode_step(q, memory, scorer, ...)   after the layer's update stored the token (memory.append_token):
      1. unstable heads: the scorer ranks their pages, top-K + the current page -> their page table
      2. stable heads:  at a rerank the scorer re-selects their top-K; the first step after a multi-token
                        forward promotes at once, a periodic rerank in the background (its pages serve
                        from the next step on)
      3. attention over both groups' pages in one launch (ops.paged_decode_attention)

Scorers are small objects: how a page is summarised when it fills (metadata) and how pages are ranked for
a query. `MinMaxBound` is the paper's (Quest's) bound; `SketchMax` / `SketchMass` keep every token's key at
a few bits per channel inside its page's box and rank by the best sketched q.k or by the attention mass
the sketches predict (docs/method.md, "Page selection" and "Key sketches").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from flexicache_hf import ops


class DecodeFlags(NamedTuple):
    """What a decode step does besides select + attend; derived from the length (memory.length) and the
    length at the last full selection, before the step."""

    new_page: bool  # the token starts a page: stable heads give it a slot
    fill: bool  # the token fills its page: metadata, and the stable heads' page goes to the host pool
    rerank: bool  # stable heads re-select and promote
    first: bool  # the first step after a multi-token forward: promote at once (nothing is resident)

    @classmethod
    def at(cls, length: int, selected_at: int, page_size: int, rerank_interval: int, has_stable: bool) -> "DecodeFlags":
        since = length - selected_at  # decode steps since the last full selection
        return cls(new_page=length % page_size == 0, fill=(length + 1) % page_size == 0,
                   rerank=has_stable and since % rerank_interval == 0, first=since == 0)


# ---- scorers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MinMaxBound:
    """Quest's bound on a page's largest q.k from the channel-wise min/max of its keys: q.c + spread * |q|.r
    (c, r: the key box's centre and half-width). spread 1.0 is the bound; smaller values rank closer to the
    true attention on small models but are no longer a bound."""

    spread: float = 1.0
    sketch_bits = 0

    def summarise(self, keys, valid, page_size, use_kernels="auto"):
        """keys [B, H, n * page_size, D], valid [B, n * page_size] -> kmin, kmax [B, H, n, D], codes (None)."""
        return (*ops.page_minmax(keys, valid, page_size, use_kernels), None)

    def select(self, q, kmin, kmax, codes, page_valid, current, k, heads, scale, append_current, use_kernels):
        """Top-k candidate pages per row (ops.select_pages_ref): [B*Hg, k (+1 with append_current)]."""
        return ops.select_pages(q, kmin, kmax, page_valid, current, k, append_current, heads, use_kernels,
                                spread=self.spread)


@dataclass(frozen=True)
class SketchMax:
    """Every token's key at `bits` bits per channel inside its page's min/max box; a page ranks by its best
    sketched q.k."""

    bits: int = 2

    @property
    def sketch_bits(self) -> int:
        return self.bits

    def summarise(self, keys, valid, page_size, use_kernels="auto"):
        kmin, kmax = ops.page_minmax(keys, valid, page_size, use_kernels)
        return kmin, kmax, ops.page_sketch(keys, valid, kmin, kmax, page_size, self.bits)

    def select(self, q, kmin, kmax, codes, page_valid, current, k, heads, scale, append_current, use_kernels):
        return ops.select_pages(q, kmin, kmax, page_valid, current, k, append_current, heads, use_kernels,
                                codes=codes, mass_scale=self._mass_scale(scale))

    def _mass_scale(self, scale):
        return None


@dataclass(frozen=True)
class SketchMass(SketchMax):
    """Key sketches as in SketchMax; a page ranks by the attention mass its sketched keys predict, each
    query head's softmax over the candidate pages summed over the GQA group (ops.page_mass_ref)."""

    def _mass_scale(self, scale):
        return scale


SCORERS = {"minmax": MinMaxBound, "sketch_max": SketchMax, "sketch_mass": SketchMass}


# ---- the step ----------------------------------------------------------------------------------------
def decode_step(q, memory, scorer, flags: DecodeFlags, topk: int, scale: float, use_kernels="auto",
                record=None) -> torch.Tensor:
    """Attention of one new token: q [B, H, G, D] (H KV heads, G query heads each) -> [B, H, G, D].
    `record(table)`, if given, sees the unstable heads' top-K page ids each step (online calibration)."""
    current = memory.current_page()
    table = promote = None
    if memory.unstable is not None:  # every step; the current page is the table's last entry
        table = scorer.select(q, *memory.selection_inputs(memory.unstable), current, topk, memory.unstable_heads,
                              scale, True, use_kernels).view(memory.batch, len(memory.unstable_heads), -1)
        if record is not None:
            record(table[..., :-1])
    if memory.stable is not None and flags.rerank:
        selected = scorer.select(q, *memory.selection_inputs(memory.stable), current, topk, memory.stable_heads,
                                 scale, False, use_kernels).view(memory.batch, len(memory.stable_heads), -1)
        if flags.first:  # nothing is resident yet: this step reads the new set
            memory.promote(selected, background=False)
        else:  # a periodic rerank: this step still reads the old set, the next ones the new set
            promote = selected
    groups = memory.attention_groups(table, stable_pending=flags.rerank and promote is None)
    out = ops.paged_decode_attention(q, groups, memory.kv_valid, scale, use_kernels)
    if promote is not None:
        memory.promote(promote, background=True)
    memory.next_position()
    return out
