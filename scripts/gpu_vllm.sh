#!/usr/bin/env bash
# vLLM for a GPU machine that reaches no package index, in two halves:
#
#   scripts/gpu_vllm.sh stage [VLLM_VERSION]     on a machine with PyPI (default 0.26.0, the vLLM that pins torch 2.11)
#   scripts/gpu_vllm.sh install [STAGE_DIR]      on the GPU machine, once the parts are there (default /tmp/kvlab-stage)
#
# `stage` downloads vLLM's wheel and what the GPU machine lacks (scripts/gpu/device-missing.txt: vLLM's requirements
# that a CUDA torch image does not carry, and papermill with a Jupyter kernel for the notebooks), unpacks them into one
# site folder, leaves out the parts of vLLM a Hopper GPU serving a dense model never loads (the FlashAttention-2
# kernels: Hopper runs FlashAttention-3; the MoE kernels; the Rust front end; DeepGEMM builds for other Pythons;
# Blackwell-only headers; KVLAB_GPU_FULL=1 keeps everything), and packs the folder as an xz tar split into
# .gpu-stage/part-NN/ folders of at most KVLAB_GPU_PART_MIB (58) MiB each: a machine that takes a bounded upload
# per call gets one folder a call. The 0.26.0 wheel (304 MB) and its requirements pack into about 130 MB.
#
# `install` joins the parts, unpacks the site into /tmp/kvlab-gpu/site, builds and installs this project beside it
# (kvcached's extension with the machine's cmake and pybind11; the vLLM plugin entry points come with it), checks that
# vLLM imports with CUDA, and writes /tmp/kvlab-gpu/env.sh: `source /tmp/kvlab-gpu/env.sh` puts both on PYTHONPATH.
# Nothing is installed over the machine's own packages.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPU_HOME=${KVLAB_GPU_HOME:-/tmp/kvlab-gpu}
say() { printf '[gpu_vllm] %s\n' "$*" >&2; }

stage() {
  local version=${1:-0.26.0}
  local out="$ROOT/.gpu-stage" part_mib=${KVLAB_GPU_PART_MIB:-58}
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  local platform=(--only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64
    --platform manylinux_2_34_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_5_x86_64
    --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64)
  local wanted; wanted=$(grep -v '^#' "$ROOT/scripts/gpu/device-missing.txt" | grep .)
  say "downloading vllm==$version and $(echo "$wanted" | wc -l) requirements the GPU machine lacks"
  python3 -m pip download -q --no-deps "${platform[@]}" -d "$work/whl" "vllm==$version" $wanted 2>&1 \
    | grep -v "^WARNING: Location" || true
  say "unpacking $(ls "$work/whl" | wc -l) wheels into one site folder"
  python3 -m pip install -q --no-deps --no-compile --no-index --target "$work/site" "${platform[@]}" \
    "$work"/whl/*.whl 2>&1 | grep -v "^WARNING: Location" || true
  python3 -c "import sys; sys.path.insert(0, sys.argv[1]); import importlib.metadata as m; \
    print(m.version('vllm'))" "$work/site" | grep -qx "$version" || { say "vllm $version did not unpack"; return 1; }
  if [ "${KVLAB_GPU_FULL:-0}" != 1 ]; then
    local v="$work/site/vllm"
    rm -f "$v/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$v/_moe_C_stable_libtorch.abi3.so" "$v/vllm-rs"
    find "$v/third_party/deep_gemm" -name '_C.cpython-*.so' ! -name '_C.cpython-312-*' -delete 2>/dev/null || true
    rm -rf "$v/third_party/fmha_sm100"
  fi
  echo "vllm==$version$([ "${KVLAB_GPU_FULL:-0}" = 1 ] || echo ' (without FA2, MoE kernels, Rust front end)')" \
    > "$work/site/KVLAB_GPU_STAGE"
  say "packing $(du -sh "$work/site" | cut -f1) (xz; a few minutes on two cores)"
  rm -rf "$out" && mkdir -p "$out"
  tar -C "$work" -cf - site | xz -T0 -6 | split -b "${part_mib}M" -d - "$out/site.tar.xz."
  local i=0 f
  for f in "$out"/site.tar.xz.*; do
    mkdir -p "$out/part-$(printf %02d $i)" && mv "$f" "$out/part-$(printf %02d $i)/"
    i=$((i + 1))
  done
  (cd "$out" && sha256sum part-*/site.tar.xz.* > SHA256SUMS && cp SHA256SUMS part-00/)
  say "staged in $out: $i part(s); copy every part's file into one folder on the GPU machine, then run install"
  ls -la "$out"/part-*/
}

unxz_stream() {  # xz's own tool where the machine has it, else Python's lzma
  if command -v xz >/dev/null; then xz -dc -T0; else
    python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)"
  fi
}

install() {
  local stage_dir=${1:-/tmp/kvlab-stage}
  [ -n "$(ls "$stage_dir"/site.tar.xz.* 2>/dev/null)" ] || { say "no site.tar.xz.* parts in $stage_dir"; return 1; }
  if [ -f "$stage_dir/SHA256SUMS" ]; then
    local missing; missing=$(cd "$stage_dir" && sed 's#part-[0-9]*/##' SHA256SUMS | sha256sum -c --quiet 2>&1 || true)
    [ -z "$missing" ] || { say "parts missing or damaged in $stage_dir: $missing"; return 1; }
  fi
  mkdir -p "$GPU_HOME"
  if [ ! -f "$GPU_HOME/site/KVLAB_GPU_STAGE" ]; then
    say "unpacking the staged site into $GPU_HOME/site"
    rm -rf "$GPU_HOME/site"
    cat "$stage_dir"/site.tar.xz.* | unxz_stream | tar -C "$GPU_HOME" -xf -
  fi
  say "building this project into $GPU_HOME/project"
  rm -rf "$GPU_HOME/project"
  (cd "$ROOT" && PYTHONPATH="$GPU_HOME/site" python3 -m pip install -q --no-deps --no-build-isolation --no-index \
    --no-compile --target "$GPU_HOME/project" . > "$GPU_HOME/project-build.log" 2>&1) \
    || { tail -30 "$GPU_HOME/project-build.log"; say "the project did not build: see $GPU_HOME/project-build.log"; return 1; }
  cat > "$GPU_HOME/env.sh" <<EOF
export PYTHONPATH="$GPU_HOME/project:$GPU_HOME/site\${PYTHONPATH:+:\$PYTHONPATH}"
export PATH="$GPU_HOME/project/bin:$GPU_HOME/site/bin:\$PATH"
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
EOF
  # shellcheck disable=SC1091
  source "$GPU_HOME/env.sh"
  (cd / && python3 -c "import torch, vllm, kvlab, kvcached._core as c; \
    print('vllm', vllm.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available(), \
          '| kvcached cuda backend', c.cuda_available())")  # from / : never the checkout's unbuilt kvcached
  say "ready: source $GPU_HOME/env.sh"
}

case "${1:-}" in
  stage) shift; stage "$@" ;;
  install) shift; install "$@" ;;
  *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
