"""Host memory of a process tree from /proc: cheap per-process figures at 100 Hz, PSS at a low rate, and the
committed bytes of shared-memory files the tree holds open (kvcached's host pool)."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable

from kvlab.probes.protocol import MEM_BYTES, PSS_MEM_BYTES, Probe, Reading


def _children(pid: int) -> list[int]:
    """Direct children of `pid` from /proc/PID/task/TID/children (children hang off the thread that forked)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (empty if `root` is gone)."""
    if not os.path.exists(f"/proc/{root}"):
        return []
    if not os.path.exists(f"/proc/{root}/task/{root}/children"):  # kernel without CONFIG_PROC_CHILDREN
        import psutil

        try:
            proc = psutil.Process(root)
            return [root] + [p.pid for p in proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


_STATUS_KEYS = ((b"\nRssAnon:", "anon"), (b"\nRssFile:", "file"), (b"\nRssShmem:", "shmem"), (b"\nVmSwap:", "swap"))


def read_status(pid: int) -> dict[str, int] | None:
    """RssAnon/RssFile/RssShmem/VmSwap of one process in bytes from /proc/PID/status (~0.03 ms); None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return parse_status(f.read())
    except (FileNotFoundError, ProcessLookupError):
        return None


class StatusReader:
    """read_status through /proc/PID/status descriptors kept open between samples.

    At 100 Hz, the path lookup of open() is most of the cost of a read (about 2/3 on a cold cache); a kept
    descriptor also stays bound to the process it was opened for, so a reused PID is never read by mistake
    (reading a dead process's descriptor fails, and we drop it).
    """

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def __call__(self, pid: int) -> dict[str, int] | None:
        fd = self._fds.get(pid)
        if fd is None:
            try:
                fd = self._fds[pid] = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                return None
        try:
            data = os.pread(fd, 8192, 0)
        except (ProcessLookupError, OSError):
            data = b""
        if not data:
            self.forget(pid)
            return None
        return parse_status(data)

    def forget(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def keep_only(self, pids: Iterable[int]) -> None:
        for pid in set(self._fds) - set(pids):
            self.forget(pid)

    def close(self) -> None:
        self.keep_only(())

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def parse_status(data: bytes) -> dict[str, int] | None:
    out = {}
    # Direct finds instead of splitting ~55 lines: this runs per process at 100 Hz.
    for key, name in _STATUS_KEYS:
        at = data.find(key)
        if at >= 0:
            start = at + len(key)
            out[name] = int(data[start:data.index(b"k", start)]) * 1024
    return out if out else None  # kernel threads and zombies have no Rss lines


_ROLLUP_KEYS = {b"Pss:": "pss", b"Pss_Anon:": "pss_anon", b"Pss_File:": "pss_file", b"Pss_Shmem:": "pss_shmem",
                b"Rss:": "rss"}


def read_pss(pid: int) -> dict[str, int] | None:
    """Pss, Pss_Anon, Pss_File, Pss_Shmem, Rss of one process in bytes from /proc/PID/smaps_rollup (slow)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in data.splitlines():
        parts = line.split()
        if parts and parts[0] in _ROLLUP_KEYS:
            out[_ROLLUP_KEYS[parts[0]]] = int(parts[1]) * 1024
    return out or None


def tree_memory(pids: Iterable[int], read: Callable[[int], dict[str, int] | None] = read_status) -> dict[str, int]:
    """The cheap figures of a process tree, shared memory counted once.

    Shared memory (a memfd/tmpfs KV pool mapped by vLLM's scheduler and worker, /dev/shm queues) shows up in
    RssShmem of every process that maps it, so summing would count kvcached's pool twice. We take the largest
    RssShmem instead of the sum: in a vLLM tree the big shared segment is one pool that the processes mapping
    it all see, so its union is its largest view, while the other segments (message queues) are a few MB.
    That is exact for the pool and at worst a few MB low; PSS (split proportionally) is the reference and
    `pss_mem_bytes` records it at a low rate. RssFile (libraries, mostly shared with the whole machine) is
    reported apart and kept out of `mem_bytes`, because it is not memory the server's KV cache moves.
    """
    anon = file_ = shmem_max = shmem_sum = swap = 0
    alive = 0
    for pid in pids:
        st = read(pid)
        if st is None:
            continue
        alive += 1
        anon += st.get("anon", 0)
        file_ += st.get("file", 0)
        swap += st.get("swap", 0)
        shmem = st.get("shmem", 0)
        shmem_sum += shmem
        shmem_max = max(shmem_max, shmem)
    return {MEM_BYTES: anon + shmem_max, "rss_anon_bytes": anon, "rss_shmem_bytes": shmem_max,
            "rss_shmem_sum_bytes": shmem_sum, "rss_file_bytes": file_, "swap_bytes": swap, "processes": alive}


def tree_pss(pids: Iterable[int]) -> dict[str, int]:
    """PSS figures of a process tree; PSS splits each shared page among its mappers, so sums are exact."""
    tot = {"pss_bytes": 0, PSS_MEM_BYTES: 0, "pss_file_bytes": 0}
    for pid in pids:
        r = read_pss(pid)
        if r is None:
            continue
        tot["pss_bytes"] += r.get("pss", 0)
        tot[PSS_MEM_BYTES] += r.get("pss_anon", 0) + r.get("pss_shmem", 0)
        tot["pss_file_bytes"] += r.get("pss_file", 0)
    return tot


class SharedFiles:
    """Bytes committed in shared-memory files a process tree holds open, each file counted once.

    kvcached's host pool is a tmpfs file: the scheduler commits pages with fallocate and the worker maps them
    when it uses them, so pages committed but not yet touched (the warm reserve, blocks about to be written) hold
    memory that no process's RSS shows. The file's allocated blocks are the kernel's own count of it. The file is
    unlinked once both processes hold it, so it is found through /proc/PID/fd; the links are re-read every
    `rescan_s` seconds and the few matching files are stat'ed at every sample.
    """

    def __init__(self, rescan_s: float = 1.0) -> None:
        self.rescan_s = rescan_s
        self._links: list[str] = []
        self._scanned_at = float("-inf")

    def _scan(self, pids: Iterable[int]) -> None:
        links = []
        for pid in pids:
            fd_dir = f"/proc/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                link = f"{fd_dir}/{fd}"
                try:
                    target = os.readlink(link)
                except OSError:
                    continue
                if target.startswith(("/dev/shm/", "/memfd:")):
                    links.append(link)
        self._links = links
        self._scanned_at = time.monotonic()

    def committed_bytes(self, pids: Iterable[int]) -> int:
        if time.monotonic() - self._scanned_at >= self.rescan_s:
            self._scan(pids)
        seen: set[tuple[int, int]] = set()
        total = 0
        for link in self._links:
            try:
                st = os.stat(link)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
        return total


class _TreeProbe:
    def __init__(self, owner: "HostTreeSource", interval_s: float | None, read: Callable[[list[int]], dict]) -> None:
        self.owner = owner
        self.interval_s = interval_s
        self._read = read

    def read(self) -> list[Reading]:
        pids = self.owner.pids()
        if not pids:
            return []
        return [(self.owner.series, k, float(v)) for k, v in self._read(pids).items()]


class HostTreeSource:
    """Host memory of a server's process tree: cheap /proc/PID/status figures at the sampler's rate, PSS at
    `pss_interval_s` (None: never; PSS costs ~17 ms per vLLM process).

    `target` is a PID (the tree under it, itself included) or an object with `.pid` (a VLLMServer: the tree
    under its API server, leaving out kvlab's launcher). The tree is re-walked every `refresh_s` seconds, so
    workers that start late are picked up.
    """

    def __init__(self, series: str, target: int | Any, *, pss_interval_s: float | None = 1.0,
                 refresh_s: float = 1.0) -> None:
        self.series = series
        self.target = target
        self.pss_interval_s = pss_interval_s
        self.refresh_s = refresh_s
        self._pids: list[int] = []
        self._walked_at = float("-inf")
        self._lock = threading.Lock()
        self._status = StatusReader()
        self._shared_files = SharedFiles(rescan_s=refresh_s)

    def root_pid(self) -> int | None:
        return self.target if isinstance(self.target, int) else getattr(self.target, "pid", None)

    def pids(self) -> list[int]:
        with self._lock:
            now = time.monotonic()
            if now - self._walked_at >= self.refresh_s or not self._pids:
                root = self.root_pid()
                self._pids = process_tree(root) if root else []
                self._walked_at = now
            return list(self._pids)

    def _tree_memory(self, pids: list[int]) -> dict[str, int]:
        self._status.keep_only(pids)
        figures = tree_memory(pids, self._status)
        # Shared memory is what the tree maps, or what its shared files hold, whichever is larger (see SharedFiles).
        shm_files = self._shared_files.committed_bytes(pids)
        figures["shm_file_bytes"] = shm_files
        if shm_files > figures["rss_shmem_bytes"]:
            figures[MEM_BYTES] = figures["rss_anon_bytes"] + shm_files
        return figures

    def probes(self) -> list[Probe]:
        out: list[Probe] = [_TreeProbe(self, None, self._tree_memory)]
        if self.pss_interval_s is not None:
            out.append(_TreeProbe(self, self.pss_interval_s, tree_pss))
        return out
