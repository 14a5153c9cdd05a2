"""Run the router in the foreground until SIGINT/SIGTERM: what `kvlab router` and `kvlab serve` share."""
from __future__ import annotations

import asyncio
import logging
import signal

from kvlab.router.app import Router, serve_app

log = logging.getLogger("kvlab.router")


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
