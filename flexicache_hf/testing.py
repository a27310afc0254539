"""Helpers for checking the no-data-loss property: keep a copy of every K/V a cache's update() received."""

from __future__ import annotations

import torch


class UpdateRecorder:
    """Wraps `cache.update` so that every (key, value) it receives is kept, per layer."""

    def __init__(self, cache):
        self.received: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        inner = cache.update

        def update(k, v, layer_idx, *args, **kwargs):
            self.received.setdefault(layer_idx, []).append((k.clone(), v.clone()))
            return inner(k, v, layer_idx, *args, **kwargs)

        cache.update = update
        self.cache = cache

    def kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.received[layer_idx]
        return torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)

    def all_exact(self) -> bool:
        """Whether `full_kv` of every layer equals, bit for bit, what update() received."""
        for i in self.received:
            k, v = self.kv(i)
            fk, fv = self.cache.full_kv(i)
            if not (torch.equal(k, fk) and torch.equal(v, fv)):
                return False
        return True
