"""A series' memory figures from the timeline: the idle level (inside its idle phases), the peak and the flex."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from kvlab.probes import KV_RESERVED_BYTES, MEM_BYTES

MB = 1e6  # summaries speak decimal megabytes, like every plot axis here
IDLE_PHASES = ("idle",)  # phase names whose memory is the series' idle figure


def _as_dict(phase: Any) -> Mapping[str, Any]:
    return phase.to_dict() if hasattr(phase, "to_dict") else phase


def _metric_series(memory: Any, series: str, metric: str) -> Any:
    df = memory[(memory["series"] == series) & (memory["metric"] == metric)]
    return df.sort_values("t_s")


def memory_summary(memory: Any, series: str, phases: Sequence[Any] = (), *,
                   metric: str = MEM_BYTES) -> dict[str, Any]:
    """idle_mem_mb (median during this series' idle phases, else its first sample), peak_mem_mb (max over the
    run), flex_mb = peak - idle, and the same for kvcached's reserved bytes when recorded."""
    out: dict[str, Any] = {}
    for name, m in ((("idle_mem_mb", "peak_mem_mb", "flex_mb"), metric),
                    (("idle_kv_reserved_mb", "peak_kv_reserved_mb", "flex_kv_reserved_mb"), KV_RESERVED_BYTES)):
        df = _metric_series(memory, series, m)
        if df.empty:
            if m == metric:
                out.update({name[0]: None, name[1]: None, name[2]: None})
            continue
        idle = idle_values(df, series, phases)
        idle_v = float(idle.median()) if len(idle) else float(df["value"].iloc[0])
        peak_v = float(df["value"].max())
        out.update({name[0]: idle_v / MB, name[1]: peak_v / MB, name[2]: (peak_v - idle_v) / MB})
    return out


def idle_values(df: Any, series: str, phases: Sequence[Any]) -> Any:
    """Values of `df` (one series and metric) inside the idle phases of that series (or of no series)."""
    mask = None
    for p in phases:
        p = _as_dict(p)
        if p["name"] not in IDLE_PHASES or p.get("series") not in (None, series) or p.get("end_s") is None:
            continue
        inside = df["t_s"].between(p["start_s"], p["end_s"])
        mask = inside if mask is None else (mask | inside)
    return df["value"][mask] if mask is not None else df["value"].iloc[0:0]


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
