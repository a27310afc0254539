"""Presets of `flexicache eval`: what to run, per model.

ci    SmolLM2-135M-Instruct on the CPU in a couple of minutes: three tasks dense solves at ~1k tokens,
      one sample each: dense, FlexiCache at the full budget and at 256 tokens, StreamingLLM and SnapKV
      at 256; and a 24-step fidelity run (FlexiCache, full and 256). tests/test_eval.py runs it and
      checks that dense solves every task and that FlexiCache at the full budget generates exactly
      dense's tokens. The peers quest and duo_attention are left out here: they would add six
      decodes (4-7 s) to that test; tests/test_peers_duo_quest.py checks them on tiny models.
cpu   what the shared 2-core development machine allows in about 1.5 h: SmolLM2 at 4k tokens, every core
      task (tasks.CORE_TASKS) and method (peers: streamingllm, snapkv, quest, duo_attention), budgets
      256/512/1024, 2 samples per task; a 1k-step fidelity run after a 2k prompt.
full  the GPU run: SmolLM2 at 4k and 8k (8128), Qwen2.5-Coder-0.5B at 4k/8k/16k/32k (32704), every
      core task (3 samples) and method, budgets 256/512/1024/2048, and a 2k-step fidelity run on the docs
      text at budgets 256 and 1024. About 3 h on one H100 (docs/accuracy.md). Resumable: it can be run
      again and again (e.g. in 10-minute slices) until done.

The haystack-format tasks (tasks.FORMAT_TASKS: niah_single_story/_logs/_csv) are in no preset, so that
the presets' retention stays the mean over the same ten tasks as before; `--tasks` runs them.
"""

from __future__ import annotations

import copy

from flexicache_hf.eval.methods import METHOD_NAMES
from flexicache_hf.eval.tasks import CORE_TASKS

CI_TASKS = ("niah_single", "niah_single_docs", "qa_code")

PRESETS: dict[str, dict] = {
    "ci": {
        "device": "cpu",
        "dtype": "float32",
        "jobs": [
            {
                "model": "smollm2",
                "lengths": [1024],
                "tasks": list(CI_TASKS),
                "samples": 1,
                "methods": ["dense", "flexicache", "streamingllm", "snapkv"],
                "budgets": ["full", 256],
                "method_budgets": {"streamingllm": [256], "snapkv": [256]},
                "fidelity": {"prompt_tokens": 512, "steps": 24, "kinds": ["docs"], "budgets": ["full", 256],
                             "methods": ["flexicache"]},
            }
        ],
    },
    "cpu": {
        "device": "cpu",
        "dtype": "float32",
        "jobs": [
            {
                "model": "smollm2",
                "lengths": [4096],
                "tasks": list(CORE_TASKS),
                "samples": 2,
                "methods": list(METHOD_NAMES),
                "budgets": [256, 512, 1024],
                "fidelity": {"prompt_tokens": 2048, "steps": 1024, "kinds": ["docs"], "budgets": [256],
                             "methods": [m for m in METHOD_NAMES if m != "dense"]},
            }
        ],
    },
    "full": {
        "device": "cuda",
        "dtype": "bfloat16",
        "jobs": [
            {
                "model": "smollm2",
                "lengths": [4096, 8128],  # 8128 + 64 generated tokens fit SmolLM2's 8192 positions
                "tasks": list(CORE_TASKS),
                "samples": 3,
                "methods": list(METHOD_NAMES),
                "budgets": [256, 512, 1024, 2048],
                "fidelity": {"prompt_tokens": 4096, "steps": 2048, "kinds": ["docs"], "budgets": [256, 1024],
                             "methods": [m for m in METHOD_NAMES if m != "dense"]},
            },
            {
                "model": "qwen-coder-0.5b",
                "lengths": [4096, 8192, 16384, 32704],  # 32704 + 64 fit Qwen2.5's 32768 positions
                "tasks": list(CORE_TASKS),
                "samples": 3,
                "methods": list(METHOD_NAMES),
                "budgets": [256, 512, 1024, 2048],
                "fidelity": {"prompt_tokens": 8192, "steps": 2048, "kinds": ["docs"], "budgets": [256, 1024],
                             "methods": [m for m in METHOD_NAMES if m != "dense"]},
            },
        ],
    },
}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def parse_budget(x) -> int | None:
    if x is None or (isinstance(x, str) and x.lower() in ("full", "none")):
        return None
    return int(x)
