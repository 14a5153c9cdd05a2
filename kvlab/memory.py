"""Memory probes on the request clock: a background sampler and the sources it reads.

Every sample is `(t_s, series, metric, value)` with `t_s = time.monotonic()`, the same clock the workload stamps
requests with, so memory and latency line up without any conversion. Rows go to memory.csv as they come (tidy,
long format) and stay in memory for the caller.

Each source is a set of probes with their own rates: cheap figures (/proc/PID/status, shared-memory records,
NVML device counters) at the sampler's rate, expensive ones (PSS from smaps_rollup, per-process NVML, a
Prometheus scrape) at a low rate. Probes of one rate share a thread, so a 50 ms PSS read never stalls the
100 Hz figures.
"""
from __future__ import annotations

import csv
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence

# memory.csv columns, in order.
CSV_COLUMNS = ("t_s", "series", "metric", "value")

# Metric names other modules (results, plots, experiments) rely on.
MEM_BYTES = "mem_bytes"  # host memory the server tree holds: private anon + shared memory counted once
PSS_MEM_BYTES = "pss_mem_bytes"  # the same from PSS (Pss_Anon + Pss_Shmem), low rate: the reference figure
KV_RESERVED_BYTES = "kv_reserved_bytes"
GPU_USED_BYTES = "gpu_used_bytes"

Reading = tuple[str, str, float]  # (series, metric, value)


class Sample(NamedTuple):
    """One reading. A NamedTuple, not a dataclass: at 100 Hz its construction cost shows in the sampler's CPU."""

    t_s: float
    series: str
    metric: str
    value: float


class Probe(Protocol):
    """One thing read at one rate. `interval_s` None means the sampler's own interval."""

    interval_s: float | None

    def read(self) -> Iterable[Reading]: ...


class Source(Protocol):
    """What MemorySampler accepts: anything that hands out its probes."""

    def probes(self) -> Sequence[Probe]: ...


# ---- process trees --------------------------------------------------------------------------------------

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


# ---- kvcached shared-memory records ---------------------------------------------------------------------

class KvcachedSource:
    """used/reserved/limit bytes of kvcached pools, read from the shared-memory records (no engine involved).

    Pools are matched by `instance_prefix` (record name), by `group` (KVCACHED_IPC_NAME), or by `server`
    (records owned by a process of that server's tree). Live records only; several matches are summed.
    """

    def __init__(self, series: str, instance_prefix: str | None = None, *, group: str | None = None,
                 server: Any = None, interval_s: float | None = None) -> None:
        if instance_prefix is None and group is None and server is None:
            raise ValueError("KvcachedSource needs instance_prefix=, group= or server= to know which pools to read")
        self.series = series
        self.instance_prefix = instance_prefix
        self.group = group
        self.server = server
        self.interval_s = interval_s
        self._server_pids: set[int] = set()
        self._pids_at = float("-inf")

    def _matches(self, info: Any) -> bool:
        if not info.alive:
            return False
        if self.instance_prefix is not None and not info.name.startswith(self.instance_prefix):
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
                (self.series, "kv_limit_bytes", float(sum(i.limit_bytes for i in infos))),
                (self.series, "kv_virtual_bytes", float(sum(i.virtual_bytes for i in infos))),
                (self.series, "kv_pools", float(len(infos)))]

    def probes(self) -> list[Probe]:
        return [self]


# ---- vLLM's Prometheus endpoint -------------------------------------------------------------------------

# vLLM metric name -> our metric name. v1 calls KV usage kv_cache_usage_perc (a fraction despite the name);
# older releases called it gpu_cache_usage_perc.
_PROM_METRICS = {
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:num_requests_running": "requests_running",
    "vllm:num_requests_waiting": "requests_waiting",
}


