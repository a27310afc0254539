"""Shipped head profiles: find the one made for a model.

The JSON files of the package `flexicache_hf.shipped_profiles` (repo folder profiles/, package data) are HeadProfiles whose
metadata carry `model_id` and `config_fingerprint`. `find_profile` takes a model id, a config or a model
and tries, in order:

1. the model id: the last path component of the id / `config._name_or_path`, case-insensitive, equal to
   that of a profile's model_id ("meta-llama/Llama-3.1-8B-Instruct", "/models/llama-3.1-8b-instruct/");
2. the GGUF file name: a model loaded with `from_pretrained(dir, gguf_file=name)` has the directory as
   `_name_or_path` (often a package or download folder that names nothing) and the file name in
   `config.quantization_config["gguf_file"]` while it stays quantizer-backed. The name (or the id of step 1)
   is compared after stripping ".gguf", quantization tags ("-Q4_K_M", ".Q4_1", "-f16", "-GGUF", ...) and a
   leading "Meta-": "SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct";
3. the config's shape: (num_hidden_layers, num_key_value_heads, num_attention_heads, hidden_size,
   vocab_size) equal to a profile's config_fingerprint, if exactly one profile has it (model_type is not
   compared: a GGUF of a Mistral model loads as "llama"). This catches a GGUF whose file name was lost
   (e.g. after a save_pretrained copy into an unnamed folder), but also fine-tunes of the same base,
   which is a reasonable default (stable heads are a property of the pretrained attention); it warns.

A candidate whose (num_layers, num_kv_heads) differ from the config's is never returned. Profiles with
several published variants (the paper's: tasks gov_report / paper_assistant, K = 64 / 128 pages) return
the default one unless `task` or `topk_pages` ask for another (nearest K).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from flexicache_hf.profiles import HeadProfile

PACKAGE = "flexicache_hf.shipped_profiles"
_FINGERPRINT_KEYS = ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "hidden_size", "vocab_size")
_QUANT_TAG = re.compile(
    r"[-._ ](gguf|i?q\d[\w]*|f16|f32|bf16|fp16|fp8|awq|gptq|int[48]|\d+bit|ggml)$", re.IGNORECASE
)


@lru_cache(maxsize=1)
def _shipped() -> tuple[tuple[str, dict], ...]:
    out = []
    try:
        folder = resources.files(PACKAGE)
    except ModuleNotFoundError:  # running from a source tree that is not installed
        folder = Path(__file__).resolve().parent.parent / "profiles"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out.append((entry.name, json.loads(entry.read_text(encoding="utf-8"))))
    return tuple(out)


def list_profiles() -> dict[str, str | None]:
    """{file name: model_id} of every shipped profile."""
    return {name: data.get("model_id") for name, data in _shipped()}


def load_shipped(name: str) -> HeadProfile:
    """A shipped profile by file name ("llama-3.1-8b-instruct.json"; the ".json" may be left out)."""
    name = name if name.endswith(".json") else name + ".json"
    for fname, data in _shipped():
        if fname == name:
            return HeadProfile.from_dict(copy.deepcopy(data))
    raise FileNotFoundError(f"No shipped profile {name!r}; shipped: {sorted(list_profiles())}")


def normalize_model_name(name: str) -> str:
    """Last path component, lower case, without ".gguf", quantization tags and a leading "meta-"."""
    base = str(name).replace("\\", "/").rstrip("/").split("/")[-1].lower()
    if base.endswith(".gguf"):
        base = base[: -len(".gguf")]
    while True:
        stripped = _QUANT_TAG.sub("", base)
        if stripped == base or not stripped:
            break
        base = stripped
    return base[len("meta-"):] if base.startswith("meta-") else base


def _last(name: str) -> str:
    return str(name).replace("\\", "/").rstrip("/").split("/")[-1].lower()


def _config_of(obj) -> Any | None:
    if isinstance(obj, str):
        return None
    cfg = getattr(obj, "config", obj)  # a model, or a config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _gguf_file(obj) -> str | None:
    cfg = getattr(obj, "config", obj)
    q = getattr(cfg, "quantization_config", None)
    if isinstance(q, dict):
        return q.get("gguf_file")
    return getattr(q, "gguf_file", None)


def _shape_ok(data: dict, cfg) -> bool:
    if cfg is None:
        return True
    L = getattr(cfg, "num_hidden_layers", None)
    H = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None)
    return (L, H) == (data["num_layers"], data["num_kv_heads"])


def find_profile(model_id_or_config, *, task: str | None = None, topk_pages: int | None = None) -> HeadProfile | None:
    """The shipped HeadProfile for a model id, a config or a model; None if none fits (see module doc)."""
    cfg = _config_of(model_id_or_config)
    if isinstance(model_id_or_config, str):
        names = [model_id_or_config]
    else:
        names = [getattr(getattr(model_id_or_config, "config", model_id_or_config), "_name_or_path", "") or ""]
    gguf = None if cfg is None else _gguf_file(model_id_or_config)
    shipped = [(f, d) for f, d in _shipped() if _shape_ok(d, cfg)]
    ids = {f: d.get("model_id") or "" for f, d in shipped}

    # 1. model id, last path component
    for name in names:
        if name:
            for f, d in shipped:
                if ids[f] and _last(ids[f]) == _last(name):
                    return _variant(d, task, topk_pages)
    # 2. GGUF file name, or the id, without quantization tags
    for name in ([gguf] if gguf else []) + names:
        if name:
            key = normalize_model_name(name)
            for f, d in shipped:
                if ids[f] and normalize_model_name(ids[f]) == key:
                    return _variant(d, task, topk_pages)
    # 3. shape fingerprint, unique
    if cfg is not None:
        want = tuple(getattr(cfg, k, None) for k in _FINGERPRINT_KEYS)
        if None not in want:
            hits = [(f, d) for f, d in shipped
                    if tuple((d.get("config_fingerprint") or {}).get(k) for k in _FINGERPRINT_KEYS) == want]
            if len(hits) == 1:
                f, d = hits[0]
                warnings.warn(
                    f"Using the head profile of {d.get('model_id')!r} ({f}) for {names[0] or 'this model'!r}: "
                    "matched by config shape, not by name; pass a profile explicitly if this model differs",
                    stacklevel=2,
                )
                return _variant(d, task, topk_pages)
    return None


def _variant(data: dict, task: str | None, topk_pages: int | None) -> HeadProfile:
    data = copy.deepcopy(data)
    variants = data.get("variants")
    if variants and (task is not None or topk_pages is not None):
        want_task = task or data.get("task")
        pool = [v for v in variants.values() if v["task"] == want_task]
        if not pool:
            raise ValueError(f"{data.get('model_id')}: no profile variant for task {task!r}; "
                             f"have {sorted({v['task'] for v in variants.values()})}")
        want_k = topk_pages if topk_pages is not None else data.get("topk_pages")
        best = min(pool, key=lambda v: (abs(v["topk_pages"] - want_k), v["topk_pages"]))
        data["unstable"] = best["unstable"]
        data["task"], data["topk_pages"] = best["task"], best["topk_pages"]
        data["source"] = data.get("source", "") + f"; variant {best['source_key']!r}"
    return HeadProfile.from_dict(data)
