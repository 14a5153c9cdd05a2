"""Several models on one device: what notebook 02 runs, as calls into kvlab.

- `start_colocation`: engines side by side, kvcached ones in one budget group with a cap (the shared budget), or
  static ones each with its own fixed pool (a static partition).
- `alternating_bursts`: bursts that go to one model at a time, in turn, with memory sampled per model. With a
  short gap it shows memory moving between the models; with peaks larger than a static partition it shows what
  sharing buys: elastic engines lend idle memory to the busy one, static partitions make the peak queue.
- `instances_table`: kvcached's shared-memory records, as `kvctl list` shows them.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from kvlab.colocation import Colocation
from kvlab.memory import HostTreeSource, KvcachedSource, NvmlSource, VllmMetricsSource
from kvlab.results import MB, Run

GIB = 1 << 30


def short_name(model: str) -> str:
    """A series name for a model: the last path component ("Qwen2.5-0.5B-Instruct", "tiny-llama")."""
    return str(model).rstrip("/").rsplit("/", 1)[-1]


def series_names(models: Sequence[str]) -> list[str]:
    """Distinct series names for the models (the same model twice becomes name-0, name-1)."""
    names = [short_name(m) for m in models]
    if len(set(names)) == len(names):
        return names
    return [f"{n}-{i}" for i, n in enumerate(names)]


def start_colocation(run: Run, models: Sequence[str], *, kvcached: bool, kv_cache_gib: float | None,
                     group_limit_gib: float | None = None, names: Sequence[str] | None = None,
                     server_args: Sequence[str] = (), progress: bool = True) -> Colocation:
    """Start one engine per model (one after another) and return the running Colocation.

    kvcached=True: every engine gets a pool of `kv_cache_gib` (virtual: it costs nothing until used) in one
    budget group capped at `group_limit_gib`, set before the engines start so no engine ever runs uncapped.
    kvcached=False: every engine gets a static pool of `kv_cache_gib`, allocated at start-up."""
    from kvcached.budget import set_group_limit

    names = list(names or series_names(models))
    colo = Colocation([{"model": str(m), "name": n} for m, n in zip(models, names)], kvcached=kvcached,
                      kv_cache_gib=kv_cache_gib, args=list(server_args), log_dir=run.dir / "logs", progress=progress)
    if kvcached and group_limit_gib is not None:
        set_group_limit(colo.ipc_name, int(group_limit_gib * GIB), create=True)
    with run.phase("startup", series="+".join(names)):
        colo.start()
    return colo


def stop_colocation(colo: Colocation) -> None:
    """Stop the engines and drop their group's cap: a capped group outlives its members on purpose (a cap may be
    set before engines start), so an experiment that set one removes it, and with it the group's files."""
    from kvcached.budget import cleanup, list_groups, set_group_limit

    colo.stop()
    if colo.kvcached and any(g.name == colo.ipc_name for g in list_groups()):
        set_group_limit(colo.ipc_name, None)
        # Only records of the engines just stopped; the uncapped, memberless group goes with them.
        for server in colo:
            cleanup(prefix=server.name)


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


def alternating_offsets(n_models: int, index: int, *, rounds: int, burst_size: int, gap_s: float) -> list[float]:
    """Send times of model `index`: round r (every `gap_s` seconds) is a burst of `burst_size` requests to
    model r mod n."""
    return [r * gap_s for r in range(rounds) if r % n_models == index for _ in range(burst_size)]


def alternating_bursts(run: Run, colo: Colocation, *, series: Sequence[str], rounds: int, burst_size: int,
                       gap_s: float, prompt_tokens: int, max_tokens: int, idle_s: float = 2.0,
                       cooldown_s: float = 3.0, device: str = "cpu", seed: int = 0, interval_s: float = 0.02,
                       progress: bool = True) -> list[Any]:
    """Round-robin bursts over the engines of `colo` with memory sampled per engine; returns the records.

    Phases (per series): idle (before any request: the idle memory level), load, cooldown."""
    from kvlab.workload import Target, run_workload

    series = list(series)
    if len(series) != len(colo):
        raise ValueError(f"need one series name per engine: {len(colo)} engines, got {series}")
    with run.sampler(memory_sources(colo, series, device), interval_s=interval_s):
        for server in colo:  # one request each: the first request pays one-off costs (compilation, caches)
            server.complete("warm up", max_tokens=2)
        with run.phase_for_each("idle", series):
            _wait(idle_s, colo)
        targets = [Target(url=s.url, model=s.model_name, series=name, prompts=prompt_tokens, max_tokens=max_tokens,
                          arrival=alternating_offsets(len(colo), i, rounds=rounds, burst_size=burst_size,
                                                      gap_s=gap_s))
                   for i, (s, name) in enumerate(zip(colo, series))]
        targets = [t for t in targets if list(t.arrival)]  # type: ignore[arg-type]
        with run.phase_for_each("load", series):
            records = run_workload(targets, None, seed=seed, on_record=run.record, progress=progress)
        with run.phase_for_each("cooldown", series):
            _wait(cooldown_s, colo)
    return list(records)



