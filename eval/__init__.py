"""Accuracy-retention harness (installed as flexicache_hf.eval); docs/accuracy.md describes it.

    tasks.py           RULER-style synthetic tasks and QA over CPython's own text, as datasets.Dataset
    text_sources.py    the real text (pydoc topics, stdlib sources) and a fixed word list
    methods.py         dense, FlexiCache and its ablations, StreamingLLM, SnapKV: one cache per request
    peers.py           the eviction baselines as transformers caches (StreamingLLM, SnapKV)
    runner.py          shared prefill, greedy decode, scoring, resumable results.json, fidelity
    report.py          markdown tables and plots
    presets.py         ci / cpu / full
    lm_eval_adapter.py lm-evaluation-harness model type "flexicache" (tasks in lm_eval_tasks/)
    metrics/           evaluate modules (string_match_recall, contains_match), loaded by local path

Command line: flexicache_hf.eval_cli (`flexicache eval`).
"""
