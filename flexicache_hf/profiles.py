"""HeadProfile: which KV heads are unstable (re-select every step, all pages on the GPU).

A profile is plain JSON (never pickle). Required keys: num_layers, num_kv_heads, unstable
([[layer, kv_head], ...]). Everything else (model_id, page_size, topk_pages, instability scores,
recall, source, tool version) is kept as metadata and written back unchanged.
"""

from __future__ import annotations

import json
import math
import operator
import os
import reprlib
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

REQUIRED = ("num_layers", "num_kv_heads", "unstable")
SHAPE = "{num_layers, num_kv_heads, unstable: [[layer, kv_head], ...]}"  # what load() expects


def _int(value, what: str) -> int:
    """A real int (numpy ints too, via __index__); 2.0, "2" and True are typos, not counts."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a whole number, got {value!r}: write an int, not a float, string or bool") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows: write a finite number or null")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses to inf
        raise ValueError(f"{text} is not a finite number: write a finite number or null")
    return value


@dataclass
class HeadProfile:
    num_layers: int
    num_kv_heads: int
    unstable: list[tuple[int, int]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads"):
            value = _int(getattr(self, name), f"HeadProfile.{name}")
            if value < 1:
                raise ValueError(f"HeadProfile.{name} must be a positive int, got {value!r}")
            setattr(self, name, value)
        if not isinstance(self.unstable, (list, tuple)):
            raise ValueError(f"HeadProfile.unstable must be a list of [layer, kv_head] pairs, got {reprlib.repr(self.unstable)}: "
                             "write [] if every head is stable")
        pairs = []
        for item in self.unstable:
            # only lists and tuples: a string "01" or a dict would unpack into a pair
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"HeadProfile.unstable entries must be [layer, kv_head] pairs, got {reprlib.repr(item)}")
            layer, head = (_int(x, f"HeadProfile.unstable entry {item!r}: each index") for x in item)
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
                raise ValueError(
                    f"HeadProfile.unstable entry {(layer, head)} is out of range for a model of "
                    f"{self.num_layers} layers x {self.num_kv_heads} KV heads"
                )
            pairs.append((layer, head))
        if len(set(pairs)) != len(pairs):
            raise ValueError("HeadProfile.unstable lists a (layer, kv_head) pair more than once")
        self.unstable = sorted(pairs)
        if not isinstance(self.metadata, dict):
            raise ValueError(f"HeadProfile.metadata must be a dict, got {type(self.metadata).__name__}")
        odd = [k for k in self.metadata if not isinstance(k, str)]
        if odd:  # JSON would turn them into strings: the profile would not load back the same
            raise ValueError(f"HeadProfile.metadata keys must be str, got {odd}")
        clash = [k for k in REQUIRED if k in self.metadata]
        if clash:
            raise ValueError(f"HeadProfile.metadata must not hold {clash}: they are the profile's own fields; "
                             "pass them as arguments, or rename the metadata keys")

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
        if not isinstance(data, dict):
            raise ValueError(f"a head profile must be a JSON object, got {type(data).__name__}")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f"Head profile JSON lacks required keys {missing}")
        meta = {k: v for k, v in data.items() if k not in REQUIRED}
        return cls(data["num_layers"], data["num_kv_heads"], data["unstable"], meta)  # __post_init__ checks types

    def to_dict(self) -> dict:
        # metadata can be edited after __post_init__: the required keys always win (and come first)
        meta = {k: v for k, v in self.metadata.items() if k not in REQUIRED}
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "unstable": [list(p) for p in self.unstable], **meta}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeadProfile":
        """Read a JSON profile; anything else (pickle, binary, NaN, ...) is a ValueError naming the file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"{path} is a directory, not a JSON head profile {SHAPE}: give the .json file in it")
        with open(path, "rb") as f:  # FileNotFoundError names the path
            raw = f.read()
        try:
            # never unpickle: a profile is data, and a pickle runs code when loaded
            data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
            return cls.from_dict(data)
        except UnicodeDecodeError:
            why = "it is not UTF-8 text (a binary or pickle file? profiles are JSON only)"
        except RecursionError:
            why = "it is nested too deeply"
        except ValueError as e:  # JSONDecodeError and the checks of from_dict / __post_init__
            why = str(e)
        raise ValueError(f"{path} is not a JSON head profile ({why}); expected an object {SHAPE}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically: on any failure an existing file at `path` is left as it was."""
        path = os.fspath(path)
        bad = [k for k, v in self.metadata.items() if not _json_ok(v)]
        if bad:
            raise ValueError(f"Cannot save the head profile to {path}: metadata {bad} is not JSON (use str, int, "
                             "finite float, bool, None, and lists / dicts of them): convert or drop those keys")
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        folder, name = os.path.split(os.path.realpath(path))  # through a symlink, not over it
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: os.replace is atomic
        try:
            with open(tmp, "x", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(folder, name))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    # ---- simple constructors -------------------------------------------------------------------
    @classmethod
    def all_stable(cls, num_layers: int, num_kv_heads: int) -> "HeadProfile":
        return cls(num_layers, num_kv_heads, [], {"source": "all heads stable"})

    @classmethod
    def all_unstable(cls, num_layers: int, num_kv_heads: int) -> "HeadProfile":
        pairs = [(l, h) for l in range(num_layers) for h in range(num_kv_heads)]
        return cls(num_layers, num_kv_heads, pairs, {"source": "all heads unstable (Quest-style)"})


def _json_ok(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def _norm_id(model_id: str) -> str:
    return model_id.rstrip("/").split("/")[-1].lower()
