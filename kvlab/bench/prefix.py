"""Prefix sharing across vLLM-CPU engines, in one run: B answers from the KV that A stored vs a cold B computing it.

Runs `kvlab.experiments.prefix_sharing` (A reads each document, B asks another question from the shared store,
B-cold asks it with no store, A asks it again from its own prefix cache), then times loading every chunk the run
stored against a plain memcpy of the same bytes, in the same process. Reports TTFT p50 of B vs B-cold (goal: at most
0.3x), the exactness of B's outputs against A-again's, the prompt tokens each engine computed and loaded (vLLM's
counters), and the store's load throughput against memcpy (goal: at least half). Figures go to `prefix.json` in the
run directory (stdout with --json).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kvlab.bench import MODEL_HELP, model_path, write_and_print

GOAL_TTFT_RATIO = 0.3
GOAL_LOAD_VS_MEMCPY = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--docs", type=int, default=8, help="documents, each read by A then asked about (default 8)")
    parser.add_argument("--doc-tokens", type=int, default=2000, help="tokens per document (default 2000)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default 16)")
    parser.add_argument("--kvcached", action="store_true", help="run the three engines on elastic kvcached pools")
    parser.add_argument("--root", default="results", help="results root (default results/)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def load_throughput(store: str, passes: int = 3) -> dict[str, Any]:
    """Best-of-`passes` GB/s of loading every chunk of `store` (read + checksum, into fresh buffers) and of a plain
    memcpy of the same bytes into the same buffers, measured one after the other in this process."""
    import numpy as np

    from kvcached.prefix_store import PrefixStore, chunk_files, chunk_shape, resolve

    name, root = resolve(store)
    chunks = []
    for f in chunk_files(root):
        shape = chunk_shape(f.path)
        if shape is not None:
            chunks.append((PrefixStore(name, root, f.path.parent.name), f.path.name.removesuffix(".kv"), shape))
    if not chunks:
        raise RuntimeError(f"prefix store {store!r} holds no chunk to time: did the engines save any?")
    buffers = [[np.empty(part_bytes, dtype=np.uint8) for _ in range(parts)] for _, _, (parts, part_bytes) in chunks]
    sources = [[np.random.default_rng(0).integers(0, 256, b.size, dtype=np.uint8) for b in bufs] for bufs in buffers]
    total = sum(b.nbytes for bufs in buffers for b in bufs)
    best_load = best_copy = float("inf")
    loaded = 0
    for _ in range(passes):
        t = time.perf_counter()
        loaded = sum(s.load_into(key, [memoryview(b) for b in bufs]) for (s, key, _), bufs in zip(chunks, buffers))
        best_load = min(best_load, time.perf_counter() - t)
        t = time.perf_counter()
        for srcs, bufs in zip(sources, buffers):
            for src, dst in zip(srcs, bufs):
                np.copyto(dst, src)
        best_copy = min(best_copy, time.perf_counter() - t)
    if loaded != len(chunks):
        raise RuntimeError(f"only {loaded} of {len(chunks)} chunks loaded back: the store changed while timed")
    return {"chunks": len(chunks), "bytes": total, "load_gb_per_s": total / best_load / 1e9,
            "memcpy_gb_per_s": total / best_copy / 1e9, "load_vs_memcpy": best_copy / best_load}


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def result_from_run(summary: dict[str, Any], throughput: dict[str, Any], run_dir: str) -> dict[str, Any]:
    series = summary.get("series", {})
    b, cold, again = series.get("B", {}), series.get("B-cold", {}), series.get("A-again", {})
    ttft_ratio = _ratio(b.get("ttft_p50_s"), cold.get("ttft_p50_s"))
    docs = summary.get("documents") or 0
    checks = {
        "ttft_ratio": ttft_ratio is not None and ttft_ratio <= GOAL_TTFT_RATIO,
        "exact": docs > 0 and summary.get("exact_matches") == docs,
        "load_vs_memcpy": throughput["load_vs_memcpy"] >= GOAL_LOAD_VS_MEMCPY,
        "no_failed_requests": all(not s.get("requests_failed") for s in series.values()),
    }
    keys = ("ttft_p50_s", "ttft_mean_s", "requests_ok", "requests_failed", "prompt_tokens_computed",
            "prompt_tokens_local_cache", "prompt_tokens_loaded")
    return {"run_dir": run_dir, "status": summary.get("status"), "documents": docs,
            "exact_matches": summary.get("exact_matches"),
            "series": {name: {k: s.get(k) for k in keys} for name, s in series.items()},
            "ttft_p50_ratio_store_vs_cold": ttft_ratio,
            "ttft_p50_ratio_own_cache_vs_cold": _ratio(again.get("ttft_p50_s"), cold.get("ttft_p50_s")),
            "throughput": throughput,
            "goals": {"ttft_ratio": GOAL_TTFT_RATIO, "load_vs_memcpy": GOAL_LOAD_VS_MEMCPY},
            "checks": checks, "pass": all(checks.values())}


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ok = lambda c: "[green]pass[/]" if r["checks"][c] else "[red]fail[/]"  # noqa: E731
    s = r["series"]
    ms = lambda name: _fmt(None if s.get(name, {}).get("ttft_p50_s") is None  # noqa: E731
                           else 1e3 * s[name]["ttft_p50_s"], ".1f")
    table = Table(title=f"prefix sharing: B from A's stored KV vs a cold B, {r['documents']} documents")
    for col, j in (("what", "left"), ("B-cold", "right"), ("B (store)", "right"), ("A-again (own cache)", "right"),
                   ("B / B-cold, goal", "left")):
        table.add_column(col, justify=j)
    table.add_row("TTFT p50 (ms)", ms("B-cold"), ms("B"), ms("A-again"),
                  f"{_fmt(r['ttft_p50_ratio_store_vs_cold'], '.3f')} (<= {GOAL_TTFT_RATIO}): {ok('ttft_ratio')}")
    tokens = lambda name, k: _fmt(s.get(name, {}).get(k), ".0f")  # noqa: E731
    table.add_row("prompt tokens computed", tokens("B-cold", "prompt_tokens_computed"),
                  tokens("B", "prompt_tokens_computed"), "(A: both series)", "")
    table.add_row("prompt tokens loaded from the store", tokens("B-cold", "prompt_tokens_loaded"),
                  tokens("B", "prompt_tokens_loaded"), "", "")
    table.add_row("outputs equal to A-again's", "", f"{r['exact_matches']} / {r['documents']}", "", ok("exact"))
    t = r["throughput"]
    table.add_row(f"store load GB/s ({t['chunks']} chunks, {t['bytes'] / 1e6:.0f} MB)", "",
                  _fmt(t["load_gb_per_s"], ".2f"), f"memcpy {_fmt(t['memcpy_gb_per_s'], '.2f')}",
                  f"{_fmt(t['load_vs_memcpy'], '.2f')} of memcpy (>= {GOAL_LOAD_VS_MEMCPY}): {ok('load_vs_memcpy')}")
    Console().print(table)
    print(f"run directory: {r['run_dir']}")


def run(args: argparse.Namespace) -> int:
    from kvcached.prefix_store import remove_store
    from kvlab.engines.errors import ServerError
    from kvlab.experiments import prefix_sharing
    from kvlab.runs.run import new_run_id

    if args.docs < 1 or args.doc_tokens < 32 or args.max_tokens < 1:
        print("kvlab bench prefix: --docs >= 1, --doc-tokens >= 32 and --max-tokens >= 1", file=sys.stderr)
        return 2
    store = f"bench-prefix-{new_run_id()}"
    try:
        model = model_path(args.model, "prefix")
        result_run = prefix_sharing(model, docs=args.docs, doc_tokens=args.doc_tokens, max_tokens=args.max_tokens,
                                    store=store, kvcached=args.kvcached, root=args.root, experiment="bench_prefix",
                                    progress=not args.json)
        throughput = load_throughput(store)
    except (ServerError, ValueError, RuntimeError) as exc:
        print(f"kvlab bench prefix: {exc}", file=sys.stderr)
        return 2
    finally:
        remove_store(store)  # the bench's own store goes with it
    result = result_from_run(result_run.summary or {}, throughput, str(result_run.dir))
    return write_and_print(result, result_run.dir / "prefix.json", args.json, _print_table)
