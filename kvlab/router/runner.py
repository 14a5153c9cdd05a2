"""Run the router in the foreground until SIGINT/SIGTERM: what `kvlab router` and `kvlab serve` share."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Iterable

from kvlab.fleet_config import FleetConfig
from kvlab.router.app import Router, serve_app
from kvlab.router.backends import Backend

log = logging.getLogger("kvlab.router")


def share_shm_dir(config: FleetConfig) -> None:
    """The `kv` sleep level writes the engines' budget records: read them where the engines write them."""
    dirs = {config.environment(i).get("KVCACHED_SHM_DIR") for i in config.instances if config.uses_kvcached(i)}
    dirs.discard(None)
    if len(dirs) > 1:
        log.warning("instances use different KVCACHED_SHM_DIR values %s: the kv sleep level sees only %s",
                    sorted(d for d in dirs if d), sorted(dirs)[0])
    if dirs:
        os.environ["KVCACHED_SHM_DIR"] = sorted(d for d in dirs if d)[0]


def build_router(config: FleetConfig, backends: Iterable[Backend]) -> Router:
    return Router(backends, config.router, config.sleep_manager)


async def _serve_until_signal(router: Router, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve_app(router.build_app(host), host, port, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_router(router: Router, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; returns after a clean shutdown (sleeping kv models woken first)."""
    router.check_bind(host)
    asyncio.run(_serve_until_signal(router, host, port))
