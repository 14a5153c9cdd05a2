"""`kvlab bench NAME`: benchmarks that report ratios against a baseline measured in the same run."""
from __future__ import annotations

import argparse
import importlib

# Each benchmark module in kvlab/bench/ has `add_arguments(parser)` and `run(args) -> int`.
BENCHMARKS = {
    "alloc": ("kvlab.bench.alloc", "map/unmap µs per 2 MiB page vs first-touch memset"),
    "sampler": ("kvlab.bench.sampler", "CPU share of one core for 100 Hz memory sampling of a process tree"),
    "elastic": ("kvlab.bench.elastic",
                "static vs kvcached in ABBA blocks: fresh and reused prompts, tok/s, TTFT, prefix hits, retained"),
    "prefix": ("kvlab.bench.prefix",
               "prefix sharing: TTFT of B from A's stored KV vs a cold B, exactness, store load GB/s vs memcpy"),
    "colocation": ("kvlab.bench.colocation",
                   "two models in one KV budget with intermittent peaks: elastic sharing vs static halves, TTFT p99"),
    "router": ("kvlab.bench.router", "router overhead ms (TTFT, e2e) vs direct; sleep levels: freed memory, wake s"),
    "load": ("kvlab.bench.load", "workload pacing at 1000 req/s: kvlab vs vLLM's benchmark client, at a no-op server"),
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a benchmark and print its table",
                            description=__doc__)
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    names.required = True
    for name, (module, summary) in BENCHMARKS.items():
        bench = importlib.import_module(module)
        p = names.add_parser(name, help=summary, description=bench.__doc__)
        bench.add_arguments(p)
        p.set_defaults(func=bench.run)
