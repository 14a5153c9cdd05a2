"""kvlab: the experiment lab for LLM serving memory (servers, workloads, probes, results, plots, router).

Public names are imported on first use, so `import kvlab` stays fast and never pulls in vLLM or torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "VLLMServer": "kvlab.server",
    "Colocation": "kvlab.colocation",
    "ServerError": "kvlab.errors",
    "diagnose": "kvlab.errors",
    "send_requests": "kvlab.client",
    "wait_ready": "kvlab.client",
    "TinyModelSpec": "kvlab.tiny_model",
    "write_tiny_model": "kvlab.tiny_model",
    "MemorySampler": "kvlab.memory",
    "Run": "kvlab.results",
    "load_run": "kvlab.results",
    "compare": "kvlab.results",
    "summary_table": "kvlab.results",
    "elastic_vs_static": "kvlab.experiments",
    "ArrivalSpec": "kvlab.arrivals",
    "Target": "kvlab.workload",
    "run_workload": "kvlab.workload",
    "summarize": "kvlab.metrics",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from kvlab.client import send_requests, wait_ready
    from kvlab.colocation import Colocation
    from kvlab.errors import ServerError, diagnose
    from kvlab.experiments import elastic_vs_static
    from kvlab.memory import MemorySampler
    from kvlab.results import Run, compare, load_run, summary_table
    from kvlab.server import VLLMServer
    from kvlab.arrivals import ArrivalSpec
    from kvlab.workload import Target, run_workload
    from kvlab.metrics import summarize
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
