"""Head-stability profiling: the offline procedure that turns a model into its shipped `HeadProfile`.

The procedure of docs/method.md, "Profiling", in four modules:

- `flexicache_hf.profile_text`: the prompts, windows of CPython's own text (prose and code);
- `flexicache_hf.profile_recorder`: runs the model and records each decode step's top-K page sets
  (`record_stability` -> `StabilityRecords`);
- `flexicache_hf.stability`: RCO, TS and the consensus of unstable heads (`classify_heads`), the same
  arithmetic that profile="auto" calibrates with;
- this module: recording + classification -> `HeadProfile`, with the evidence in its metadata
  (`profile_model`, `profile_from_records`);

and `flexicache_hf.profile_plots` draws a profile; `flexicache_hf.profile_cli` is `flexicache profile`.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from flexicache_hf.profile_recorder import METHODS, StabilityRecords, num_heads, record_stability
from flexicache_hf.profiles import HeadProfile
# classify_heads and temporal_stability stay importable from here until flexicache_hf.calibration imports
# them from flexicache_hf.stability.
from flexicache_hf.stability import WINDOW, Classification, classify_heads, temporal_stability  # noqa: F401

CORPUS = "CPython standard library text: docstrings (prose), source (code), LICENSE.txt"


def _tool_version() -> str:
    import flexicache_hf

    return getattr(flexicache_hf, "__version__", None) or "0.1.0"


def config_fingerprint(config) -> dict:
    """What a model's config says about its shape; `profiles_registry` falls back to matching it."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    L, H = num_heads(config)
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": L,
        "num_key_value_heads": H,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def _grid(x: torch.Tensor, L: int, H: int, digits: int = 4) -> list[list[float]]:
    return [[round(float(v), digits) for v in row] for row in x.reshape(L, H)]


def _recall(c: Classification) -> dict:
    return {
        "heldout_recall": round(c.heldout_recall, 4),
        "heldout_recall_min": round(c.heldout_recall_min, 4),
        "heldout_recall_swapped": round(c.heldout_recall_swapped, 4),
        "heldout_consensus_overlap": round(c.heldout_consensus_overlap, 4),
        "insample_recall": round(c.insample_recall, 4),
    }


def _method_summary(c: Classification, records: StabilityRecords, method: str) -> dict:
    """One score method's classification, as metadata["methods"][method]."""
    L, H = records.num_layers, records.num_kv_heads
    return {
        "unstable": [[i // H, i % H] for i in c.unstable],
        **_recall(c),
        "mean_instability": round(float(c.instability.nanmean()), 4),
        "captured_attention_mass": round(float(torch.cat(records.captured_mass[method]).mean()), 4),
        "instability": _grid(c.instability, L, H),
    }


def profile_from_records(
    records: StabilityRecords,
    *,
    unstable: int | float = 0.25,
    method: str = "attention",
    model_id: str | None = None,
    fingerprint: dict | None = None,
    extra_metadata: dict | None = None,
) -> HeadProfile:
    """Classify the recorded heads (`classify_heads`) and build the HeadProfile with its evidence."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    L, H = records.num_layers, records.num_kv_heads
    results = {m: classify_heads(records.instability(m), unstable) for m in METHODS}
    main = results[method]
    a, b = set(results["attention"].unstable), set(results["minmax"].unstable)
    meta = {
        "model_id": model_id,
        "source": 'measured with flexicache_hf.profiling (docs/method.md, "Profiling")',
        "tool": "flexicache_hf.profiling",
        "tool_version": _tool_version(),
        "page_size": records.page_size,
        "topk_pages": records.topk_pages,
        "window": WINDOW,
        "unstable_count": main.M,
        "unstable_fraction": round(main.M / (L * H), 4),
        "score_method": method,
        "attention_group_reduce": records.group_reduce,
        "data": {**records.meta, "corpus": CORPUS, "python": platform.python_version(), "samples": records.samples},
        "chunks": main.chunks,
        "recall": {
            **_recall(main),
            "chance": round(main.chance_recall, 4),
            "definition": "heldout_recall: consensus of the even chunks vs each odd chunk's unstable set, "
                          "mean over odd chunks of |C_even ∩ U_c| / M (see flexicache_hf.stability.classify_heads)",
        },
        "instability": _grid(main.instability, L, H),
        "selection_frequency": _grid(main.frequency, L, H),
        "methods": {m: _method_summary(c, records, m) for m, c in results.items()},
        "method_overlap": round(len(a & b) / main.M, 4),
    }
    if fingerprint:
        meta["config_fingerprint"] = fingerprint
    meta.update(extra_metadata or {})
    return HeadProfile(L, H, [(i // H, i % H) for i in main.unstable], meta)


def _environment(model) -> dict:
    import transformers

    device = next(model.parameters()).device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }


def profile_model(
    model,
    tokenizer,
    *,
    samples: int = 4,
    prompt_tokens: int = 2048,
    decode_steps: int = 128,
    page_size: int = 16,
    topk_pages: int = 16,
    unstable: int | float = 0.25,
    seed: int = 0,
    data: str = "mixed",
    mode: str = "teacher",
    method: str = "attention",
    group_reduce: str = "sum",
    model_id: str | None = None,
    progress: bool = True,
    records_out: list | None = None,
) -> HeadProfile:
    """Record (`record_stability`) and classify (`profile_from_records`): the model's HeadProfile.

    method: which top-K sets define stability for the profile ("attention" mass, the ground truth of
    which pages matter, or "minmax", what the cache ranks with); both are always measured and stored
    in metadata["methods"], with the overlap of their unstable sets in metadata["method_overlap"].
    records_out: a list to append the StabilityRecords to (for plot_rco_curves).
    """
    t0 = time.perf_counter()
    records = record_stability(
        model, tokenizer, samples=samples, prompt_tokens=prompt_tokens, decode_steps=decode_steps,
        page_size=page_size, topk_pages=topk_pages, seed=seed, data=data, mode=mode,
        group_reduce=group_reduce, progress=progress,
    )
    if records_out is not None:
        records_out.append(records)
    extra = {"elapsed_s": round(time.perf_counter() - t0, 1), "environment": _environment(model)}
    return profile_from_records(
        records, unstable=unstable, method=method, model_id=model_id or model_name(model),
        fingerprint=config_fingerprint(model.config), extra_metadata=extra,
    )


def model_name(model) -> str:
    """The model id a profile records: the config's name, or a local folder's last component."""
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return name.rstrip("/").split("/")[-1] if os.path.isdir(name) else name