def _wait(seconds: float, colo: Colocation) -> None:
    """Sleep, checking the engines every half second so a crash ends the experiment early with its log."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.5, left))
        for server in colo:
            server.check()


def instances_table(group: str | None = None) -> Any:
    """kvcached instances (live ones, optionally of one group) as a DataFrame in MB, like `kvctl list`."""
    import pandas as pd

    from kvcached.budget import list_instances

    rows = [{"name": i.name, "group": i.group, "pid": i.pid, "used_mb": i.used_bytes / MB,
             "reserved_mb": i.reserved_bytes / MB, "limit_mb": i.limit_bytes / MB,
             "virtual_mb": i.virtual_bytes / MB} for i in list_instances(group) if i.alive]
    return pd.DataFrame(rows, columns=["name", "group", "pid", "used_mb", "reserved_mb", "limit_mb", "virtual_mb"])


def group_table(group: str | None = None) -> Any:
    """kvcached budget groups (or one): the cap and what the live members hold, in MB, like `kvctl list` shows
    under its instance rows."""
    import pandas as pd

    from kvcached.budget import list_groups

    rows = [{"group": g.name, "cap_mb": None if g.cap_bytes is None else g.cap_bytes / MB, "members": g.members,
             "used_mb": g.used_bytes / MB, "reserved_mb": g.reserved_bytes / MB, "limit_mb": g.limit_bytes / MB}
            for g in list_groups() if group is None or g.name == group]
    return pd.DataFrame(rows, columns=["group", "cap_mb", "members", "used_mb", "reserved_mb", "limit_mb"])


VLLM_PEAK_METRICS = ("requests_running", "requests_waiting", "kv_cache_usage")


def vllm_peaks(memory: Any, series: str) -> dict[str, float | None]:
    """The most requests running and waiting, and the highest KV usage (a fraction of the engine's pool), that
    vLLM's /metrics reported for a series: a peak that fills a static partition shows as usage 1.0 with fewer
    requests running than were sent."""
    df = memory[memory["series"] == series]
    out: dict[str, float | None] = {}
    for metric in VLLM_PEAK_METRICS:
        values = df[df["metric"] == metric]["value"]
        out[f"max_{metric}"] = float(values.max()) if len(values) else None
    return out


def mode_comparison(summary: dict[str, Any], modes: Sequence[str] = ("static", "elastic"),
                    keys: Sequence[str] = ("ttft_p50_s", "ttft_p99_s", "latency_p99_s", "peak_mem_mb",
                                           "max_requests_running", "max_kv_cache_usage", "requests_ok",
                                           "requests_failed")) -> Any:
    """Rows per model, columns per (figure, mode), from series named "<mode>/<model>" in a run summary."""
    import pandas as pd

    rows: dict[str, dict[tuple[str, str], Any]] = {}
    for name, figs in summary.get("series", {}).items():
        mode, sep, model = name.partition("/")
        if sep and mode in modes:
            for k in keys:
                rows.setdefault(model, {})[(k, mode)] = figs.get(k)
    df = pd.DataFrame.from_dict(rows, orient="index")
    if not df.empty:
        df.columns = pd.MultiIndex.from_tuples(df.columns)
        df = df.reindex(columns=pd.MultiIndex.from_product([list(keys), list(modes)]))
    return df


def mode_bars(summary: dict[str, Any], *, key: str = "ttft_p99_s", modes: Sequence[str] = ("static", "elastic"),
              title: str | None = None, path: Any = None) -> Any:
    """One group of bars per model, one bar per mode, for a latency figure (seconds)."""
    import pandas as pd

    from kvlab.plots import _pyplot, _save  # the same backend choice and PNG saving as every kvlab figure

    plt = _pyplot()
    table = mode_comparison(summary, modes, keys=(key,))
    models = list(table.index)
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(models) + 2), 4.5))
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        vals = [0.0 if pd.isna(v := table.loc[m, (key, mode)]) else float(v) for m in models]
        bars = ax.bar([i + (k - (len(modes) - 1) / 2) * width for i in range(len(models))], vals, width, label=mode)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel(f"{key.removesuffix('_s')} (s)")
    ax.set_title(title or f"{key.removesuffix('_s').replace('_', ' ')} per model (s): static partitions vs elastic")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
