"""`kvlab bench elastic --mode bursts`: static vs kvcached under bursts, memory over time, in one run.

Reports idle and peak host memory of each server's process tree, aggregate decode tokens/s (goal: kvcached /
static >= 0.98), TTFT p50/p99, the time the kvcached server takes to come back to its idle memory after the
last request ends (goal <= 1 s, from the memory probes), and kvcached's idle KV memory as a share of the pool
(goal <= 1%, from its shared-memory records; the retained prefix cache is shown beside it). Both servers are up at
once and their bursts alternate, so a neighbour's load on the machine meets both alike (--sequential runs them in
turn instead). The figures go to `elastic.json` in the run directory (plus stdout with --json).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from kvlab.bench import model_path, write_and_print

GOAL_DECODE_RATIO = 0.98
GOAL_BACK_TO_IDLE_S = 1.0
GOAL_IDLE_KV_SHARE = 0.01


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def result_from_summary(summary: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """The benchmark's figures and verdicts from an elastic_vs_static summary."""
    st, kv = summary["series"].get("static", {}), summary["series"].get("kvcached", {})
    keys = ("idle_mem_mb", "peak_mem_mb", "flex_mb", "decode_tokens_per_s", "burst_decode_tokens_per_s",
            "burst_decode_tokens_per_s_median", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
            "latency_p50_s", "latency_p99_s", "requests_ok", "requests_failed", "back_to_idle_s",
            "kv_back_to_idle_s", "idle_kv_share", "idle_kv_floor_share", "idle_kv_floor_bytes",
            "idle_kv_retained_bytes", "pool_bytes", "idle_kv_reserved_bytes",
            "after_cooldown_kv_reserved_bytes", "after_cooldown_mem_mb", "startup_s")
    decode_ratio = _ratio(kv.get("decode_tokens_per_s"), st.get("decode_tokens_per_s"))
    back, share = kv.get("back_to_idle_s"), kv.get("idle_kv_share")
    checks = {
        "decode_ratio": decode_ratio is not None and decode_ratio >= GOAL_DECODE_RATIO,
        "back_to_idle": back is not None and back <= GOAL_BACK_TO_IDLE_S,
        "idle_kv_share": share is not None and share <= GOAL_IDLE_KV_SHARE,
        "no_failed_requests": not st.get("requests_failed") and not kv.get("requests_failed"),
    }
    return {
        "run_dir": run_dir, "status": summary.get("status"), "interleave": summary.get("interleave"),
        "static": {k: st.get(k) for k in keys}, "kvcached": {k: kv.get(k) for k in keys},
        "decode_ratio": decode_ratio,
        "burst_median_decode_ratio": _ratio(kv.get("burst_decode_tokens_per_s_median"),
                                            st.get("burst_decode_tokens_per_s_median")),
        # Per-request decode speed (static TPOT over kvcached TPOT): unlike the aggregate above, it does not move
        # with how a burst's prefills happen to interleave with its decodes, so it separates the two effects.
        "tpot_p50_speed_ratio": _ratio(st.get("tpot_p50_s"), kv.get("tpot_p50_s")),
        "idle_mem_ratio": _ratio(kv.get("idle_mem_mb"), st.get("idle_mem_mb")),
        "goals": {"decode_ratio": GOAL_DECODE_RATIO, "back_to_idle_s": GOAL_BACK_TO_IDLE_S,
                  "idle_kv_share": GOAL_IDLE_KV_SHARE},
        "checks": checks, "pass": all(checks.values()),
    }


