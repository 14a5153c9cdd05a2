"""Several vLLM servers side by side sharing one kvcached budget group (KVCACHED_IPC_NAME).

Servers start one after another: on a small machine, parallel start-ups fight for the same cores and
each takes longer than the sequence would.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

from kvlab.engines.server import VLLMServer
from kvlab.load.client import send_requests

ServerSpec = Union[str, Mapping[str, Any], VLLMServer]


class Colocation:
    """Servers sharing one KV budget group; a context manager that stops them all.

    `servers` items are model names/paths, dicts of VLLMServer keyword arguments (with "model"), or
    VLLMServer objects (used as they are). `common` keyword arguments apply to every server built here.

    >>> with Colocation([tiny, {"model": tiny, "name": "b"}], kv_cache_gib=1) as colo:
    ...     colo.send_requests(["Hello"])
    """

    def __init__(self, servers: Sequence[ServerSpec], ipc_name: str | None = None, kvcached: bool = True,
                 log_dir: Path | str | None = None, **common: Any) -> None:
        if not servers:
            raise ValueError("Colocation needs at least one server")
        self.ipc_name = ipc_name or f"kvlab-colo-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.kvcached = kvcached
        self.servers: list[VLLMServer] = []
        for i, spec in enumerate(servers):
            if isinstance(spec, VLLMServer):
                self.servers.append(spec)
                continue
            kwargs: dict[str, Any] = {**common, "kvcached": kvcached, "ipc_name": self.ipc_name}
            if log_dir is not None:
                kwargs["log_dir"] = log_dir
            if isinstance(spec, str):
                kwargs["model"] = spec
            else:
                kwargs.update(spec)
            kwargs.setdefault("name", f"{Path(str(kwargs['model']).rstrip('/')).name}-{i}")
            self.servers.append(VLLMServer(**kwargs))
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names must be distinct, got {names}: pass name=... in the specs")

    def start(self) -> "Colocation":
        """Start each server and wait for it before the next; on failure stop those already up."""
        try:
            for server in self.servers:
                server.start(wait=True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        for server in reversed(self.servers):
            server.stop(timeout)

    def __enter__(self) -> "Colocation":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __iter__(self) -> Iterator[VLLMServer]:
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, key: int | str) -> VLLMServer:
        if isinstance(key, int):
            return self.servers[key]
        for server in self.servers:
            if server.name == key:
                return server
        raise KeyError(f"no server named {key!r}; names: {[s.name for s in self.servers]}")

    def send_requests(self, prompts: Sequence[str], max_tokens: int = 32,
                      temperature: float = 0.0) -> dict[str, list[str]]:
        """Every prompt to every server; completions keyed by server name."""
        return send_requests(self.servers, prompts, max_tokens=max_tokens, temperature=temperature)
