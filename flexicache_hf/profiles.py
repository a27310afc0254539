"""HeadProfile: which KV heads are unstable (re-select every step, all pages on the GPU).

A profile is plain JSON (never pickle). Required keys: num_layers, num_kv_heads, unstable
([[layer, kv_head], ...]). Everything else (model_id, page_size, topk_pages, instability scores,
recall, source, tool version) is kept as metadata and written back unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any


@dataclass
class HeadProfile:
    num_layers: int
    num_kv_heads: int
    unstable: list[tuple[int, int]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HeadProfile.{name} must be a positive int, got {value!r}")
        pairs = []
        for item in self.unstable:
            try:
                layer, head = (int(x) for x in item)
            except (TypeError, ValueError):
                raise ValueError(f"HeadProfile.unstable entries must be (layer, kv_head) pairs, got {item!r}") from None
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
                raise ValueError(
                    f"HeadProfile.unstable entry {(layer, head)} is out of range for a model of "
                    f"{self.num_layers} layers x {self.num_kv_heads} KV heads"
                )
            pairs.append((layer, head))
        if len(set(pairs)) != len(pairs):
            raise ValueError("HeadProfile.unstable lists a (layer, kv_head) pair more than once")
        self.unstable = sorted(pairs)

    # ---- queries used by the cache -------------------------------------------------------------
    def unstable_heads(self, layer: int) -> list[int]:
        return [h for (l, h) in self.unstable if l == layer]

    @property
    def unstable_fraction(self) -> float:
        return len(self.unstable) / (self.num_layers * self.num_kv_heads)

    @property
    def model_id(self) -> str | None:
        return self.metadata.get("model_id")

    def check_model(self, num_layers: int, num_kv_heads: int, model_id: str | None = None) -> None:
        """Raise if the profile's shape does not match the model; warn on a model-id mismatch."""
        if (num_layers, num_kv_heads) != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"Head profile is for {self.num_layers} layers x {self.num_kv_heads} KV heads"
                f"{f' ({self.model_id})' if self.model_id else ''}, but the model has {num_layers} layers x "
                f"{num_kv_heads} KV heads: pass the profile made for this model (or profile='auto')"
            )
        if model_id and self.model_id and _norm_id(model_id) != _norm_id(self.model_id):
            warnings.warn(
                f"Head profile was made for {self.model_id!r} but is used with {model_id!r}; "
                "the shapes match, but stable heads may differ between models",
                stacklevel=3,
            )

    # ---- JSON ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "HeadProfile":
        missing = [k for k in ("num_layers", "num_kv_heads", "unstable") if k not in data]
        if missing:
            raise ValueError(f"Head profile JSON lacks required keys {missing}")
        meta = {k: v for k, v in data.items() if k not in ("num_layers", "num_kv_heads", "unstable")}
        return cls(int(data["num_layers"]), int(data["num_kv_heads"]), [tuple(p) for p in data["unstable"]], meta)

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "unstable": [list(p) for p in self.unstable],
            **self.metadata,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeadProfile":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not a JSON head profile: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    # ---- simple constructors -------------------------------------------------------------------
    @classmethod
    def all_stable(cls, num_layers: int, num_kv_heads: int) -> "HeadProfile":
        return cls(num_layers, num_kv_heads, [], {"source": "all heads stable"})

    @classmethod
    def all_unstable(cls, num_layers: int, num_kv_heads: int) -> "HeadProfile":
        pairs = [(l, h) for l in range(num_layers) for h in range(num_kv_heads)]
        return cls(num_layers, num_kv_heads, pairs, {"source": "all heads unstable (Quest-style)"})


def _norm_id(model_id: str) -> str:
    return model_id.rstrip("/").split("/")[-1].lower()
