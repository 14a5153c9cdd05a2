"""Experiments: servers, workload, probes and a run directory, in one call each.

- `elastic`: static vs kvcached under bursts, memory over time (`elastic_vs_static`, notebook 01);
- `prefix_reuse` (`elastic_abba`): static vs kvcached in turn (ABBA blocks), fresh and repeated prompts, with
  prefix-cache hit rates and what an idle engine retains (`kvlab bench elastic`, notebook 01's reuse phase);
- `colocation`: several models on one device, one kvcached budget or static partitions (notebook 02);
- `router_fleet` + `router_sleep`: models behind the router, traffic and a real sleep/wake (notebook 03);
- `shared_prefix` (`prefix_sharing`): one engine reads documents, another answers from its stored prefix KV
  (notebook 04, `kvlab bench prefix`);
- `common`: what they share (device choice, series names, burst schedules, a wait that notices a crash).

A new experiment is a module here that takes a `Run` (or makes one) and calls engines, load and probes.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"elastic_vs_static": "kvlab.experiments.elastic", "prefix_sharing": "kvlab.experiments.shared_prefix",
            "elastic_abba": "kvlab.experiments.prefix_reuse", "resolve_device": "kvlab.experiments.common"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvlab.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
