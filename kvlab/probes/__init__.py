"""Memory probes: one module per memory source, and the sampler that reads them all on the request clock.

- `proc`: a process tree's host memory (/proc status at 100 Hz, PSS at 1 Hz, shared pool files counted once);
- `kvcached_records`: kvcached's used/reserved/limit bytes from its shared-memory records, and prefix stores;
- `vllm_metrics`: KV usage and queue lengths from a vLLM server's /metrics;
- `nvml`: GPU memory, per device and per process tree;
- `sampler`: MemorySampler, which runs the probes of its sources on threads, one per rate, into memory.csv.

A new memory source is a module here with a class that has `probes()` (see `protocol`).
"""
from kvlab.probes.kvcached_records import KvcachedSource, PrefixStoreSource
from kvlab.probes.nvml import NvmlSource
from kvlab.probes.proc import HostTreeSource, process_tree
from kvlab.probes.protocol import (
    GPU_PROCESS_BYTES,
    GPU_USED_BYTES,
    KV_FLOOR_BYTES,
    KV_RESERVED_BYTES,
    KV_RETAINED_BYTES,
    MEM_BYTES,
    PSS_MEM_BYTES,
    Probe,
    Reading,
    Source,
    server_memory_metric,
)
from kvlab.probes.sampler import CSV_COLUMNS, MemorySampler, Sample, read_memory_csv
from kvlab.probes.vllm_metrics import VllmMetricsSource

__all__ = [
    "CSV_COLUMNS", "GPU_PROCESS_BYTES", "GPU_USED_BYTES", "KV_FLOOR_BYTES", "KV_RESERVED_BYTES", "KV_RETAINED_BYTES",
    "MEM_BYTES", "PSS_MEM_BYTES", "HostTreeSource",
    "KvcachedSource", "MemorySampler", "PrefixStoreSource", "NvmlSource", "Probe", "Reading", "Sample", "Source",
    "VllmMetricsSource", "process_tree", "read_memory_csv", "server_memory_metric",
]
