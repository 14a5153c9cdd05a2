"""Static vs kvcached vLLM on the same model, measured as users see it.

Default (--mode abba): the servers run one at a time, in ABBA blocks (static, kvcached, kvcached, static), so a
drift of the machine weighs on both alike. Each block runs two workloads after a warm-up, each a closed loop of
--requests prompts of --prompt-tokens tokens, --concurrency at a time, exactly --max-tokens out (ignore_eos), as
`vllm bench serve --max-concurrency` does:

  fresh   prompts never seen before: the raw cost of an elastic pool
          (goals: tok/s kvcached/static >= 0.98, TTFT p50 ratio <= 1.05);
  reuse   a prompt set sent once, then again after --pause seconds (longer than every kvcached timer), measured:
          what a repeated system prompt, a chat's turns or a benchmark re-run see
          (goals: tok/s ratio >= 0.97, TTFT p50 ratio <= 1.1).

Reported per workload: output tokens/s (mean over blocks), TTFT p50/p99 and TPOT ratios, and each mode's
prefix-cache hit rate from vLLM's own counters; then what kvcached's idle engine holds after the reuse pass, as its
floor and its retained prefix cache. --mode bursts runs the older bursty form instead (both servers up, memory over
time, back-to-idle). The table is printed; the figures go to `elastic.json` in the run directory (stdout: --json).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from kvlab.bench import MODEL_HELP, model_path, write_and_print

GOALS = {"fresh": {"output_tokens_per_s": 0.98, "ttft_p50": 1.05},
         "reuse": {"output_tokens_per_s": 0.97, "ttft_p50": 1.1}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--mode", choices=("abba", "bursts"), default="abba",
                        help="abba: servers in turn, fresh and reuse workloads (default); bursts: both up, bursts "
                             "alternating, memory over time")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV pool of each server (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt (default 256)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens out per request (default 128 in abba mode, 64 in bursts mode)")
    abba = parser.add_argument_group("abba mode")
    abba.add_argument("--requests", type=int, default=32, help="requests per workload pass (default 32)")
    abba.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    abba.add_argument("--pause", type=float, default=3.0,
                      help="seconds between the reuse workload's two passes (default 3: past every kvcached timer)")
    abba.add_argument("--repeats", type=int, default=1, help="ABBA repeated this many times (default 1)")
    abba.add_argument("--workloads", default="fresh,reuse", help="comma-separated: fresh, reuse (default both)")
    bursts = parser.add_argument_group("bursts mode")
    bursts.add_argument("--bursts", type=int, default=3, help="number of bursts (default 3)")
    bursts.add_argument("--burst-size", type=int, default=16, help="requests per burst (default 16)")
    bursts.add_argument("--burst-every", type=float, default=12.0, help="seconds between bursts (default 12)")
    bursts.add_argument("--idle", type=float, default=5.0, help="idle seconds before the load (default 5)")
    bursts.add_argument("--cooldown", type=float, default=6.0, help="idle seconds after the load (default 6)")
    bursts.add_argument("--sequential", action="store_true",
                        help="run the servers one after the other (default: both up, bursts alternating)")
    parser.add_argument("--root", default="results", help="results root (default results/)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def result_from_summary(summary: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """The benchmark's figures and verdicts from an elastic_abba summary."""
    workloads = summary.get("workloads", {})
    checks: dict[str, bool] = {}
    for workload, goals in GOALS.items():
        ratios = workloads.get(workload, {}).get("kvcached", {}).get("ratios")
        if ratios is None:
            continue
        tps, ttft = ratios.get("output_tokens_per_s"), ratios.get("ttft_p50")
        checks[f"{workload}_tok_s"] = tps is not None and tps >= goals["output_tokens_per_s"]
        checks[f"{workload}_ttft_p50"] = ttft is not None and ttft <= goals["ttft_p50"]
    return {"run_dir": run_dir, "status": summary.get("status"), "order": summary.get("order"),
            "workloads": workloads, "goals": GOALS, "checks": checks, "pass": bool(checks) and all(checks.values())}


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    verdict = lambda c: "" if c not in r["checks"] else (" [green]pass[/]" if r["checks"][c] else " [red]fail[/]")  # noqa: E731
    table = Table(title="static vs kvcached, servers in turn (ABBA blocks); ratios kvcached/static")
    for col in ("workload", "tok/s static", "tok/s kvcached", "tok/s ratio", "TTFT p50 ratio", "TTFT p99 ratio",
                "TPOT speed", "prefix hits static / kvcached"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for workload, modes in r["workloads"].items():
        st, kv = modes.get("static", {}), modes.get("kvcached", {})
        ratios = kv.get("ratios", {})
        goals = GOALS.get(workload, {})
        hits = [m.get("prefix_hit_rate") for m in (st, kv)]
        table.add_row(
            workload, _fmt(st.get("output_tokens_per_s"), ".1f"), _fmt(kv.get("output_tokens_per_s"), ".1f"),
            f"{_fmt(ratios.get('output_tokens_per_s'), '.3f')} (>= {goals.get('output_tokens_per_s', '-')})"
            + verdict(f"{workload}_tok_s"),
            f"{_fmt(ratios.get('ttft_p50'), '.3f')} (<= {goals.get('ttft_p50', '-')})"
            + verdict(f"{workload}_ttft_p50"),
            _fmt(ratios.get("ttft_p99"), ".3f"), _fmt(ratios.get("tpot_speed"), ".3f"),
            " / ".join("n/a" if h is None else f"{100 * h:.0f}%" for h in hits))
    Console(width=max(Console().width, 140)).print(table)
    for modes in r["workloads"].values():
        kv = modes.get("kvcached", {})
        if kv.get("idle_retained_bytes") is not None:
            print(f"kvcached idle after the blocks: floor {kv['idle_floor_bytes'] / 2**20:.0f} MiB, retained prefix "
                  f"cache {kv['idle_retained_bytes'] / 2**20:.0f} MiB (given back when memory is wanted)")
            break
    print(f"run directory: {r['run_dir']}")


def run(args: argparse.Namespace) -> int:
    if args.mode == "bursts":
        from kvlab.bench import elastic_bursts

        args.max_tokens = 64 if args.max_tokens is None else args.max_tokens
        return elastic_bursts.run(args)
    from kvlab.engines.errors import ServerError
    from kvlab.experiments import elastic_abba

    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    try:
        model = model_path(args.model, "elastic")
        result_run = elastic_abba(
            model, workloads=workloads, repeats=args.repeats, requests=args.requests, concurrency=args.concurrency,
            prompt_tokens=args.prompt_tokens, max_tokens=128 if args.max_tokens is None else args.max_tokens,
            pause_s=args.pause, kv_cache_gib=args.kv_cache_gib, root=args.root, experiment="bench_elastic",
            progress=not args.json)
    except (ServerError, ValueError, RuntimeError) as exc:
        print(f"kvlab bench elastic: {exc}", file=sys.stderr)
        return 2
    result = result_from_summary(result_run.summary or {}, str(result_run.dir))
    return write_and_print(result, result_run.dir / "elastic.json", args.json, _print_table)
