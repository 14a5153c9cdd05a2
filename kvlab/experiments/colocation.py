"""Several models on one device: what notebook 02 runs, as calls into kvlab.

- `start_colocation`: engines side by side, kvcached ones in one budget group with a cap (the shared budget), or
  static ones each with its own fixed pool (a static partition).
- `alternating_bursts`: bursts that go to one model at a time, in turn, with memory sampled per model. With a
  short gap it shows memory moving between the models; with peaks larger than a static partition it shows what
  sharing buys: elastic engines lend idle memory to the busy one, static partitions make the peak queue.
Tables of kvcached's records are in `kvlab.probes.kvcached_records`; static-vs-elastic tables and bars in `kvlab.runs`.
"""
from __future__ import annotations

from typing import Any, Sequence

from kvlab.engines.colocation import Colocation
from kvlab.experiments.common import (
    GIB,
    alternating_offsets,
    gpu_share_args,
    resolve_device,
    series_names,
    wait_alive,
)
from kvlab.probes import HostTreeSource, KvcachedSource, NvmlSource, VllmMetricsSource
from kvlab.runs import Run


def start_colocation(run: Run, models: Sequence[str], *, kvcached: bool, kv_cache_gib: float | None,
                     group_limit_gib: float | None = None, names: Sequence[str] | None = None,
                     server_args: Sequence[str] = (), progress: bool = True, device: str = "auto") -> Colocation:
    """Start one engine per model (one after another) and return the running Colocation.

    On a GPU each engine gets an even share of vLLM's default memory utilization unless `server_args` sets one.

    kvcached=True: every engine gets a pool of `kv_cache_gib` (virtual: it costs nothing until used) in one
    budget group capped at `group_limit_gib`, set before the engines start so no engine ever runs uncapped.
    kvcached=False: every engine gets a static pool of `kv_cache_gib`, allocated at start-up."""
    from kvcached.budget import set_group_limit

    names = list(names or series_names(models))
    args = gpu_share_args(resolve_device(device), len(names), server_args)
    colo = Colocation([{"model": str(m), "name": n} for m, n in zip(models, names)], kvcached=kvcached,
                      kv_cache_gib=kv_cache_gib, args=args, log_dir=run.dir / "logs", progress=progress)
    if kvcached and group_limit_gib is not None:
        set_group_limit(colo.ipc_name, int(group_limit_gib * GIB), create=True)
    with run.phase("startup", series="+".join(names)):
        colo.start()
    for server in colo:
        run.note_engine(server)
    return colo


def stop_colocation(colo: Colocation) -> None:
    """Stop the engines and drop their group's cap: a capped group outlives its members on purpose (a cap may be
    set before engines start), so an experiment that set one removes it, and with it the group's files."""
    from kvcached.budget import list_groups, reap, set_group_limit

    colo.stop()
    if colo.kvcached and any(g.name == colo.ipc_name for g in list_groups()):
        set_group_limit(colo.ipc_name, None)
        reap()  # the records of the engines just stopped, and with them the uncapped, memberless group


def memory_sources(colo: Colocation, series: Sequence[str], device: str = "cpu") -> list[Any]:
    """Probes per engine, each under its series name: the process tree's host memory, vLLM's /metrics, the
    kvcached pool's reserved bytes (kvcached engines), and the engine's GPU memory from NVML (on cuda)."""
    sources: list[Any] = []
    for server, name in zip(colo, series):
        sources += [HostTreeSource(name, server, pss_interval_s=None), VllmMetricsSource(name, server.url)]
        if server.kvcached:
            sources.append(KvcachedSource(name, server=server))
    if device == "cuda":
        sources.append(NvmlSource(series="gpu", processes=dict(zip(series, colo))))
    return sources


def alternating_bursts(run: Run, colo: Colocation, *, series: Sequence[str], rounds: int, burst_size: int,
                       gap_s: float, prompt_tokens: int, max_tokens: int, idle_s: float = 2.0,
                       cooldown_s: float = 3.0, device: str = "cpu", seed: int = 0, interval_s: float = 0.02,
                       progress: bool = True) -> list[Any]:
    """Round-robin bursts over the engines of `colo` with memory sampled per engine; returns the records.

    Phases (per series): idle (before any request: the idle memory level), load, cooldown."""
    from kvlab.load.workload import Target, run_workload

    series = list(series)
    if len(series) != len(colo):
        raise ValueError(f"need one series name per engine: {len(colo)} engines, got {series}")
    with run.sampler(memory_sources(colo, series, device), interval_s=interval_s):
        for server in colo:  # one request each: the first request pays one-off costs (compilation, caches)
            server.complete("warm up", max_tokens=2)
        with run.phase_for_each("idle", series):
            wait_alive(idle_s, *colo)
        targets = [Target(url=s.url, model=s.model_name, series=name, prompts=prompt_tokens, max_tokens=max_tokens,
                          arrival=alternating_offsets(len(colo), i, rounds=rounds, burst_size=burst_size,
                                                      gap_s=gap_s))
                   for i, (s, name) in enumerate(zip(colo, series))]
        targets = [t for t in targets if list(t.arrival)]  # type: ignore[arg-type]
        with run.phase_for_each("load", series):
            records = run_workload(targets, None, seed=seed, on_record=run.record, progress=progress)
        with run.phase_for_each("cooldown", series):
            wait_alive(cooldown_s, *colo)
    return list(records)
