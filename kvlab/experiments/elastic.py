"""Elastic vs static: the lab's headline experiment, servers + workload + probes + run directory in one call.

`elastic_vs_static` runs the same model and the same bursty traffic on a static server and
then on a kvcached server (one at a time: on a small machine two servers fight for the cores and each looks
slower), with memory sampled on the request clock, everything written to one run directory.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from kvlab.experiments.common import resolve_device, wait_alive
from kvlab.probes import (
    KV_FLOOR_BYTES,
    KV_RESERVED_BYTES,
    KV_RETAINED_BYTES,
    MEM_BYTES,
    HostTreeSource,
    KvcachedSource,
    NvmlSource,
    VllmMetricsSource,
    server_memory_metric,
)
from kvlab.runs import MB, Run, idle_values

SERIES = ("static", "kvcached")
DEFAULT_SETTLE_MARGIN_MB = 32.0  # "back to idle": within this much of the idle level (allocator noise)


def decode_tokens_per_s(records: Sequence[Any]) -> float | None:
    """Aggregate decode speed: tokens after the first, over the time when at least one request was decoding.

    Bursty traffic leaves the server idle between bursts; dividing by the union of decode intervals (first
    token to end) measures how fast the engine decodes, not how long the schedule was."""
    spans = sorted((r.first_token_s, r.end_s) for r in records
                   if r.ok and r.first_token_s is not None and r.end_s is not None and r.end_s > r.first_token_s)
    tokens = sum((r.output_tokens or 1) - 1 for r in records if r.ok and r.first_token_s is not None)
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        busy += cur_end - cur_start
    return tokens / busy if busy > 0 and tokens > 0 else None


def burst_decode_tokens_per_s(records: Sequence[Any]) -> list[float]:
    """decode_tokens_per_s of each burst (requests scheduled at the same instant), in time order.

    On a shared machine a neighbour's few seconds of work can stall one burst; the per-burst figures show it,
    and their median is the speed a typical burst saw."""
    groups: dict[float, list[Any]] = {}
    for r in records:
        groups.setdefault(round(r.scheduled_s, 3), []).append(r)
    out = [decode_tokens_per_s(recs) for _, recs in sorted(groups.items())]
    return [v for v in out if v is not None]


def time_back_to_idle(memory: Any, series: str, metric: str, after_s: float, idle_level: float,
                      margin: float) -> float | None:
    """Seconds from `after_s` until `metric` of `series` is within `margin` of `idle_level` and stays there
    for the rest of the samples; 0 if it never left; None if it never came back."""
    df = memory[(memory["series"] == series) & (memory["metric"] == metric) & (memory["t_s"] >= after_s)]
    df = df.sort_values("t_s")
    if df.empty:
        return None
    above = df["value"] > idle_level + margin
    if not above.any():
        return 0.0
    last_above = df["t_s"][above].iloc[-1]
    later = df[df["t_s"] > last_above]
    if later.empty:
        return None
    return float(later["t_s"].iloc[0] - after_s)


def _phase_idle(memory: Any, series: str, metric: str, phases: Sequence[Any]) -> float | None:
    df = memory[(memory["series"] == series) & (memory["metric"] == metric)]
    values = idle_values(df, series, phases)
    return float(values.median()) if len(values) else None


def _last_value(memory: Any, series: str, metric: str) -> float | None:
    df = memory[(memory["series"] == series) & (memory["metric"] == metric)].sort_values("t_s")
    return float(df["value"].iloc[-1]) if len(df) else None


def elastic_vs_static(model: str, *, device: str = "auto", kv_cache_gib: float = 1.0, bursts: int = 3,
                      burst_size: int = 16, burst_every: float = 10.0, prompt_tokens: int = 256,
                      max_tokens: int = 64, idle_s: float = 5.0, cooldown_s: float | None = None,
                      root: Path | str = "results", experiment: str = "elastic_vs_static",
                      series: Sequence[str] = SERIES, interval_s: float = 0.01, pss_interval_s: float | None = 1.0,
                      settle_margin_mb: float = DEFAULT_SETTLE_MARGIN_MB, seed: int = 0, progress: bool = True,
                      server_args: Sequence[str] = (), figures: bool = True, interleave: bool = False,
                      run_dir: Path | str | None = None) -> Run:
    """Run the bursty workload on a static and a kvcached server; return the finished Run.

    Per server: start, one warm-up burst (not recorded), `idle_s` of idle (the idle level), the bursts, then
    `cooldown_s` (default: max(idle_s, 5)) of idle to watch memory come back. By default the servers run one
    after the other. With `interleave=True` both are up at once and their bursts alternate (the kvcached
    burst half-way between two static ones, on one clock): when other work on the machine comes and goes,
    both servers meet it alike, so their speed ratio stays fair; only one server decodes at a time as long as
    a burst takes less than burst_every / 2.

    summary.json gets per series the contract figures plus decode_tokens_per_s, back_to_idle_s (memory
    probes, from the end of the series' last request), kv_back_to_idle_s and idle_kv_share (kvcached records:
    reserved bytes while idle / pool bytes).
    """
    from kvlab.engines.server import VLLMServer

    unknown = set(series) - set(SERIES)
    if unknown:
        raise ValueError(f"series must be among {SERIES}, got {sorted(unknown)}")
    device = resolve_device(device)
    cooldown_s = max(idle_s, 5.0) if cooldown_s is None else cooldown_s
    params = dict(model=str(model), device=device, kv_cache_gib=kv_cache_gib, bursts=bursts, burst_size=burst_size,
                  burst_every=burst_every, prompt_tokens=prompt_tokens, max_tokens=max_tokens, idle_s=idle_s,
                  cooldown_s=cooldown_s, series=list(series), interval_s=interval_s, pss_interval_s=pss_interval_s,
                  settle_margin_mb=settle_margin_mb, seed=seed, server_args=list(server_args),
                  interleave=interleave)
    run = Run(experiment, params, root=root, run_dir=run_dir)
    bursts_s: list[float] = []
    extra: dict[str, dict[str, Any]] = {}
    shape = dict(prompt_tokens=prompt_tokens, max_tokens=max_tokens, seed=seed)  # of every request sent

    def make(name: str) -> VLLMServer:
        return VLLMServer(str(model), kvcached=(name == "kvcached"), kv_cache_gib=kv_cache_gib, args=server_args,
                          log_dir=run.dir / "logs", name=name, progress=progress)

    def sources(name: str, server: VLLMServer) -> list[Any]:
        out: list[Any] = [HostTreeSource(name, server, pss_interval_s=pss_interval_s),
                          VllmMetricsSource(name, server.url)]
        if name == "kvcached":
            out.append(KvcachedSource(name, server=server))
        if device == "cuda":
            out.append(NvmlSource(series=f"{name}-gpu", processes={name: server}))
        return out

    with run:
        servers: dict[str, VLLMServer] = {}
        try:
            if interleave:
                for name in series:
                    servers[name] = make(name)
                    with run.phase("startup", series=name):
                        servers[name].start()
                    run.note_engine(servers[name])
                with run.sampler([src for n in series for src in sources(n, servers[n])], interval_s=interval_s):
                    for name in series:
                        with run.phase("warmup", series=name):
                            _warm_up(servers[name], name, burst_size=burst_size, **shape)
                    with run.phase("idle"):
                        wait_alive(idle_s, *servers.values())
                    offsets = {name: [k * burst_every + i * burst_every / len(series) for k in range(bursts)
                                      for _ in range(burst_size)] for i, name in enumerate(series)}
                    with run.phase("load"):
                        records = _load(run, servers, offsets, progress=progress, **shape)
                    bursts_s = sorted({records.t0_s + o for offs in offsets.values() for o in offs})
                    with run.phase("cooldown"):
                        wait_alive(cooldown_s, *servers.values())
                for name in series:
                    extra[name] = {"last_request_end_s": _last_end(records, name),
                                   "startup_s": servers[name].startup_s}
            else:
                for name in series:
                    server = servers[name] = make(name)
                    with run.phase("startup", series=name):
                        server.start()
                    run.note_engine(server)
                    with run.sampler(sources(name, server), interval_s=interval_s):
                        with run.phase("warmup", series=name):
                            _warm_up(server, name, burst_size=burst_size, **shape)
                        with run.phase("idle", series=name):
                            wait_alive(idle_s, server)
                        offsets = {name: [k * burst_every for k in range(bursts) for _ in range(burst_size)]}
                        with run.phase("load", series=name):
                            records = _load(run, {name: server}, offsets, progress=progress, **shape)
                        bursts_s.extend(records.t0_s + k * burst_every for k in range(bursts))
                        with run.phase("cooldown", series=name):
                            wait_alive(cooldown_s, server)
                    extra[name] = {"last_request_end_s": _last_end(records, name), "startup_s": server.startup_s}
                    server.stop()
        finally:
            for server in servers.values():
                server.stop()
        # On a GPU the memory that matters is the device's: each server's NVML per-process use. Host memory stays
        # in memory.csv (mem_bytes) for both.
        metric, _ = server_memory_metric(device)
        run.finish(_summaries(run, series, extra, settle_margin_mb * MB, metric), bursts_s=bursts_s,
                   interleave=interleave, memory_metric=metric)
    if figures:
        from kvlab.runs.plots import save_run_figures

        save_run_figures(run, bursts_s=bursts_s)
    return run


def _warm_up(server: Any, name: str, *, burst_size: int, prompt_tokens: int, max_tokens: int, seed: int) -> None:
    """One burst of the load's shape with other prompts (no prefix-cache hits later), not recorded. The
    engine's buffers that grow with the batch once and stay (allocator arenas, workspaces) grow here, so the
    idle level is the steady state and back-to-idle measures what the KV cache gives back."""
    from kvlab.load.workload import Target, run_workload

    warm = Target(url=server.url, model=server.model_name, arrival=[0.0] * burst_size, prompts=prompt_tokens,
                  max_tokens=max_tokens, series=name)
    run_workload(warm, None, seed=seed + 1000, progress=False)
    server.check()


def _load(run: Run, servers: dict[str, Any], offsets: dict[str, list[float]], *, prompt_tokens: int,
          max_tokens: int, seed: int, progress: bool) -> Any:
    """The recorded bursts: every server its offsets, all on one clock."""
    from kvlab.load.workload import Target, run_workload

    targets = [Target(url=s.url, model=s.model_name, arrival=offsets[name], prompts=prompt_tokens,
                      max_tokens=max_tokens, series=name) for name, s in servers.items()]
    records = run_workload(targets, None, seed=seed, on_record=run.record, progress=progress)
    for server in servers.values():
        server.check()
    return records


def _last_end(records: Sequence[Any], series: str) -> float | None:
    return max((r.end_s for r in records if r.series == series and r.end_s is not None), default=None)


def _worse(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _summaries(run: Run, series: Sequence[str], extra: dict[str, dict[str, Any]],
               margin: float, metric: str = MEM_BYTES) -> dict[str, dict[str, Any]]:
    memory = run.memory()
    out: dict[str, dict[str, Any]] = {}
    for name in series:
        recs = [r for r in run.records if r.series == name]
        s = run.series_summary(name, metric=metric)
        s.update(extra.get(name, {}))
        s["decode_tokens_per_s"] = decode_tokens_per_s(recs)
        per_burst = burst_decode_tokens_per_s(recs)
        s["burst_decode_tokens_per_s"] = per_burst
        s["burst_decode_tokens_per_s_median"] = float(statistics.median(per_burst)) if per_burst else None
        last_end = s.get("last_request_end_s")
        idle = _phase_idle(memory, name, metric, run.phases)
        s["back_to_idle_s"] = (time_back_to_idle(memory, name, metric, last_end, idle, margin)
                               if last_end is not None and idle is not None else None)
        s["settle_margin_mb"] = margin / MB
        s["after_cooldown_mem_mb"] = (v / MB) if (v := _last_value(memory, name, metric)) is not None else None
        kv_idle = _phase_idle(memory, name, KV_RESERVED_BYTES, run.phases)
        pool = _last_value(memory, name, "kv_virtual_bytes")
        if kv_idle is not None and pool:
            after = _last_value(memory, name, KV_RESERVED_BYTES)
            s["pool_bytes"] = pool
            s["idle_kv_reserved_bytes"] = kv_idle
            s["after_cooldown_kv_reserved_bytes"] = after
            # Idle share: the worse of before the load and after the cooldown (memory must come back).
            s["idle_kv_share"] = max(kv_idle, after or 0.0) / pool
            # ...in two figures: the floor the engine keeps, and the prefix cache it retains for repeated prompts
            # until the memory is wanted (kvcached publishes both; a static pool has neither).
            floor = _worse(_phase_idle(memory, name, KV_FLOOR_BYTES, run.phases),
                           _last_value(memory, name, KV_FLOOR_BYTES))
            retained = _worse(_phase_idle(memory, name, KV_RETAINED_BYTES, run.phases),
                              _last_value(memory, name, KV_RETAINED_BYTES))
            s["idle_kv_floor_bytes"] = floor
            s["idle_kv_retained_bytes"] = retained
            s["idle_kv_floor_share"] = floor / pool if floor is not None else None
            s["kv_back_to_idle_s"] = (time_back_to_idle(memory, name, KV_RESERVED_BYTES, last_end, kv_idle, 0.0)
                                      if last_end is not None else None)
        out[name] = s
    return out
