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
    # The caller's handlers (`kvlab serve` keeps its own, so a second signal cannot cut its shutdown short) come
    # back as they were: remove_signal_handler alone would put Python's defaults in their place.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve_app(router.build_app(host), host, port, stop)
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


def run_router(router: Router, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; returns after a clean shutdown (sleeping kv models woken first)."""
    router.check_bind(host)
    asyncio.run(_serve_until_signal(router, host, port))
