"""Free physical memory where a region's pages come from: what the budget cannot know.

A budget says what this pool may hold; the machine says what it can. Host pools draw on MemAvailable and, when the
pool is a file, on its filesystem (a tmpfs has its own size); CUDA pools on the device's free memory. Asked before
memory is claimed, so a claim that cannot be backed is refused at once instead of held while a map fails.
"""
from __future__ import annotations

import os
import time
from typing import Any

_MEMINFO_TTL_S = 0.05
_meminfo_cache: tuple[float, int] = (-1.0, 0)


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (cached briefly: the scheduler may ask every step)."""
    global _meminfo_cache
    now = time.monotonic()
    if now - _meminfo_cache[0] < _MEMINFO_TTL_S:
        return _meminfo_cache[1]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                value = int(line.split()[1]) * 1024
                break
        else:
            raise RuntimeError("/proc/meminfo has no MemAvailable: kvcached needs Linux 3.14 or newer")
    _meminfo_cache = (now, value)
    return value


def physical_free_bytes(region: Any) -> int:
    """Free physical memory where the region's pages come from.

    host: MemAvailable, and when the pool is a file, the free space of its filesystem (a tmpfs has its own size);
    cuda: cuMemGetInfo in this process's context; state (a scheduler deciding for workers in other processes):
    NVML's free memory of the device, which needs no CUDA context here."""
    backend = getattr(region, "backend", "host")
    if backend == "cuda":
        from kvcached import _core
        return int(_core.cuda_mem_info(getattr(region, "device", 0))[0])
    if backend == "state":
        free = _nvml_free_bytes(getattr(region, "device", 0))
        if free is not None:
            return free
    available = host_available_bytes()
    path = getattr(region, "path", None)
    if backend == "host" and path:
        try:
            st = os.statvfs(os.path.dirname(path) or ".")
            available = min(available, st.f_bavail * st.f_frsize)
        except OSError:
            pass
    return available


def _nvml_free_bytes(device: int) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(device)).free)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def host_room_bytes(region: Any) -> int | None:
    """Free memory for a host region's next pages (MemAvailable, and its tmpfs when it is a file); None for other
    backends, whose free memory costs a driver call and whose maps fail fast and cleanly when memory runs out."""
    if getattr(region, "backend", "host") != "host":
        return None
    return physical_free_bytes(region)


def physical_total_bytes(region: Any) -> int | None:
    """Total physical memory where the region's pages come from (the host's, or the pool's tmpfs when smaller; the
    device's for cuda and state), or None when it cannot be read: sizes thresholds to the machine."""
    backend = getattr(region, "backend", "host")
    if backend in ("cuda", "state"):
        try:
            if backend == "cuda":
                from kvcached import _core
                return int(_core.cuda_mem_info(getattr(region, "device", 0))[1])
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(getattr(region, "device", 0))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        except Exception:  # no NVML, no device: no threshold scaling
            return None
    total: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    path = getattr(region, "path", None)
    if path:
        try:
            st = os.statvfs(os.path.dirname(path) or ".")
            total = min(total or 1 << 62, st.f_blocks * st.f_frsize)
        except OSError:
            pass
    return total
