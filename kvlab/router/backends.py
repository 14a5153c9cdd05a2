"""What the router knows of one engine: where it listens, what it serves, and (under `kvlab serve`) its process.

A Backend is plain data plus an optional ProcessControl, so the router runs the same way over engines it
launched (kvlab serve) and over engines someone else started (kvlab router), and tests can build one by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ProcessControl(Protocol):
    """The engine's process tree, as `kvlab serve` supervises it (kvlab.engines.fleet.SupervisedEngine)."""

    def pids(self) -> list[int]: ...

    def stop(self) -> None: ...

    def start(self) -> None:
        """Start again and block until the engine answers."""


@dataclass
class Backend:
    name: str  # the instance name from the fleet file
    model: str  # the `model` field that routes here
    url: str  # http://host:port, no trailing slash
    engine: str = "vllm"
    kvcached: bool = False
    sleep_mode: bool = False  # started with --enable-sleep-mode (vLLM's level-1 sleep)
    sleep_level: str | None = None  # configured level; None: the default for this device
    process: ProcessControl | None = None


def pids_listening_on(port: int) -> list[int]:
    """The process tree of whoever listens on `port` (an engine kvlab did not start), for memory probes."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        return []
    owners = {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    out: list[int] = []
    for pid in sorted(owners):
        try:
            proc = psutil.Process(pid)
            out += [pid] + [p.pid for p in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return out
