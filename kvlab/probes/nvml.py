"""GPU memory from NVML: device counters at the sampler's rate, per-process use at a low rate."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kvlab.probes.proc import process_tree
from kvlab.probes.protocol import GPU_PROCESS_BYTES, GPU_USED_BYTES, Probe, Reading


def visible_devices(nvml: Any, cuda_visible_devices: str | None) -> list[tuple[int, str]]:
    """(NVML index, UUID) of each CUDA device this process sees, in CUDA ordinal order.

    CUDA_VISIBLE_DEVICES holds indices or UUIDs (`GPU-...`, a unique prefix is enough); CUDA stops at the first
    entry that names no device, and so do we. Indices are NVML's (PCI bus order), which is CUDA's order when
    CUDA_DEVICE_ORDER=PCI_BUS_ID, as GPU servers usually set.
    """
    count = nvml.nvmlDeviceGetCount()
    all_devices = []
    for i in range(count):
        uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
        all_devices.append((i, uuid.decode() if isinstance(uuid, bytes) else uuid))
    if cuda_visible_devices is None:
        return all_devices
    out: list[tuple[int, str]] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry:
            break
        if entry.lstrip("-").isdigit():
            idx = int(entry)
            if not 0 <= idx < count:
                break
            match = [all_devices[idx]]
        else:
            match = [d for d in all_devices if d[1].startswith(entry)]
            if len(match) != 1:  # unknown or ambiguous prefix: CUDA treats it as invalid
                break
        if match[0] in out:  # a repeated device makes CUDA reject the list from there on
            break
        out.append(match[0])
    return out


class _NvmlProcessProbe:
    def __init__(self, owner: "NvmlSource", interval_s: float) -> None:
        self.owner = owner
        self.interval_s = interval_s

    def read(self) -> list[Reading]:
        return self.owner.read_processes()


class NvmlSource:
    """GPU memory from NVML: device used/total at the sampler's rate (NVML answers at 100 Hz), per-process use
    at <= 1 Hz. `device` is a CUDA ordinal among the visible devices (None: all of them). `processes` maps a
    series name to a PID or a server, so each server's GPU memory (its tree's processes) becomes its own series.

    Without NVML (no driver, no `nvidia-ml-py`) the source is `available == False` with the reason in
    `unavailable_reason`, and it gives no probes instead of failing.
    """

    def __init__(self, device: int | None = None, *, series: str = "gpu", processes: dict[str, Any] | None = None,
                 process_interval_s: float = 1.0, nvml: Any = None) -> None:
        self.series = series
        self.processes = dict(processes or {})
        self.process_interval_s = max(1.0, process_interval_s)
        self.unavailable_reason: str | None = None
        self._nvml = nvml
        self._devices: list[tuple[int, str]] = []
        self._handles: list[Any] = []
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            visible = visible_devices(self._nvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if device is not None:
                if not 0 <= device < len(visible):
                    raise ValueError(f"CUDA device {device} is not visible (visible: {len(visible)} devices)")
                visible = [visible[device]]
                self._ordinals = [device]
            else:
                self._ordinals = list(range(len(visible)))
            self._devices = visible
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i, _ in visible]
        except ImportError:
            self.unavailable_reason = "nvidia-ml-py is not installed: `pip install nvidia-ml-py`"
        except Exception as exc:  # pynvml raises NVMLError subclasses for "no driver", "no GPU", ...
            self.unavailable_reason = f"NVML unavailable ({exc}): no NVIDIA driver or GPU here"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    @property
    def devices(self) -> list[tuple[int, str]]:
        """(NVML index, UUID) of the devices read, in CUDA ordinal order."""
        return list(self._devices)

    def _series(self, ordinal: int) -> str:
        return self.series if len(self._handles) == 1 else f"{self.series}{ordinal}"

    def read(self) -> list[Reading]:
        out: list[Reading] = []
        for ordinal, handle in zip(self._ordinals, self._handles):
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append((self._series(ordinal), GPU_USED_BYTES, float(info.used)))
            out.append((self._series(ordinal), "gpu_total_bytes", float(info.total)))
        return out

    def read_processes(self) -> list[Reading]:
        used_by_pid: dict[int, int] = {}
        for handle in self._handles:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used_by_pid[proc.pid] = used_by_pid.get(proc.pid, 0) + int(proc.usedGpuMemory or 0)
        out: list[Reading] = []
        for series, target in self.processes.items():
            root = target if isinstance(target, int) else getattr(target, "pid", None)
            tree = process_tree(root) if root else []
            out.append((series, GPU_PROCESS_BYTES, float(sum(used_by_pid.get(p, 0) for p in tree))))
        return out

    def probes(self) -> list[Probe]:
        if not self.available:
            return []
        out: list[Probe] = [self]
        if self.processes:
            out.append(_NvmlProcessProbe(self, self.process_interval_s))
        return out

    interval_s = None  # device counters: the sampler's rate


def gpu_inventory() -> list[dict[str, Any]]:
    """Name and memory of each NVIDIA GPU from NVML; empty when there is none (never an error)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)})
    finally:
        pynvml.nvmlShutdown()
    return out


def gpu_present() -> bool:
    """A GPU machine without importing torch or NVML: the NVIDIA driver's device node or its tool."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def gpu_bytes_of(pids: list[int]) -> int | None:
    """GPU memory held by these processes (NVML); None without a GPU or NVML."""
    if not pids or not gpu_present():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        wanted, total = set(pids), 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
        return total
    finally:
        pynvml.nvmlShutdown()


def gpu_facts(nvml: Any = None) -> dict[str, Any] | None:
    """What an install or a dry run needs to know of this machine's NVIDIA side, from NVML: the driver version, the
    newest CUDA version the driver supports, and per GPU its name, memory and compute capability. None when NVML
    is absent (no driver, no GPU). `nvml` stands in for the pynvml module (tests pass a fake, named as such)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception:
        return None
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040 for CUDA 12.4
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                         "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total),
                         "compute_capability": (int(major), int(minor))})
        return {"driver": driver.decode() if isinstance(driver, bytes) else str(driver),
                "cuda_driver": (cuda // 1000, (cuda % 1000) // 10), "gpus": gpus}
    except Exception:
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
