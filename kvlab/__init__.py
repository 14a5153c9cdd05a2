"""kvlab: the experiment lab for LLM serving memory (engines, workloads, probes, run directories, router).

Rooms, each a layer that imports only the ones below it (docs/architecture.md):
    commands  ->  sweeps  ->  bench, notebooks  ->  experiments  ->  runs  ->  engines  ->  router  ->  probes  ->  load

Public names are imported on first use, so `import kvlab` stays fast and never pulls in vLLM or torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "VLLMServer": "kvlab.engines.server",
    "Colocation": "kvlab.engines.colocation",
    "ServerError": "kvlab.engines.errors",
    "diagnose": "kvlab.engines.errors",
    "send_requests": "kvlab.load.client",
    "wait_ready": "kvlab.load.client",
    "ArrivalSpec": "kvlab.load.arrivals",
    "Target": "kvlab.load.workload",
    "run_workload": "kvlab.load.workload",
    "summarize": "kvlab.load.metrics",
    "MemorySampler": "kvlab.probes",
    "Run": "kvlab.runs",
    "load_run": "kvlab.runs",
    "compare": "kvlab.runs",
    "sweep": "kvlab.sweeps",
    "summary_table": "kvlab.runs",
    "elastic_vs_static": "kvlab.experiments.elastic",
    "prefix_sharing": "kvlab.experiments.shared_prefix",
    "TinyModelSpec": "kvlab.tiny_model",
    "write_tiny_model": "kvlab.tiny_model",
}

__all__ = [
    "__version__", "VLLMServer", "Colocation", "ServerError", "diagnose", "send_requests", "wait_ready",
    "ArrivalSpec", "Target", "run_workload", "summarize", "MemorySampler", "Run", "load_run", "compare",
    "summary_table", "sweep", "elastic_vs_static", "prefix_sharing", "TinyModelSpec", "write_tiny_model",
]

if TYPE_CHECKING:
    from kvlab.engines.colocation import Colocation
    from kvlab.engines.errors import ServerError, diagnose
    from kvlab.engines.server import VLLMServer
    from kvlab.experiments.elastic import elastic_vs_static
    from kvlab.experiments.shared_prefix import prefix_sharing
    from kvlab.load.arrivals import ArrivalSpec
    from kvlab.load.client import send_requests, wait_ready
    from kvlab.load.metrics import summarize
    from kvlab.load.workload import Target, run_workload
    from kvlab.probes import MemorySampler
    from kvlab.runs import Run, compare, load_run, summary_table
    from kvlab.sweeps import sweep
    from kvlab.tiny_model import TinyModelSpec, write_tiny_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
