"""SelectionRecorder: which pages each KV head selected, step by step (opt-in: `cache.record_selections()`).

Without a recorder the decode step records nothing and pays nothing. With one, every selection is copied to
the CPU as it is made: the unstable heads' top-K each decode step, the stable heads' top-K at each rerank.
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
