"""Data and scoring of the flexicache_* lm-eval tasks: generated offline by flexicache_hf.eval.tasks.

lm-eval calls the `custom_dataset` functions with the task metadata (`--metadata` JSON) merged with the
model args: the tokenizer that sizes the prompts comes from `tokenizer` or `pretrained` (smollm2 |
qwen-coder-0.5b | a local HF folder); `lengths` (or RULER's `max_seq_lengths`), `samples`, `seed` choose
the data. Prompts already hold the model's chat template and the answer prefix: run without
--apply_chat_template.
"""

from __future__ import annotations

from functools import lru_cache

DEFAULT_LENGTHS = (4096,)


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from flexicache_hf.models import MODEL_ALIASES, QWEN_CODER_ID, SMOLLM2_ID, cache_dir, load_model

    model_id = MODEL_ALIASES.get(name.lower(), name)
    if model_id in (SMOLLM2_ID, QWEN_CODER_ID):
        local = cache_dir() / model_id.split("/")[-1]
        if not (local / "tokenizer_config.json").is_file():
            load_model(name)  # makes the local copy (dequantizes the GGUF once)
        return AutoTokenizer.from_pretrained(local)
    return AutoTokenizer.from_pretrained(name)


def _dataset(task: str, **kwargs):
    import datasets

    from flexicache_hf.eval.tasks import build_dataset

    name = kwargs.get("tokenizer") or kwargs.get("pretrained") or kwargs.get("model") or "smollm2"
    lengths = kwargs.get("lengths") or kwargs.get("max_seq_lengths") or DEFAULT_LENGTHS
    if isinstance(lengths, (int, str)):
        lengths = [int(x) for x in str(lengths).replace(";", ",").split(",") if str(x).strip()]
    ds = build_dataset(_tokenizer(str(name)), [task], [int(x) for x in lengths], int(kwargs.get("samples", 3)),
                       seed=int(kwargs.get("seed", 0)))
    return datasets.DatasetDict({"test": ds})


def niah_single(**kw):
    return _dataset("niah_single", **kw)


def niah_single_docs(**kw):
    return _dataset("niah_single_docs", **kw)


def niah_multikey(**kw):
    return _dataset("niah_multikey", **kw)


def niah_multivalue(**kw):
    return _dataset("niah_multivalue", **kw)


def niah_multiquery(**kw):
    return _dataset("niah_multiquery", **kw)


def vt(**kw):
    return _dataset("vt", **kw)


def cwe(**kw):
    return _dataset("cwe", **kw)


def fwe(**kw):
    return _dataset("fwe", **kw)


def qa_code(**kw):
    return _dataset("qa_code", **kw)


def qa_docs(**kw):
    return _dataset("qa_docs", **kw)


def niah_single_story(**kw):
    return _dataset("niah_single_story", **kw)


def niah_single_logs(**kw):
    return _dataset("niah_single_logs", **kw)


def niah_single_csv(**kw):
    return _dataset("niah_single_csv", **kw)


def process_results(doc, results):
    """Score with the repo's metric functions (the same code as the evaluate modules in eval/metrics)."""
    import importlib.util
    import os

    metric = doc["metric"]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metrics", metric, f"{metric}.py")
    spec = importlib.util.spec_from_file_location(f"_flexicache_metric_{metric}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn = mod.recall if metric == "string_match_recall" else mod.contains
    return {"score": fn(results[0], doc["answers"])}
