"""What a sleep frees, measured before and after: the engine's process-tree RSS and PSS (kvlab's probes), its
kvcached reserved bytes (kvcached's records) and its GPU bytes (NVML, when there is a GPU)."""
from __future__ import annotations

from kvlab.probes.nvml import gpu_bytes_of
from kvlab.probes.proc import read_pss
from kvlab.router.backends import Backend, pids_listening_on


def kv_records(name: str) -> list:
    """The engine's kvcached budget record, found by its exact name (empty when it is gone or not alive)."""
    from kvcached.budget import find_instance

    try:
        info = find_instance(name)
    except KeyError:
        return []
    return [info] if info.alive else []


def measure_memory(backend: Backend, kv_instance: str | None) -> dict:
    """Process-tree RSS/PSS, kvcached reserved bytes and GPU bytes of one backend, now (blocking: ~50 ms)."""
    if backend.process is not None:
        pids = backend.process.pids()
    else:
        port = int(backend.url.rsplit(":", 1)[1].split("/")[0])
        pids = pids_listening_on(port)
    rss = pss = 0
    for pid in pids:
        figures = read_pss(pid) or {}
        rss += figures.get("rss", 0)
        pss += figures.get("pss", 0)
    out = {"pids": len(pids), "rss_bytes": rss, "pss_bytes": pss,
           "kv_reserved_bytes": sum(r.reserved_bytes for r in kv_records(kv_instance)) if kv_instance else None}
    gpu = gpu_bytes_of(pids)
    if gpu is not None:
        out["gpu_bytes"] = gpu
    return out
