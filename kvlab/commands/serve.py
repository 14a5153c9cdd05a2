"""`kvlab serve --config FILE`: start every engine of a fleet file, then the router, in one supervised process.

Ctrl-C or SIGTERM stops the router and every engine; another one while they stop is reported and waits for
them. `kvlab serve status [--router URL]` prints the fleet's state from the router's endpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
from pathlib import Path
from typing import Callable, Protocol

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Shutdown(Exception):
    """The first SIGTERM or Ctrl-C: unwind whatever runs (an engine's start-up, a wait) to the engines' stop."""


class Stoppable(Protocol):
    def stop(self) -> None: ...


class _StopSignals:
    """SIGTERM and SIGINT while `kvlab serve` runs. The first one is raised, because only an exception interrupts
    an engine's start-up; every later one, and any once the engines are stopping, is only reported: raised, it
    would cut the stop short and leave engines behind (a service manager or an impatient user sends a second)."""

    def __init__(self) -> None:
        self.raised = False
        self.stopping = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.raised and not self.stopping:
            self.raised = True
            raise _Shutdown()
        # os.write, not print: a handler may run in the middle of a print to the same stream.
        os.write(2, f"kvlab serve: {signal.Signals(signum).name} while already stopping the engines: waiting "
                    "for them (the engines die with this process anyway)\n".encode())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start a fleet's engines and its router together (or: serve status)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["status"], help="status: print the running fleet's state")
    p.add_argument("--config", metavar="FILE", help="fleet YAML (examples/fleet-tiny.yaml)")
    p.add_argument("--log-dir", default=None,
                   help="one log per engine here (default .cache/kvlab/serve/<time>-<pid>)")
    p.add_argument("--port", type=int, default=None, help="router port (default: router.router_port)")
    p.add_argument("--host", default=None, help="router bind address (default: router.router_host)")
    p.add_argument("--router", default=None, metavar="URL", help="status: the router (default from --config, "
                   "else http://127.0.0.1:8080)")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return status(args)
    if not args.config:
        print("kvlab serve: --config FILE is required (examples/fleet-tiny.yaml is a start)", file=sys.stderr)
        return 2
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    import logging

    from kvlab.engines.errors import ServerError
    from kvlab.engines.fleet import Fleet, use_fleet_shm_dir
    from kvlab.engines.fleet_config import FleetConfigError, load_fleet_config
    from kvlab.router.runner import run_router

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = load_fleet_config(args.config, check_ports=True)
    except FleetConfigError as e:
        print(f"kvlab serve: {e}", file=sys.stderr)
        return 2
    host = args.host or config.router.router_host
    port = args.port or config.router.router_port
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_dir = Path(args.log_dir or Path(".cache") / "kvlab" / "serve" / stamp)
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(config, log_dir, progress=sys.stderr.isatty())
    router = fleet.router() if config.router.enable_router else None
    if router:
        router.check_bind(host)  # before minutes of engine start-up, not after

    def work() -> int:
        try:
            fleet.check()
            print(f"kvlab serve: starting {len(fleet.engines)} engine(s), logs in {log_dir}", flush=True)
            fleet.start()
        except FleetConfigError as e:
            print(f"kvlab serve: {e}", file=sys.stderr)
            return 2
        except ServerError as e:
            print(f"kvlab serve: {e}", file=sys.stderr)
            return 1
        state = {"router": f"http://{host}:{port}" if router else None, "pid": os.getpid(),
                 "instances": [{"name": i.inst.name, "model": i.inst.served_model_name, "url": i.url,
                                "log": str(log_dir / f"{i.inst.name}.log")} for i in fleet.engines]}
        (log_dir / "fleet.json").write_text(json.dumps(state, indent=2))
        for inst in state["instances"]:
            print(f"kvlab serve: {inst['name']} ({inst['model']}) ready at {inst['url']}", flush=True)
        if router:  # from here the router's event loop handles SIGTERM and SIGINT
            use_fleet_shm_dir(config)
            print(f"kvlab serve: router on http://{host}:{port}", flush=True)
            run_router(router, host, port)
        else:
            wait_for_signal()
        return 0

    return supervise(fleet, work)


def supervise(fleet: Stoppable, work: Callable[[], int]) -> int:
    """Run `work` (start the engines, then serve) until it returns or SIGTERM or Ctrl-C arrives, then stop every
    engine, whatever signals come meanwhile. Returns work's exit status, 0 after a signal. Must run on the main
    thread (signal handlers are installed there)."""
    handler = _StopSignals()
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        return work()
    except (_Shutdown, KeyboardInterrupt):
        return 0
    finally:
        handler.stopping = True
        # Installed again: the router's event loop leaves the default handlers behind when it returns.
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)
        try:
            print("kvlab serve: stopping the engines", flush=True)
            fleet.stop()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def wait_for_signal() -> None:
    """Sleep until a stop signal: supervise's handler raises the first one out of signal.pause()."""
    while True:
        signal.pause()


def _get(url: str, token: str | None) -> object:
    from kvlab.load.client import get_json

    return get_json(url, timeout=10, token=token)


def status(args: argparse.Namespace) -> int:
    from kvlab.router.app import TOKEN_ENV

    url = args.router
    token = os.environ.get(TOKEN_ENV) or None
    if url is None and args.config:
        from kvlab.engines.fleet_config import FleetConfigError, load_fleet_config

        try:
            config = load_fleet_config(args.config, check_ports=False)
        except FleetConfigError as e:
            print(f"kvlab serve status: {e}", file=sys.stderr)
            return 2
        url = f"http://{config.router.router_host}:{config.router.router_port}"
        token = config.router.api_token or token
    url = (url or "http://127.0.0.1:8080").rstrip("/")
    try:
        state = {"router": url, "health": _get(url + "/health/all", token),
                 "sleep": _get(url + "/sleep/status", token), "traffic": _get(url + "/traffic/stats", token)}
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            print(f"kvlab serve status: the router at {url} refused us ({e.code}): give its token with "
                  f"{TOKEN_ENV} or router.api_token in --config FILE", file=sys.stderr)
            return 2
        print(f"kvlab serve status: the router at {url} answered {e.code}: {e.reason}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"kvlab serve status: no router answers at {url} ({e}): is `kvlab serve` running? "
              "pass --router URL or --config FILE", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fleet behind {url}")
    for col in ("model", "instance", "health", "sleep", "level", "requests", "failed", "idle s", "freed MB",
                "last wake s"):
        table.add_column(col)
    for model, health in state["health"]["models"].items():
        sleep = state["sleep"]["models"].get(model, {})
        traffic = state["traffic"]["traffic_stats"].get(model, {})
        last_sleep, last_wake = sleep.get("last_sleep") or {}, sleep.get("last_wake") or {}
        table.add_row(model, health["name"], health["status"], sleep.get("state", "?"), sleep.get("level", "?"),
                      str(traffic.get("total_requests", 0)), str(traffic.get("failed_requests", 0)),
                      f"{traffic.get('idle_time_seconds', 0):.0f}",
                      f"{last_sleep['freed_bytes'] / 1e6:.0f}" if "freed_bytes" in last_sleep else "-",
                      f"{last_wake['wake_seconds']:.3f}" if "wake_seconds" in last_wake else "-")
    Console().print(table)
    return 0
