#!/usr/bin/env bash
# The 10-sample GPU version of the tight-budget comparison (issue 20; docs/accuracy.md, "Tight budgets"):
# SmolLM2 at 4k and 8k, budgets 256 and 512 (16 / 32 pages of 16), on the retrieval tasks where the CPU run
# found a gap (niah_single_story, niah_single_logs, niah_multivalue) and niah_single_csv; dense, the page oracle
# and FlexiCache with the default scorer (SketchMass(2), the shipped profile). Shared prefill per sample, CUDA-graph
# decode steps. 80 prompts, 400 records (238 s on the H200, 2026-12-03); bounded by LIMIT seconds (default 290):
# what is not done by then is resumed by running the same command again (results.json keeps every record).
# Prints the table at the end. METHODS=dense,oracle_pages,flexicache,flexicache_all_unstable adds the same scorer
# with every head re-selecting every step (what the stable heads' stale selections cost), 420 records.
#
#   bash experiments/tight_budget_gpu.sh                 # OUT=runs/tight_gpu LIMIT=290 by default
# (run from where flexicache_hf is importable with its eval extras, as for `flexicache eval --preset full`)
#   OUT=runs/x LIMIT=540 TASKS=niah_single_story bash experiments/tight_budget_gpu.sh
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)  # not cd'd into: at the repo root its kernels/ folder shadows HF's `kernels`
OUT=${OUT:-runs/tight_gpu}
LIMIT=${LIMIT:-290}
TASKS=${TASKS:-niah_single_story,niah_single_logs,niah_multivalue,niah_single_csv}
METHODS=${METHODS:-dense,oracle_pages,flexicache}
PY=${PY:-python}
timeout "$LIMIT" "$PY" -m flexicache_hf.eval_cli --preset full --model smollm2 --lengths 4096,8128 --samples 10 \
    --tasks "$TASKS" --methods "$METHODS" --budgets 256,512 --no-fidelity --device "${DEVICE:-cuda}" --quiet --out "$OUT"
rc=$?
[ $rc -eq 124 ] && echo "[tight_budget_gpu] stopped at LIMIT=${LIMIT}s: run the same command again to resume"
"$PY" "$HERE/tight_budget_table.py" "$OUT/results.json"
exit $rc
