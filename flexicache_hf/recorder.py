"""SelectionRecorder: which pages each KV head selected, step by step (opt-in: `cache.record_selections()`).

Without a recorder the decode step records nothing and pays nothing. With one, every selection is copied to
the CPU as it is made: the unstable heads' top-K each decode step, the stable heads' top-K at each rerank
(every `rerank_interval` steps; between reranks a stable head's set holds still). Recorded steps run eagerly
(a recorder turns CUDA-graph replay off for as long as it is attached).

    rec = cache.record_selections()          # from the next decode step on
    model.generate(...)
    rec.positions()                          # the decode positions seen (the token index of each step)
    rec.stable_heads(), rec.unstable_heads() # told apart by how often each head selected
    steps, held = rec.selection_matrix(layer, head)   # [steps, pages] bool: the set each step holds
    cache.record_selections(False)           # stop

Page ids are the cache's: page p holds tokens p * page_size .. (p + 1) * page_size - 1 of the sequence
(left padding included). A selection of fewer than K pages (few candidates) is padded with -1, which the
helpers here drop.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class SelectionRecorder:
    def __init__(self, page_size: int):
        self.page_size = page_size
        # (layer, kv head) -> list of (position of the decoded token, page ids [B, K] on the CPU)
        self.selections: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)

    def record(self, layer: int, position: int, heads: list[int], pages: torch.Tensor) -> None:
        """pages [B, len(heads), K]: the page ids `heads` of `layer` selected for the token at `position`."""
        pages = pages.detach().to("cpu")
        for i, head in enumerate(heads):
            self.selections[(layer, head)].append((position, pages[:, i]))

    # ---- reading what was recorded ------------------------------------------------------------------
    def clear(self) -> None:
        """Forget everything recorded (the recorder stays attached)."""
        self.selections.clear()

    def heads(self) -> list[tuple[int, int]]:
        """Every (layer, KV head) that selected at least once, in order."""
        return sorted(k for k, v in self.selections.items() if v)

    def positions(self) -> list[int]:
        """Every decode position at which some head selected: the recorded steps, in order."""
        return sorted({p for v in self.selections.values() for p, _ in v})

    def selection_positions(self, layer: int, head: int) -> list[int]:
        """The positions at which this head selected (every step for an unstable head, the reranks for a
        stable one)."""
        return [p for p, _ in self.selections.get((layer, head), [])]

    def is_stable(self, layer: int, head: int) -> bool:
        """A head is stable if it selected at fewer of the recorded steps than some other head did, i.e. only
        at reranks. (With no unstable head anywhere every head selects at the same steps and none is told
        apart: pass the profile's split to the pictures instead.)"""
        mine = set(self.selection_positions(layer, head))
        return bool(mine) and len(mine) < len(self.positions())

    def stable_heads(self) -> list[tuple[int, int]]:
        return [k for k in self.heads() if self.is_stable(*k)]

    def unstable_heads(self) -> list[tuple[int, int]]:
        return [k for k in self.heads() if not self.is_stable(*k)]

    def num_pages(self) -> int:
        """Pages the recorded steps could have selected from: up to the page of the last position."""
        steps = self.positions()
        return steps[-1] // self.page_size + 1 if steps else 0

    def pages_at(self, layer: int, head: int, batch: int = 0) -> list[tuple[int, list[int]]]:
        """(position, the page ids selected there, -1 dropped) for each selection of this head, row `batch`."""
        return [(p, [int(x) for x in ids[batch].tolist() if x >= 0]) for p, ids in self.selections.get((layer, head), [])]

    def selection_matrix(self, layer: int, head: int, batch: int = 0, num_pages: int | None = None):
        """(positions, held): held [len(positions), num_pages] bool, True where the head's latest selection
        at or before that step contains the page. An unstable head's rows change each step; a stable head's
        rows hold still from one rerank to the next. Steps before the head's first selection are all False.
        (A row is the selection made at or before that step: a periodic rerank's new set is attended from the
        step after it, docs/method.md "Rerank and promotion"; stable heads also attend the pages written since.)"""
        steps = self.positions()
        num_pages = num_pages or self.num_pages()
        held = torch.zeros(len(steps), num_pages, dtype=torch.bool)
        chosen = dict(self.pages_at(layer, head, batch))
        current: list[int] = []
        for i, p in enumerate(steps):
            current = chosen.get(p, current)
            held[i, [x for x in current if x < num_pages]] = True
        return steps, held

    def hits(self, layer: int, head: int, pages, batch: int = 0) -> float:
        """The share of recorded steps at which this head holds any of `pages` (e.g. the needle's)."""
        steps, held = self.selection_matrix(layer, head, batch)
        if not steps:
            return 0.0
        wanted = [p for p in pages if p < held.shape[1]]
        return float(held[:, wanted].any(1).float().mean()) if wanted else 0.0

    def turnover(self, layer: int, head: int, batch: int = 0) -> float:
        """Mean share of the held set that changes from one recorded step to the next (0: never moves)."""
        _, held = self.selection_matrix(layer, head, batch)
        if held.shape[0] < 2:
            return 0.0
        new = (held[1:] & ~held[:-1]).sum(1).float()
        size = held[1:].sum(1).clamp(min=1).float()
        return float((new / size).mean())

    def __repr__(self) -> str:
        return (f"SelectionRecorder({len(self.positions())} steps, {len(self.unstable_heads())} unstable and "
                f"{len(self.stable_heads())} stable heads, page_size={self.page_size})")
