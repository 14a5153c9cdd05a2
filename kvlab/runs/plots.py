"""Figures of a run: memory timeline, latency CDF, idle/peak bars, stacked per-model memory.

Each function takes the run's tidy data (DataFrames of memory.csv / requests.csv, summary dicts), draws on
the Agg backend when there is no display (servers, CI, papermill), saves a PNG when given a path, and returns
the Figure so a notebook shows it. Time axes are seconds since the run's t0 (the monotonic clock), so memory
and requests line up.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kvlab.probes import MEM_BYTES

MB = 1e6
_PHASE_COLORS = {"warmup": "#dddddd", "load": "#ffd8a8", "idle": "#d3f9d8", "burst": "#ffc9c9", "sleep": "#b197fc",
                 "asleep": "#e5dbff", "wake": "#96f2d7"}  # sleep phases: the router notebook (03)


def _pyplot() -> Any:
    import matplotlib

    # Without a display (a server, CI, papermill) pick Agg before pyplot is imported; inside Jupyter the
    # inline backend is already set and is left alone.
    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path | str | None) -> Any:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _phase_dicts(phases: Iterable[Any]) -> list[dict[str, Any]]:
    return [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in phases]


def memory_timeline(memory: Any, *, phases: Iterable[Any] = (), t0_s: float | None = None, metric: str = MEM_BYTES,
                    series: Sequence[str] | None = None, bursts_s: Sequence[float] = (), title: str | None = None,
                    align_to_phase: str | None = None, path: Path | str | None = None) -> Any:
    """One line per series of `metric` (MB) over seconds since t0, phases shaded, burst starts as ticks.

    `align_to_phase` (e.g. "idle"): for servers run one after another, put each series' own first phase of
    that name at t=0, so the runs overlay; the first series' phases are shaded and burst ticks are left out."""
    plt = _pyplot()
    df = memory[memory["metric"] == metric]
    if t0_s is None:
        t0_s = float(memory["t_s"].min()) if len(memory) else 0.0
    names = list(series) if series is not None else list(dict.fromkeys(df["series"]))
    phase_list = [p for p in _phase_dicts(phases) if p["name"] != "startup"]  # nothing is sampled then
    offsets = {name: t0_s for name in names}
    if align_to_phase is not None:
        for name in names:
            starts = [p["start_s"] for p in phase_list if p["name"] == align_to_phase and p.get("series") == name]
            if starts:
                offsets[name] = starts[0]
        first = names[0] if names else None
        phase_list = [dict(p, start_s=p["start_s"] - offsets[first] + t0_s, end_s=p["end_s"] - offsets[first] + t0_s)
                      for p in phase_list if p.get("series") == first and p.get("end_s") is not None]
        bursts_s = ()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    seen_labels: set[str] = set()
    for ph in phase_list:
        if ph.get("end_s") is None:
            continue
        label = ph["name"] if ph["name"] not in seen_labels else None
        seen_labels.add(ph["name"])
        ax.axvspan(ph["start_s"] - t0_s, ph["end_s"] - t0_s, color=_PHASE_COLORS.get(ph["name"], "#e7f5ff"),
                   alpha=0.5, lw=0, label=label)
    for name in names:
        s = df[df["series"] == name].sort_values("t_s")
        ax.plot(s["t_s"] - offsets[name], s["value"] / MB, label=name, lw=1.4)
    for i, t in enumerate(bursts_s):
        ax.axvline(t - t0_s, color="#c92a2a", lw=0.8, ls=":", label="burst" if i == 0 else None)
    ax.set_xlabel(f"seconds since the {align_to_phase} phase" if align_to_phase else "seconds since start")
    ax.set_ylabel(f"{metric.removesuffix('_bytes')} (MB)")
    ax.set_title(title or f"Memory over time ({metric.removesuffix('_bytes')}, MB)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def latency_cdf(requests: Any, *, metric: str = "ttft_s", series: Sequence[str] | None = None,
                title: str | None = None, path: Path | str | None = None) -> Any:
    """Empirical CDF of a latency column (seconds) per series, OK requests only."""
    import numpy as np

    plt = _pyplot()
    ok = requests[requests["status"] == "ok"] if "status" in requests else requests
    names = list(series) if series is not None else list(dict.fromkeys(ok["series"]))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in names:
        v = np.sort(ok.loc[ok["series"] == name, metric].dropna().to_numpy(dtype=float))
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{name} (n={len(v)})")
    label = {"ttft_s": "TTFT", "e2e_s": "end-to-end latency", "tpot_s": "TPOT"}.get(metric, metric)
    ax.set_xlabel(f"{label} (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"{label} CDF (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def idle_peak_bars(series_summaries: Mapping[str, Mapping[str, Any]], *, title: str | None = None,
                   path: Path | str | None = None) -> Any:
    """Idle and peak memory (MB) side by side per series, with the values written on the bars."""
    plt = _pyplot()
    names = [n for n, s in series_summaries.items() if s.get("idle_mem_mb") is not None]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4.5))
    width = 0.38
    for k, (key, label) in enumerate((("idle_mem_mb", "idle"), ("peak_mem_mb", "peak"))):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        vals = [float(series_summaries[n].get(key) or 0.0) for n in names]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("memory (MB)")
    ax.set_title(title or "Idle and peak memory per series (MB)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def stacked_memory(memory: Any, *, metric: str = MEM_BYTES, series: Sequence[str] | None = None,
                   t0_s: float | None = None, resample_s: float = 0.1, title: str | None = None,
                   path: Path | str | None = None) -> Any:
    """Per-model memory stacked over time (MB), for co-located engines sharing one machine.

    Series are sampled at different instants, so each is put on a common grid (last value held) first."""
    import numpy as np

    plt = _pyplot()
    df = memory[memory["metric"] == metric]
    names = list(series) if series is not None else list(dict.fromkeys(df["series"]))
    if t0_s is None:
        t0_s = float(df["t_s"].min()) if len(df) else 0.0
    fig, ax = plt.subplots(figsize=(10, 4.5))
    if len(df):
        grid = np.arange(float(df["t_s"].min()), float(df["t_s"].max()) + resample_s, resample_s)
        layers = []
        for name in names:
            s = df[df["series"] == name].sort_values("t_s")
            idx = np.searchsorted(s["t_s"].to_numpy(), grid, side="right") - 1
            vals = np.where(idx >= 0, s["value"].to_numpy()[np.clip(idx, 0, None)], 0.0) if len(s) else \
                np.zeros_like(grid)
            layers.append(vals / MB)
        ax.stackplot(grid - t0_s, *layers, labels=names, alpha=0.85)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"{metric.removesuffix('_bytes')} (MB)")
    ax.set_title(title or f"Memory per model, stacked ({metric.removesuffix('_bytes')}, MB)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_run_figures(run: Any, *, metric: str | None = None, bursts_s: Sequence[float] = ()) -> list[Path]:
    """Draw every figure a run's data allows into its directory; returns the PNG paths.

    `run` is a Run, a RunData or a run directory. The memory figures show `metric`, by default the one the run's
    summary names (`memory_metric`: each server's GPU memory on a GPU), else host memory."""
    from kvlab.runs.reading import load_run

    data = load_run(run)
    metric = metric or data.summary.get("memory_metric") or MEM_BYTES
    t0 = data.summary.get("t0_s")
    out: list[Path] = []
    plt = _pyplot()
    if len(data.memory):
        for name, kw in (("memory_timeline.png", {"metric": metric}),
                         ("kv_reserved_timeline.png", {"metric": "kv_reserved_bytes"})):
            if (data.memory["metric"] == kw["metric"]).any():
                plt.close(memory_timeline(data.memory, phases=data.phases, t0_s=t0, bursts_s=bursts_s,
                                          path=data.dir / name, **kw))
                out.append(data.dir / name)
        per_series_phases = {p.get("series") for p in data.phases if p["name"] == "idle"}
        if len(per_series_phases - {None}) > 1:  # servers run in turn: overlay them from their idle phase
            plt.close(memory_timeline(data.memory, phases=data.phases, t0_s=t0, metric=metric, align_to_phase="idle",
                                      path=data.dir / "memory_aligned.png"))
            out.append(data.dir / "memory_aligned.png")
        if data.memory[data.memory["metric"] == metric]["series"].nunique() > 1:
            plt.close(stacked_memory(data.memory, metric=metric, t0_s=t0, path=data.dir / "memory_stacked.png"))
            out.append(data.dir / "memory_stacked.png")
    if len(data.requests) and "ttft_s" in data.requests:
        plt.close(latency_cdf(data.requests, metric="ttft_s", path=data.dir / "ttft_cdf.png"))
        out.append(data.dir / "ttft_cdf.png")
        plt.close(latency_cdf(data.requests, metric="e2e_s", path=data.dir / "latency_cdf.png"))
        out.append(data.dir / "latency_cdf.png")
    if any(s.get("idle_mem_mb") is not None for s in data.series.values()):
        plt.close(idle_peak_bars(data.series, path=data.dir / "idle_peak.png"))
        out.append(data.dir / "idle_peak.png")
    return out


def mode_bars(summary: dict[str, Any], *, key: str = "ttft_p99_s", modes: Sequence[str] = ("static", "elastic"),
              title: str | None = None, path: Any = None) -> Any:
    """One group of bars per model, one bar per mode, for a latency figure (seconds)."""
    import pandas as pd

    from kvlab.runs.compare import mode_comparison

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


def ttft_per_document(requests: Any, *, series: Sequence[str] = ("A", "B", "B-cold", "A-again"),
                      title: str | None = None, path: Path | str | None = None) -> Any:
    """TTFT of each document's request, one line per series (the prefix-sharing experiment): B below B-cold is
    the prefill the store saved; A-again is the engine's own prefix cache, the floor."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in series:
        df = requests[(requests["series"] == name) & requests["ttft_s"].notna()].sort_values("scheduled_s")
        if len(df):
            ax.plot(range(1, len(df) + 1), df["ttft_s"] * 1e3, marker="o", label=name)
    ax.set_xlabel("document")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(title or "Time to first token per document: loaded from the store (B) vs computed (B-cold)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def save_prefix_figures(run: Any) -> list[Path]:
    """The prefix-sharing run's figures: TTFT per document, TTFT CDF, and the store's size over time."""
    from kvlab.runs.reading import load_run

    data = load_run(run)
    plt = _pyplot()
    out: list[Path] = []
    if len(data.requests) and "ttft_s" in data.requests:
        plt.close(ttft_per_document(data.requests, path=data.dir / "ttft_per_document.png"))
        plt.close(latency_cdf(data.requests, metric="ttft_s", path=data.dir / "ttft_cdf.png"))
        out += [data.dir / "ttft_per_document.png", data.dir / "ttft_cdf.png"]
    if len(data.memory) and (data.memory["metric"] == "store_bytes").any():
        plt.close(memory_timeline(data.memory, phases=data.phases, t0_s=data.summary.get("t0_s"),
                                  metric="store_bytes", title="Prefix store size (MB)",
                                  path=data.dir / "store_timeline.png"))
        out.append(data.dir / "store_timeline.png")
    if len(data.memory) and (data.memory["metric"] == MEM_BYTES).any():
        plt.close(memory_timeline(data.memory, phases=data.phases, t0_s=data.summary.get("t0_s"),
                                  path=data.dir / "memory_timeline.png"))
        out.append(data.dir / "memory_timeline.png")
    return out
