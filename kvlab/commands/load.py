"""`kvlab load`: drive an OpenAI-compatible server with an open-loop workload; write requests.csv and summary.json."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from kvlab.load.arrivals import add_arrival_arguments

    p = sub.add_parser("load", help="run a workload against a server; write requests.csv and summary.json",
                       description=__doc__)
    p.add_argument("--url", required=True,
                   help="the server: its root (http://127.0.0.1:8000) or its /v1 URL, as OpenAI clients take")
    p.add_argument("--model", help="model name to request (default: the first one the server lists)")
    p.add_argument("--duration", type=float,
                   help="seconds of sending (required unless the arrivals end by themselves: trace, "
                        "bursts with --burst-count)")
    add_arrival_arguments(p)
    g = p.add_argument_group("requests")
    g.add_argument("--prompt-tokens", type=int, default=128,
                   help="synthetic prompts of exactly N tokens, fitted with the server's /tokenize (default 128)")
    g.add_argument("--prompts-file", help="JSONL ({\"prompt\": ...} per line) or text file, one prompt per line")
    g.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="a local Hugging Face tokenizer (a model directory, as `vllm bench serve` takes) to fit "
                        "synthetic prompts exactly when the server has no /tokenize; without it such a server gets "
                        "approximate lengths, with a warning")
    g.add_argument("--dataset-name", choices=("random", "sharegpt", "burstgpt"), default="random",
                   help="random: synthetic prompts (default); sharegpt: the first user turns of a ShareGPT JSON "
                        "file; burstgpt: replay a BurstGPT CSV trace (its timestamps are the arrivals, its request "
                        "and response token counts the prompt lengths and max tokens)")
    g.add_argument("--dataset-path", metavar="FILE", help="the file for --dataset-name sharegpt or burstgpt")
    g.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="stream tokens (needed for TTFT/ITL; default on)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --max-tokens (default on)")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    g.add_argument("--concurrency", type=int, help="cap on requests in flight (default: none, pure open loop)")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--series", help="series name in the records (default: the model name)")
    s = p.add_argument_group("SLOs for goodput (seconds)")
    s.add_argument("--slo-ttft", type=float)
    s.add_argument("--slo-tpot", type=float)
    s.add_argument("--slo-e2e", type=float)
    p.add_argument("--out", required=True, help="output directory (created if needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(func=run)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvlab load: {summary['requests_ok']} ok, {summary['requests_failed']} failed")
    table.add_column("metric")
    table.add_column("p50", justify="right")
    table.add_column("p99", justify="right")
    for key, label in (("ttft", "TTFT ms"), ("tpot", "TPOT ms"), ("itl", "ITL ms"), ("latency", "e2e ms")):
        cells = [summary.get(f"{key}_p{q}_s") for q in (50, 99)]
        table.add_row(label, *("-" if v is None else f"{v * 1e3:.1f}" for v in cells))
    Console().print(table)
    rate, tps, goodput = summary["request_rate"], summary["output_tokens_per_s"], summary["goodput"]
    print(f"request rate {rate or 0:.2f}/s, output {tps or 0:.1f} tok/s"
          + (f", goodput {goodput:.2f}/s" if goodput is not None else ""))


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse numbers that would send nothing, never end or fail every request, before anything is sent or
    written (the arrival flags are checked by ArrivalSpec)."""
    import math

    def check(flag: str, value: float | None, *, whole: bool = False) -> None:
        if value is not None and not (math.isfinite(value) and value >= (1 if whole else 0) and value != 0):
            kind = "a whole number >= 1" if whole else "a finite number > 0"
            raise ValueError(f"{flag} must be {kind}, got {value:g}")

    check("--duration", args.duration)
    check("--timeout", args.timeout)
    check("--concurrency", args.concurrency, whole=True)
    check("--max-tokens", args.max_tokens, whole=True)
    check("--prompt-tokens", args.prompt_tokens, whole=True)
    if args.dataset_name != "random" and not args.dataset_path:
        raise ValueError(f"--dataset-name {args.dataset_name} needs --dataset-path FILE")
    if args.dataset_path and args.dataset_name == "random":
        raise ValueError("--dataset-path goes with --dataset-name sharegpt or burstgpt")
    if args.dataset_name != "random" and args.prompts_file:
        raise ValueError("give either --prompts-file or --dataset-name, not both")
    for flag in ("--slo-ttft", "--slo-tpot", "--slo-e2e"):
        check(flag, getattr(args, flag[2:].replace("-", "_")))


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path
    from typing import Any

    from kvlab.load.arrivals import spec_from_args
    from kvlab.load.client import served_model
    from kvlab.load.metrics import SLO, summarize
    from kvlab.load.prompts import TokenizeUnavailable, read_sharegpt
    from kvlab.load.records import RequestsCsvWriter
    from kvlab.load.workload import Target, run_workload

    try:
        _check_flags(args)
        if args.dataset_name == "burstgpt":
            args.arrival, args.trace_path = "trace", args.dataset_path
        spec = spec_from_args(args)
        spec.trace_rows()  # read now, though the workload reads it again: a bad line must stop us before --out
        model = args.model or served_model(args.url)
        if args.dataset_name == "sharegpt":
            prompts: Any = read_sharegpt(args.dataset_path)
        else:
            prompts = Path(args.prompts_file) if args.prompts_file else args.prompt_tokens
        target = Target(args.url, model, spec, prompts, max_tokens=args.max_tokens, stream=args.stream,
                        ignore_eos=args.ignore_eos, series=args.series, endpoint=args.endpoint,
                        tokenizer=args.tokenizer)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "requests.csv"
        csv_path.write_text("")  # a fresh file: rows are appended as requests finish
        with RequestsCsvWriter(csv_path) as writer:
            records = run_workload(target, args.duration, seed=args.seed, concurrency=args.concurrency,
                                   on_record=writer, progress=not args.no_progress, request_timeout_s=args.timeout)
    except (ValueError, FileNotFoundError, TokenizeUnavailable, OSError, RuntimeError) as e:
        print(f"kvlab load: {e}", file=sys.stderr)
        return 2
    slo = SLO(ttft_s=args.slo_ttft, tpot_s=args.slo_tpot, e2e_s=args.slo_e2e)
    summary = summarize(records, slo)
    summary.update(t0_monotonic_s=records.t0_s, t0_epoch_s=records.t0_epoch_s, url=args.url, model=model,
                   arrival=asdict(spec), seed=args.seed, max_tokens=args.max_tokens, stream=args.stream,
                   prompts=(str(args.prompts_file) if args.prompts_file else
                            {"dataset": args.dataset_name, "path": args.dataset_path} if args.dataset_path else
                            {"tokens": args.prompt_tokens, "tokenizer": args.tokenizer}))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
        print(f"wrote {csv_path} and {out / 'summary.json'}")
    return 0 if summary["requests_ok"] > 0 or not records else 1
