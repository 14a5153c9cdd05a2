#!/usr/bin/env bash
# GPU validation of kvcached's cuda backend in one command, on a machine with an NVIDIA GPU and a CUDA torch:
#   bash scripts/gpu_check.sh [RESULTS_DIR]
# Builds kvcached._core from this working tree (cmake, no network), runs `pytest -m gpu tests/gpu`,
# `python -m kvcached.bench --backend cuda` (handle pool on and off), our Region against upstream kvcached's vmm_ops
# (built from its sdist, found in .upstream/: `pip download --no-deps --no-binary :all: kvcached` or the sdist
# unpacked there), and the mini engine; then prints a summary table. RESULTS_DIR defaults to $OUT when set,
# else results/gpu_check/<time>. A failing step is logged and the others still run; the exit status is 1
# when any step failed.
set -u -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
RES=${1:-${OUT:-results/gpu_check/$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
LOG="$RES/log.txt"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
FAILED=()

step() {  # step NAME COMMAND...: run, log, remember failures
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  if "$@" 2>&1 | tee -a "$LOG"; then
    echo "=== $name: ok ($((SECONDS - t0)) s)" | tee -a "$LOG"
  else
    echo "=== $name: FAILED ($((SECONDS - t0)) s)" | tee -a "$LOG"
    FAILED+=("$name")
  fi
}

# Carried wheels (a machine with no index): installed into a private target, never over the system's.
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvcached-gpu-site .whl/*.whl
  export PYTHONPATH=/tmp/kvcached-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi

build_core() {
  local bdir=/tmp/kvcached-gpu-build
  cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" && cmake --build "$bdir" -j \
    && cp "$bdir"/_core*.so kvcached/ && ls -l kvcached/_core*.so
}
step build build_core
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export KVCACHED_SHM_DIR=$(mktemp -d /dev/shm/kvcached-gpu-check.XXXXXX)

"$PY" - >"$RES/env.json" 2>>"$LOG" <<'EOF'
import json, platform, subprocess
env = {"python": platform.python_version()}
try:
    import torch
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["gpu"] = torch.cuda.get_device_name(0)
except Exception as exc:
    env["torch_error"] = repr(exc)
try:
    env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip()
except OSError:
    pass
from kvcached import _core
env["cuda_available"] = _core.cuda_available()
env["granularity"] = _core.granularity("cuda", 0) if env["cuda_available"] else None
print(json.dumps(env))
EOF
cat "$RES/env.json" | tee -a "$LOG"

step tests "$PY" -m pytest -m gpu tests/gpu -v -p no:cacheprovider --junitxml="$RES/pytest_junit.xml"

bench_alloc() {
  # kvcached's own benchmark (what `kvlab bench alloc` runs): it needs only kvcached, so it runs on a machine
  # without vLLM or kvlab's other dependencies.
  "$PY" -m kvcached.bench --backend cuda --json >"$RES/bench_alloc_cuda.json" && cat "$RES/bench_alloc_cuda.json"
}
step bench-alloc bench_alloc

UPSTREAM_AT=/tmp/kvcached-upstream/built-tree  # the step runs in a pipeline (a subshell): pass the path by file
build_upstream() {
  rm -rf /tmp/kvcached-upstream && mkdir -p /tmp/kvcached-upstream
  local src sdist
  sdist=$(ls .upstream/kvcached-*.tar.gz 2>/dev/null | head -1)
  if [ -n "$sdist" ]; then
    tar -xzf "$sdist" -C /tmp/kvcached-upstream
  else
    src=$(ls -d .upstream/kvcached-*/ 2>/dev/null | head -1)
    [ -n "$src" ] || { echo "no upstream sdist in .upstream/: run \`pip download --no-deps --no-binary :all: kvcached -d .upstream\`"; return 1; }
    cp -r "$src" /tmp/kvcached-upstream/
  fi
  src=$(ls -d /tmp/kvcached-upstream/kvcached-*/ | head -1)
  # Its setup.py imports torch (a torch extension), so it builds against this machine's torch, in place.
  (cd "$src" && env -u PYTHONPATH MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace) \
    && ls "$src"kvcached/_C*.so && echo "${src%/}" >"$UPSTREAM_AT"
}
step upstream-build build_upstream

upstream_bench() {
  local args=()
  [ -s "$UPSTREAM_AT" ] && args=(--upstream-dir "$(cat "$UPSTREAM_AT")")
  "$PY" scripts/upstream_vmm_bench.py "${args[@]}" >"$RES/upstream_vmm.json" && cat "$RES/upstream_vmm.json"
}
step upstream-bench upstream_bench

step mini-engine bash -c "\"$PY\" tests/gpu/test_mini_engine.py > \"$RES/mini_engine.json\" && cat \"$RES/mini_engine.json\""

rm -rf "$KVCACHED_SHM_DIR"
echo | tee -a "$LOG"
"$PY" scripts/gpu_summary.py "$RES" | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed steps: ${FAILED[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all steps passed; results in $RES" | tee -a "$LOG"
