"""Runs side by side: one row per (run, series) with memory savings against a baseline series and latency."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from kvlab.runs.reading import RunData, load_run
from kvlab.runs.run import Run

COMPARE_COLUMNS = ["run", "series", "status", "idle_mem_mb", "peak_mem_mb", "flex_mb", "idle_savings_mb",
                   "idle_savings_pct", "peak_savings_mb", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                   "latency_p99_s", "output_tokens_per_s", "requests_ok", "requests_failed"]


def _summary_of(item: Run | RunData | Mapping[str, Any] | Path | str) -> tuple[str, dict[str, Any]]:
    if isinstance(item, Run):
        item = load_run(item)
    if isinstance(item, (str, Path)):
        item = load_run(item)
    if isinstance(item, RunData):
        return item.name, item.summary
    summary = dict(item)
    return f"{summary.get('experiment', '?')}/{summary.get('run_id', '?')}", summary


def compare(*runs: Run | RunData | Mapping[str, Any] | Path | str, baseline: str = "static") -> Any:
    """One row per (run, series): idle, peak, flex, savings against the baseline series and latency.

    The baseline is the series named `baseline` (default "static") if any run has one, else the first row.
    Savings are baseline minus this row: positive means this series holds less memory.
    """
    import pandas as pd

    rows = []
    for item in runs:
        name, summary = _summary_of(item)
        for series, figs in summary.get("series", {}).items():
            row = {"run": name, "series": series, "status": summary.get("status")}
            row.update({k: figs.get(k) for k in COMPARE_COLUMNS if k in figs})
            rows.append(row)
    df = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    if df.empty:
        return df
    base = df[df["series"] == baseline]
    base_row = base.iloc[0] if len(base) else df.iloc[0]
    for what in ("idle", "peak"):
        col = f"{what}_mem_mb"
        df[f"{what}_savings_mb"] = pd.to_numeric(base_row[col], errors="coerce") - pd.to_numeric(df[col],
                                                                                                  errors="coerce")
    df["idle_savings_pct"] = 100.0 * df["idle_savings_mb"] / pd.to_numeric(base_row["idle_mem_mb"], errors="coerce")
    return df


def summary_table(run: Run | RunData | Mapping[str, Any] | Path | str, baseline: str = "static") -> Any:
    """compare() of one run, indexed by series: the table a notebook shows."""
    return compare(run, baseline=baseline).drop(columns=["run"]).set_index("series")


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
