"""`kvlab router --config FILE --port N`: the router alone, in front of engines that are already running."""
from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="route OpenAI requests by model to engines already running",
                       description=__doc__)
    p.add_argument("--config", required=True, metavar="FILE", help="fleet YAML; every instance needs `port:`")
    p.add_argument("--port", type=int, default=None, help="router port (default: router.router_port of the file)")
    p.add_argument("--host", default=None, help="bind address (default: router.router_host, else 127.0.0.1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from kvlab.engines.fleet import backend_of, use_fleet_shm_dir
    from kvlab.engines.fleet_config import FleetConfigError, load_fleet_config
    from kvlab.engines.ports import port_in_use
    from kvlab.router.app import Router
    from kvlab.router.runner import run_router

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = load_fleet_config(args.config, check_ports=False)
        missing = [i.name for i in config.instances if i.port is None]
        if missing:
            raise FleetConfigError(f"instances {', '.join(missing)} have no port: `kvlab router` joins engines that "
                                   "are already running, so give each instance `port:` (or use `kvlab serve`)")
    except FleetConfigError as e:
        print(f"kvlab router: {e}", file=sys.stderr)
        return 2
    host = args.host or config.router.router_host
    port = args.port or config.router.router_port
    if port_in_use(port, host if host in ("127.0.0.1", "0.0.0.0") else "0.0.0.0"):
        print(f"kvlab router: port {port} is already in use: pass --port with a free one", file=sys.stderr)
        return 2
    use_fleet_shm_dir(config)
    router = Router([backend_of(config, inst) for inst in config.instances], config.router, config.sleep_manager)
    targets = ", ".join(f"{b.model} @ {b.url}" for b in router.backends.values())
    print(f"kvlab router: http://{host}:{port} -> {targets}",
          flush=True)
    run_router(router, host, port)
    return 0