def parse_prometheus(text: str, wanted: dict[str, str] = _PROM_METRICS) -> dict[str, float]:
    """Sum each wanted metric over its label sets, from Prometheus text exposition format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        ours = wanted.get(line[:name_end])
        if ours is None:
            continue
        # The value follows the labels (which may contain spaces inside quotes); an optional timestamp follows it.
        rest = line[line.rfind("}") + 1:] if "{" in line[:name_end + 1] else line[name_end:]
        fields = rest.split()
        if not fields:
            continue
        try:
            out[ours] = out.get(ours, 0.0) + float(fields[0])
        except ValueError:
            continue
    return out


class VllmMetricsSource:
    """KV cache usage and running/waiting requests scraped from a vLLM server's `/metrics` (~2 Hz).

    A scrape that fails (server starting or gone) gives no sample rather than stopping the sampler.
    """

    def __init__(self, series: str, url: str, *, interval_s: float = 0.5, timeout_s: float = 2.0) -> None:
        from kvlab.client import root_url

        self.series = series
        self.url = root_url(url) + "/metrics"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.errors = 0

    def read(self) -> list[Reading]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as resp:
                text = resp.read().decode(errors="replace")
        except OSError:
            self.errors += 1
            return []
        return [(self.series, k, v) for k, v in parse_prometheus(text).items()]

    def probes(self) -> list[Probe]:
        return [self]


# ---- NVML -----------------------------------------------------------------------------------------------

def visible_devices(nvml: Any, cuda_visible_devices: str | None) -> list[tuple[int, str]]:
    """(NVML index, UUID) of each CUDA device this process sees, in CUDA ordinal order.

    CUDA_VISIBLE_DEVICES holds indices or UUIDs (`GPU-...`, a unique prefix is enough); CUDA stops at the first
    entry that names no device, and so do we. Indices are NVML's (PCI bus order), which is CUDA's order when
    CUDA_DEVICE_ORDER=PCI_BUS_ID, as GPU servers usually set.
    """
    count = nvml.nvmlDeviceGetCount()
    all_devices = []
    for i in range(count):
        uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
        all_devices.append((i, uuid.decode() if isinstance(uuid, bytes) else uuid))
    if cuda_visible_devices is None:
        return all_devices
    out: list[tuple[int, str]] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry:
            break
        if entry.lstrip("-").isdigit():
            idx = int(entry)
            if not 0 <= idx < count:
                break
            match = [all_devices[idx]]
        else:
            match = [d for d in all_devices if d[1].startswith(entry)]
            if len(match) != 1:  # unknown or ambiguous prefix: CUDA treats it as invalid
                break
        if match[0] in out:  # a repeated device makes CUDA reject the list from there on
            break
        out.append(match[0])
    return out


class _NvmlProcessProbe:
    def __init__(self, owner: "NvmlSource", interval_s: float) -> None:
        self.owner = owner
        self.interval_s = interval_s

    def read(self) -> list[Reading]:
        return self.owner.read_processes()


class NvmlSource:
    """GPU memory from NVML: device used/total at the sampler's rate (NVML answers at 100 Hz), per-process use
    at <= 1 Hz. `device` is a CUDA ordinal among the visible devices (None: all of them). `processes` maps a
    series name to a PID or a server, so each server's GPU memory (its tree's processes) becomes its own series.

    Without NVML (no driver, no `nvidia-ml-py`) the source is `available == False` with the reason in
    `unavailable_reason`, and it gives no probes instead of failing.
    """

    def __init__(self, device: int | None = None, *, series: str = "gpu", processes: dict[str, Any] | None = None,
                 process_interval_s: float = 1.0, nvml: Any = None) -> None:
        self.series = series
        self.processes = dict(processes or {})
        self.process_interval_s = max(1.0, process_interval_s)
        self.unavailable_reason: str | None = None
        self._nvml = nvml
        self._devices: list[tuple[int, str]] = []
        self._handles: list[Any] = []
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            visible = visible_devices(self._nvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if device is not None:
                if not 0 <= device < len(visible):
                    raise ValueError(f"CUDA device {device} is not visible (visible: {len(visible)} devices)")
                visible = [visible[device]]
                self._ordinals = [device]
            else:
                self._ordinals = list(range(len(visible)))
            self._devices = visible
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i, _ in visible]
        except ImportError:
            self.unavailable_reason = "nvidia-ml-py is not installed: `pip install nvidia-ml-py`"
        except Exception as exc:  # pynvml raises NVMLError subclasses for "no driver", "no GPU", ...
            self.unavailable_reason = f"NVML unavailable ({exc}): no NVIDIA driver or GPU here"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    @property
    def devices(self) -> list[tuple[int, str]]:
        """(NVML index, UUID) of the devices read, in CUDA ordinal order."""
        return list(self._devices)

    def _series(self, ordinal: int) -> str:
        return self.series if len(self._handles) == 1 else f"{self.series}{ordinal}"

    def read(self) -> list[Reading]:
        out: list[Reading] = []
        for ordinal, handle in zip(self._ordinals, self._handles):
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append((self._series(ordinal), GPU_USED_BYTES, float(info.used)))
            out.append((self._series(ordinal), "gpu_total_bytes", float(info.total)))
        return out

    def read_processes(self) -> list[Reading]:
        used_by_pid: dict[int, int] = {}
        for handle in self._handles:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used_by_pid[proc.pid] = used_by_pid.get(proc.pid, 0) + int(proc.usedGpuMemory or 0)
        out: list[Reading] = []
        for series, target in self.processes.items():
            root = target if isinstance(target, int) else getattr(target, "pid", None)
            tree = process_tree(root) if root else []
            out.append((series, "gpu_process_bytes", float(sum(used_by_pid.get(p, 0) for p in tree))))
        return out

    def probes(self) -> list[Probe]:
        if not self.available:
            return []
        out: list[Probe] = [self]
        if self.processes:
            out.append(_NvmlProcessProbe(self, self.process_interval_s))
        return out

    interval_s = None  # device counters: the sampler's rate


# ---- the sampler ----------------------------------------------------------------------------------------

class MemorySampler:
    """Reads its sources' probes on background threads (one per rate) and keeps/writes every sample.

    >>> with MemorySampler([HostTreeSource("static", server)], out_csv=run_dir / "memory.csv") as sampler:
    ...     run_workload(...)
    >>> sampler.dataframe()
    """

    FLUSH_EVERY_S = 0.25  # memory.csv is flushed at least this often, so a crash loses at most this much

    def __init__(self, sources: Sequence[Source], interval_s: float = 0.01, out_csv: Path | str | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self.sources = list(sources)
        self.out_csv = Path(out_csv) if out_csv else None
        self._samples: list[Sample] = []
        self._write_lock = threading.Lock()
        self._file = None
        self._writer: Any = None
        self._last_flush = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._cpu_s: dict[str, float] = {}
        self._ticks: dict[float, int] = {}
        self.errors: list[str] = []
        groups: dict[float, list[Probe]] = {}
        for source in self.sources:
            for probe in source.probes():
                rate = probe.interval_s or interval_s
                groups.setdefault(rate, []).append(probe)
        self._groups = groups

    # ---- lifecycle
    def start(self) -> "MemorySampler":
        if self._threads:
            return self
        if self.out_csv:
            new = not self.out_csv.exists() or self.out_csv.stat().st_size == 0
            self.out_csv.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.out_csv, "a", newline="")
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(CSV_COLUMNS)
                self._file.flush()
        self._stop.clear()
        for rate, probes in sorted(self._groups.items()):
            t = threading.Thread(target=self._loop, args=(rate, probes), name=f"kvlab-sampler-{rate:g}s",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self) -> None:
        """Stop the threads, take one last sample of every probe (so the series end at the stop time), close."""
        if not self._threads:
            return
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        self.sample_now()
        with self._write_lock:
            if self._file:
                self._file.close()
                self._file = None
                self._writer = None

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- sampling
    def _take(self, probe: Probe, now: float) -> None:
        try:
            readings = list(probe.read())
        except Exception as exc:  # one broken probe must not end the others' timeline
            if len(self.errors) < 100:
                self.errors.append(f"{type(probe).__name__}: {exc!r}")
            return
        rows = [Sample(now, s, m, v) for s, m, v in readings]
        self._samples.extend(rows)
        with self._write_lock:
            if self._writer is not None:
                self._writer.writerows((r.t_s, r.series, r.metric, r.value) for r in rows)
                if now - self._last_flush >= self.FLUSH_EVERY_S:
                    self._file.flush()
                    self._last_flush = now

    def sample_now(self, include_slow: bool = True) -> None:
        """Read every probe once now (e.g. PSS at a phase boundary), from the calling thread."""
        for rate, probes in self._groups.items():
            if include_slow or rate <= self.interval_s:
                for probe in probes:
                    self._take(probe, time.monotonic())
        with self._write_lock:
            if self._file:
                self._file.flush()

    def _loop(self, rate: float, probes: list[Probe]) -> None:
        # Absolute schedule: tick k at start + k*rate; a slow tick skips the ticks it overran, never bunches up.
        start = time.monotonic()
        k = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for probe in probes:
                    self._take(probe, now)
                self._ticks[rate] = self._ticks.get(rate, 0) + 1
                k = max(k + 1, int((time.monotonic() - start) / rate) + 1)
                delay = max(0.0, start + k * rate - time.monotonic())
                # time.sleep wakes for half the CPU of Event.wait (no lock per wait), which matters at 100 Hz;
                # a fast thread then sees stop() within one tick. Slow probes wait on the event to stop at once.
                if rate < 0.1:
                    time.sleep(delay)
                else:
                    self._stop.wait(delay)
        finally:
            self._cpu_s[threading.current_thread().name] = time.thread_time()

    # ---- results
    def cpu_time_s(self) -> float:
        """CPU seconds the sampler threads have used (running threads are read through their CPU clocks)."""
        total = sum(self._cpu_s.values())
        for t in self._threads:
            if t.name in self._cpu_s or t.ident is None:
                continue
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, ProcessLookupError):
                continue
        return total

    def ticks(self) -> dict[float, int]:
        """Ticks done per rate (seconds between ticks -> count)."""
        return dict(self._ticks)

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def dataframe(self) -> Any:
        """The samples as a pandas DataFrame with columns t_s, series, metric, value."""
        import pandas as pd

        return pd.DataFrame([(s.t_s, s.series, s.metric, s.value) for s in self._samples], columns=list(CSV_COLUMNS))

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples())


def read_memory_csv(path: Path | str) -> Any:
    """memory.csv as a DataFrame (empty, with the columns, if the file has no rows)."""
    import pandas as pd

    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(CSV_COLUMNS))
    return pd.read_csv(path)
