"""kvcached's own figures for a pool: used, reserved, limit and virtual bytes from its shared-memory records."""
from __future__ import annotations

import time
from typing import Any

from kvlab.probes.proc import process_tree
from kvlab.probes.protocol import KV_FLOOR_BYTES, KV_RESERVED_BYTES, KV_RETAINED_BYTES, Probe, Reading


class KvcachedSource:
    """used/reserved/limit bytes of kvcached pools, read from the shared-memory records (no engine involved).

    Pools are matched by `name` (the exact record name), by `group` (KVCACHED_IPC_NAME), or by `server`
    (records owned by a process of that server's tree). Live records only; several matches are summed.
    """

    def __init__(self, series: str, name: str | None = None, *, group: str | None = None,
                 server: Any = None, interval_s: float | None = None) -> None:
        if name is None and group is None and server is None:
            raise ValueError("KvcachedSource needs name=, group= or server= to know which pools to read")
        self.series = series
        self.name = name
        self.group = group
        self.server = server
        self.interval_s = interval_s
        self._server_pids: set[int] = set()
        self._pids_at = float("-inf")

    def _matches(self, info: Any) -> bool:
        if not info.alive:
            return False
        if self.name is not None and info.name != self.name:
            return False
        if self.group is not None and info.group != self.group:
            return False
        if self.server is not None:
            now = time.monotonic()
            if now - self._pids_at > 1.0:
                root = getattr(self.server, "pid", None)
                self._server_pids = set(process_tree(root)) if root else set()
                self._pids_at = now
            return info.pid in self._server_pids
        return True

    def read(self) -> list[Reading]:
        from kvcached.budget import list_instances

        infos = [i for i in list_instances() if self._matches(i)]
        if not infos:
            return []
        return [(self.series, "kv_used_bytes", float(sum(i.used_bytes for i in infos))),
                (self.series, KV_RESERVED_BYTES, float(sum(i.reserved_bytes for i in infos))),
                (self.series, KV_FLOOR_BYTES, float(sum(i.floor_bytes for i in infos))),
                (self.series, KV_RETAINED_BYTES, float(sum(i.retained_bytes for i in infos))),
                (self.series, "kv_limit_bytes", float(sum(i.effective_limit_bytes for i in infos))),
                (self.series, "kv_virtual_bytes", float(sum(i.virtual_bytes for i in infos))),
                (self.series, "kv_pools", float(len(infos)))]

    def probes(self) -> list[Probe]:
        return [self]


def instances_table(group: str | None = None) -> Any:
    """kvcached instances (live ones, optionally of one group) as a DataFrame in MB, like `kvctl list`."""
    import pandas as pd

    from kvcached.budget import list_instances

    columns = ["name", "group", "pid", "used_mb", "reserved_mb", "floor_mb", "retained_mb", "limit_mb", "virtual_mb"]
    rows = [{"name": i.name, "group": i.group, "pid": i.pid, "used_mb": i.used_bytes / 1e6,
             "reserved_mb": i.reserved_bytes / 1e6, "floor_mb": i.floor_bytes / 1e6,
             "retained_mb": i.retained_bytes / 1e6, "limit_mb": i.effective_limit_bytes / 1e6,
             "virtual_mb": i.virtual_bytes / 1e6} for i in list_instances(group) if i.alive]
    return pd.DataFrame(rows, columns=columns)


def group_table(group: str | None = None) -> Any:
    """kvcached budget groups (or one): the cap and what the live members hold, in MB, like `kvctl list` shows
    under its instance rows."""
    import pandas as pd

    from kvcached.budget import list_groups

    rows = [{"group": g.name, "cap_mb": None if g.cap_bytes is None else g.cap_bytes / 1e6, "members": g.members,
             "used_mb": g.used_bytes / 1e6, "reserved_mb": g.reserved_bytes / 1e6, "limit_mb": g.limit_bytes / 1e6}
            for g in list_groups() if group is None or g.name == group]
    return pd.DataFrame(rows, columns=["group", "cap_mb", "members", "used_mb", "reserved_mb", "limit_mb"])


class PrefixStoreSource:
    """The bytes a kvcached prefix store holds (its record in the shm directory), at the sampler's rate."""

    def __init__(self, series: str, store: str, *, interval_s: float | None = 0.25) -> None:
        self.series = series
        self.store = store
        self.interval_s = interval_s

    def read(self) -> list[Reading]:
        from kvcached.budget import find_store

        try:
            info = find_store(self.store)
        except KeyError:
            return []
        out: list[Reading] = [(self.series, "store_bytes", float(info.used_bytes))]
        if info.limit_bytes is not None:
            out.append((self.series, "store_limit_bytes", float(info.limit_bytes)))
        return out

    def probes(self) -> list[Probe]:
        return [self]
