"""What every memory probe shares: the reading format, the two protocols, and the metric names others rely on.

A probe reads one thing at one rate; a source hands out its probes (a process tree has a cheap probe at the
sampler's rate and a PSS probe at 1 Hz). MemorySampler runs them on one clock.
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence

# Metric names other modules (results, plots, experiments) rely on.
MEM_BYTES = "mem_bytes"  # host memory the server tree holds: private anon + shared memory counted once
PSS_MEM_BYTES = "pss_mem_bytes"  # the same from PSS (Pss_Anon + Pss_Shmem), low rate: the reference figure
KV_RESERVED_BYTES = "kv_reserved_bytes"
# Of the reserved bytes: the floor an engine keeps, and the prefix cache it retains until the memory is wanted.
KV_FLOOR_BYTES = "kv_floor_bytes"
KV_RETAINED_BYTES = "kv_retained_bytes"
GPU_USED_BYTES = "gpu_used_bytes"
GPU_PROCESS_BYTES = "gpu_process_bytes"  # one server's GPU memory: NVML's per-process use over its process tree

Reading = tuple[str, str, float]  # (series, metric, value)


def server_memory_metric(device: str) -> tuple[str, str]:
    """The memory figure that matters for one server, and its name for a title: on a GPU its device memory (NVML, per
    process tree: what the KV pool occupies there), elsewhere the host memory its process tree holds."""
    return (GPU_PROCESS_BYTES, "GPU memory") if device == "cuda" else (MEM_BYTES, "Process memory")


class Probe(Protocol):
    """One thing read at one rate. `interval_s` None means the sampler's own interval."""

    interval_s: float | None

    def read(self) -> Iterable[Reading]: ...


class Source(Protocol):
    """What MemorySampler accepts: anything that hands out its probes."""

    def probes(self) -> Sequence[Probe]: ...
