"""Two models in one KV budget: elastic sharing (kvcached) vs static halves, where KV capacity binds.

The design. Two engines share a KV budget of --total-kv-gib. Their traffic is intermittent: a peak of --peak-size
requests goes to one model while the other is quiet, then the other way round (--peaks rounds, --gap seconds apart).
Each peak needs more KV cache than half the budget.

  static    each engine gets a fixed pool of half the budget, allocated at start-up (a static partition). A peak
            fills its half; vLLM admits only what fits and the rest queues until running requests finish, while the
            other half sits idle.
  elastic   both engines run kvcached in one budget group capped at the whole budget; each may map up to all of
            it. The busy engine borrows what the quiet one is not using and runs the whole peak at once. The quiet
            engine keeps its previous peak's prefix cache (retained) only until the busy one asks for the memory:
            its refused reservation is published as demand and the quiet engine gives the retained pages back.

The same model serves both engines by default (a valid colocation: two deployments of one model). Reported: TTFT
p50/p99 per mode over all requests (goal: elastic/static p99 <= 0.5 on CPU), per engine the most requests vLLM ran at
once and its peak KV usage, and under elastic sharing the peak of the group's reserved memory against its cap. The
figures go to `colocation.json` in the run directory (stdout with --json, which has `ttft_p99_ratio`).
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from kvlab.bench import MODEL_HELP, model_path

GOAL_TTFT_P99_RATIO = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None, help=MODEL_HELP + "; served by both engines")
    parser.add_argument("--second-model", default=None, help="a different model for the second engine")
    parser.add_argument("--total-kv-gib", type=float, default=0.25,
                        help="the KV budget both engines share (default 0.25: the tiny model's peaks bind)")
    parser.add_argument("--peaks", type=int, default=2, help="rounds of peaks, one per model each (default 2)")
    parser.add_argument("--peak-size", type=int, default=32, help="requests per peak (default 32)")
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between peaks (default 10)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt (default 256)")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens out per request (default 96)")
    parser.add_argument("--root", default="results", help="results root (default results/)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from kvlab.experiments import colocation as colo_x
    from kvlab.experiments.common import resolve_device
    from kvlab.load.metrics import percentile
    from kvlab.runs import Run
    from kvlab.runs.memory_figures import vllm_peaks

    if args.total_kv_gib <= 0 or args.peaks < 1 or args.peak_size < 1 or not args.gap >= 0:
        raise ValueError("--total-kv-gib must be > 0, --peaks and --peak-size >= 1, --gap >= 0")
    first = model_path(args.model, "colocation")
    models = [first, model_path(args.second_model, "colocation") if args.second_model else first]
    names = ["m1", "m2"]
    device = resolve_device("auto")
    params = {k: v for k, v in vars(args).items() if k not in ("func", "json")}
    run = Run("bench_colocation", {**params, "models": models, "device": device}, root=args.root)
    burst = dict(rounds=args.peaks, burst_size=args.peak_size, gap_s=args.gap, prompt_tokens=args.prompt_tokens,
                 max_tokens=args.max_tokens, idle_s=2.0, device=device, progress=not args.json)
    group_peak = None
    with run:
        elastic = colo_x.start_colocation(run, models, names=names, kvcached=True, kv_cache_gib=args.total_kv_gib,
                                          group_limit_gib=args.total_kv_gib, progress=not args.json, device=device)
        try:
            colo_x.alternating_bursts(run, elastic, series=[f"elastic/{n}" for n in names], **burst)
        finally:
            colo_x.stop_colocation(elastic)
        static = colo_x.start_colocation(run, models, names=names, kvcached=False,
                                         kv_cache_gib=args.total_kv_gib / 2, progress=not args.json, device=device)
        try:
            colo_x.alternating_bursts(run, static, series=[f"static/{n}" for n in names], **burst)
        finally:
            colo_x.stop_colocation(static)
        memory = run.memory()
        series = [f"{mode}/{n}" for mode in ("elastic", "static") for n in names]
        summary = run.finish({s: run.series_summary(s, **vllm_peaks(memory, s)) for s in series})
        kv = memory[memory["metric"] == "kv_reserved_bytes"]
        if len(kv):
            group_peak = float(kv.groupby("t_s")["value"].sum().max())
    out: dict[str, Any] = {"run_dir": str(run.dir), "total_kv_bytes": int(args.total_kv_gib * (1 << 30)),
                           "group_reserved_peak_bytes": group_peak, "engines": {}}
    for mode in ("elastic", "static"):
        ttfts = [r.ttft_s for r in run.records if r.series.startswith(mode + "/") and r.ok and r.ttft_s is not None]
        failed = sum(1 for r in run.records if r.series.startswith(mode + "/") and not r.ok)
        out[mode] = {"ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
                     "requests_ok": len(ttfts), "requests_failed": failed}
    for s, figures in summary["series"].items():
        out["engines"][s] = {k: figures.get(k) for k in ("max_requests_running", "max_kv_cache_usage",
                                                        "ttft_p99_s", "requests_ok")}
    ratio = (out["elastic"]["ttft_p99_s"] / out["static"]["ttft_p99_s"]
             if out["elastic"]["ttft_p99_s"] and out["static"]["ttft_p99_s"] else None)
    out["ttft_p99_ratio"] = ratio
    out["ttft_p50_ratio"] = (out["elastic"]["ttft_p50_s"] / out["static"]["ttft_p50_s"]
                             if out["elastic"]["ttft_p50_s"] and out["static"]["ttft_p50_s"] else None)
    out["goal_ttft_p99_ratio"] = GOAL_TTFT_P99_RATIO
    out["pass"] = ratio is not None and ratio <= GOAL_TTFT_P99_RATIO and not out["elastic"]["requests_failed"]
    (run.dir / "colocation.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="two models, one KV budget: elastic sharing vs static halves")
    for col in ("what", "static halves", "elastic sharing", "elastic/static"):
        table.add_column(col, justify="left" if col == "what" else "right")
    st, el = r["static"], r["elastic"]
    table.add_row("TTFT p50 (s)", _fmt(st["ttft_p50_s"], ".3f"), _fmt(el["ttft_p50_s"], ".3f"),
                  _fmt(r["ttft_p50_ratio"], ".3f"))
    verdict = "[green]pass[/]" if r["pass"] else "[red]fail[/]"
    table.add_row("TTFT p99 (s)", _fmt(st["ttft_p99_s"], ".3f"), _fmt(el["ttft_p99_s"], ".3f"),
                  f"{_fmt(r['ttft_p99_ratio'], '.3f')} (<= {GOAL_TTFT_P99_RATIO}): {verdict}")
    table.add_row("requests ok / failed", f"{st['requests_ok']} / {st['requests_failed']}",
                  f"{el['requests_ok']} / {el['requests_failed']}", "")
    for name in ("m1", "m2"):
        s, e = r["engines"].get(f"static/{name}", {}), r["engines"].get(f"elastic/{name}", {})
        table.add_row(f"{name}: most requests running at once", _fmt(s.get("max_requests_running"), ".0f"),
                      _fmt(e.get("max_requests_running"), ".0f"), "")
        table.add_row(f"{name}: peak KV usage of its pool", _fmt(s.get("max_kv_cache_usage"), ".2f"),
                      _fmt(e.get("max_kv_cache_usage"), ".2f"), "")
    peak = r.get("group_reserved_peak_bytes")
    table.add_row("elastic group reserved, peak / cap (MiB)", "",
                  f"{_fmt(None if peak is None else peak / 2**20, '.0f')} / {r['total_kv_bytes'] / 2**20:.0f}", "")
    Console(width=max(Console().width, 140)).print(table)
    print(f"run directory: {r['run_dir']}")


def run(args: argparse.Namespace) -> int:
    from kvlab.bench import report
    from kvlab.engines.errors import ServerError

    return report("colocation", lambda: measure(args), print_table, args.json,
                  errors=(ServerError, RuntimeError, ValueError, OSError))
