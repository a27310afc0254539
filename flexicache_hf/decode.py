"""One decode step of one layer: select pages, attend to them. Engine-neutral (no transformers).

    decode_step(q, memory, scorer, ...)   after the layer's update stored the token (memory.append_token):
      1. unstable heads: the scorer ranks their pages, top-K + the current page -> their page table
      2. stable heads:  at a rerank the scorer re-selects their top-K; the first `warmup_steps` steps after a
                        multi-token forward promote at once (this step reads the new set), a periodic rerank
                        in the background (its pages serve from the next step on)
      3. attention over both groups' pages in one launch (ops.paged_decode_attention)

The scorer (scorers.py) is a small object: how a page is summarised when it fills and how pages rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flexicache_hf import ops


class DecodeFlags(NamedTuple):
    """What a decode step does besides select + attend; derived from the length (memory.length) and the
    length at the last full selection, before the step."""

    new_page: bool | None  # the token starts a page: stable heads give it a slot (None: the device decides)
    fill: bool | None  # the token fills its page: metadata, and the stable heads' page goes to the host pool
    rerank: bool  # stable heads re-select and promote
    first: bool  # promote at once, before attention: the first step after a multi-token forward (nothing is
    #              resident) and every step of the warm-up after it

    @classmethod
    def at(cls, length: int, selected_at: int, page_size: int, rerank_interval: int, has_stable: bool,
           warmup_steps: int = 0) -> "DecodeFlags":
        """The step kind. During the first `warmup_steps` decode steps after a multi-token forward the stable
        heads re-select at every step with immediate effect (docs/method.md, "Rerank and promotion"); after
        them, a periodic rerank every `rerank_interval` steps (counted from that forward), which promotes after
        attention. LayerMemory.rerank_flags is the same rule on the device."""
        since = length - selected_at  # decode steps since the last multi-token forward
        first = since == 0 or since < warmup_steps
        return cls(new_page=length % page_size == 0, fill=(length + 1) % page_size == 0,
                   rerank=has_stable and (first or since % rerank_interval == 0), first=first)


DecodeFlags.PLAIN = DecodeFlags(False, False, False, False)  # most steps: write the token, select, attend
# a compiled step that may start or fill a page (decided on the device: None) but is no rerank
DecodeFlags.PAGE = DecodeFlags(None, None, False, False)


# ---- the step ----------------------------------------------------------------------------------------
def decode_step(q, memory, scorer, flags: DecodeFlags | None, topk: int, scale: float, use_kernels="auto",
                record=None) -> torch.Tensor:
    """Attention of one new token: q [B, H, G, D] (H KV heads, G query heads each) -> [B, H, G, D].

    flags: the step kind; None for a compiled step that decides it on the device, with no Python branch on it
    (compiled steps that are no rerank get DecodeFlags.PLAIN or .PAGE, graphs of their own): the stable heads'
    selection is launched but selects (and their promotions apply) only where the device flags
    (memory.rerank_flags) say, which leaves the same state as the eager step (the promotion of a periodic rerank runs after
    attention on the compute stream instead of the copy stream).
    `record(group, pages)`, if given, sees each selection: ("unstable", their top-K page ids [B, Hu, K]) every
    step, ("stable", [B, Hs, K]) at a rerank (online calibration, a SelectionRecorder)."""
    current = memory.current_page()
    table = promote = None
    if memory.unstable is not None:  # every step; the current page is the table's last entry
        table = scorer.select(q, *memory.selection_inputs(memory.unstable), current, topk, memory.unstable_heads,
                              scale, True, use_kernels).view(memory.batch, len(memory.unstable_heads), -1)
        if record is not None:
            record("unstable", table[..., :-1])
    if memory.stable is not None and (flags is None or flags.rerank):
        # a compiled step launches the stable heads' selection every step; its kernels return at once unless
        # the device flags say rerank
        rerank, first = memory.rerank_flags() if flags is None else (None, None)
        selected = scorer.select(q, *memory.selection_inputs(memory.stable), current, topk, memory.stable_heads,
                                 scale, False, use_kernels, skip=None if rerank is None else ~rerank
                                 ).view(memory.batch, len(memory.stable_heads), -1)
        if record is not None:
            record("stable", selected)
        if flags is None:
            memory.promote(selected, background=False, active=first)
            promote = (selected, rerank & ~first)
        elif flags.first:  # nothing is resident yet: this step reads the new set
            memory.promote(selected, background=False)
        else:  # a periodic rerank: this step still reads the old set, the next ones the new set
            promote = (selected, None)
    pending = flags is None or (flags.rerank and promote is None)
    out = ops.paged_decode_attention(q, memory.attention_groups(table, stable_pending=pending), memory.valid_tokens(),
                                     scale, use_kernels)
    if promote is not None:
        memory.promote(promote[0], background=flags is not None, active=promote[1], after=out)
    memory.next_position()
    return out