def _mib(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    ok = lambda c: "[green]pass[/]" if r["checks"][c] else "[red]fail[/]"  # noqa: E731
    st, kv = r["static"], r["kvcached"]
    table = Table(title="static vs kvcached vLLM-CPU, same model and bursty workload"
                        + (" (bursts alternating)" if r.get("interleave") else " (servers in turn)"))
    for col, j in (("what", "left"), ("static", "right"), ("kvcached", "right"), ("kvcached/static, goal", "left")):
        table.add_column(col, justify=j)
    table.add_row("idle memory (MB)", _fmt(st["idle_mem_mb"], ".0f"), _fmt(kv["idle_mem_mb"], ".0f"),
                  _fmt(r["idle_mem_ratio"], ".2f"))
    table.add_row("peak memory (MB)", _fmt(st["peak_mem_mb"], ".0f"), _fmt(kv["peak_mem_mb"], ".0f"), "")
    table.add_row("decode tokens/s", _fmt(st["decode_tokens_per_s"], ".1f"), _fmt(kv["decode_tokens_per_s"], ".1f"),
                  f"{_fmt(r['decode_ratio'], '.3f')} (>= {GOAL_DECODE_RATIO}): {ok('decode_ratio')}")
    table.add_row("decode tokens/s, median burst", _fmt(st.get("burst_decode_tokens_per_s_median"), ".1f"),
                  _fmt(kv.get("burst_decode_tokens_per_s_median"), ".1f"),
                  f"{_fmt(r.get('burst_median_decode_ratio'), '.3f')} (shown; the goal is on all bursts)")
    table.add_row("TPOT p50 (ms)", _fmt(_ms(st.get("tpot_p50_s")), ".1f"), _fmt(_ms(kv.get("tpot_p50_s")), ".1f"),
                  f"{_fmt(r.get('tpot_p50_speed_ratio'), '.3f')} (speed: static TPOT / kvcached TPOT)")
    table.add_row("TTFT p50 (s)", _fmt(st["ttft_p50_s"], ".3f"), _fmt(kv["ttft_p50_s"], ".3f"), "")
    table.add_row("TTFT p99 (s)", _fmt(st["ttft_p99_s"], ".3f"), _fmt(kv["ttft_p99_s"], ".3f"), "")
    table.add_row("back to idle after load (s)", _fmt(st["back_to_idle_s"], ".2f"), _fmt(kv["back_to_idle_s"], ".2f"),
                  f"<= {GOAL_BACK_TO_IDLE_S:g} s: {ok('back_to_idle')}")
    share = kv["idle_kv_share"]
    table.add_row("idle KV reserved / pool", "100% (static pool)", _fmt(None if share is None else 100 * share, ".2f")
                  + ("%" if share is not None else ""), f"<= {100 * GOAL_IDLE_KV_SHARE:g}%: {ok('idle_kv_share')}")
    retained = kv.get("idle_kv_retained_bytes")
    table.add_row("of it: floor / retained prefix cache (MiB)", "",
                  f"{_fmt(_mib(kv.get('idle_kv_floor_bytes')), '.0f')} / {_fmt(_mib(retained), '.0f')}",
                  "retained goes to whoever needs the memory")
    table.add_row("requests ok / failed", f"{st['requests_ok']} / {st['requests_failed']}",
                  f"{kv['requests_ok']} / {kv['requests_failed']}", ok("no_failed_requests"))
    Console().print(table)
    print(f"run directory: {r['run_dir']}")


def run(args: argparse.Namespace) -> int:
    from kvlab.engines.errors import ServerError
    from kvlab.experiments import elastic_vs_static

    try:
        model = model_path(args.model, "elastic")
        result_run = elastic_vs_static(
            model, kv_cache_gib=args.kv_cache_gib, bursts=args.bursts, burst_size=args.burst_size,
            burst_every=args.burst_every, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
            idle_s=args.idle, cooldown_s=args.cooldown, root=args.root, experiment="bench_elastic",
            interleave=not args.sequential, progress=not args.json)
    except (ServerError, ValueError) as exc:
        print(f"kvlab bench elastic: {exc}", file=sys.stderr)
        return 2
    result = result_from_summary(result_run.summary or {}, str(result_run.dir))
    return write_and_print(result, result_run.dir / "elastic.json", args.json, _print_table)
