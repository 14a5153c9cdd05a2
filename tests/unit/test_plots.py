"""Plots render to PNG files from hand-made run data and from a run directory."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from kvlab.probes import KV_RESERVED_BYTES, MEM_BYTES
from kvlab.runs import Run, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _memory() -> pd.DataFrame:
    rows = []
    for i in range(50):
        t = 100.0 + i * 0.1
        rows.append((t, "static", MEM_BYTES, 3.9e9))
        rows.append((t + 0.05, "kvcached", MEM_BYTES, 1.8e9 + (1e9 if 20 <= i < 30 else 0)))
        rows.append((t + 0.05, "kvcached", KV_RESERVED_BYTES, 1e9 if 20 <= i < 30 else 0))
    return pd.DataFrame(rows, columns=["t_s", "series", "metric", "value"])


def _requests() -> pd.DataFrame:
    return pd.DataFrame({"series": ["static"] * 3 + ["kvcached"] * 3, "status": ["ok"] * 5 + ["error"],
                         "ttft_s": [0.1, 0.2, 0.3, 0.1, 0.25, None], "e2e_s": [1, 1.2, 1.4, 1.1, 1.3, None]})


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_each_plot_returns_a_figure_and_writes_png(tmp_path: Path) -> None:
    mem = _memory()
    phases = [{"name": "idle", "start_s": 100.0, "end_s": 102.0}, {"name": "load", "start_s": 102.0, "end_s": 103.0}]
    figs = {
        "timeline.png": plots.memory_timeline(mem, phases=phases, t0_s=100.0, bursts_s=[102.0],
                                              path=tmp_path / "timeline.png"),
        "cdf.png": plots.latency_cdf(_requests(), path=tmp_path / "cdf.png"),
        "bars.png": plots.idle_peak_bars({"static": {"idle_mem_mb": 3900, "peak_mem_mb": 3950},
                                          "kvcached": {"idle_mem_mb": 1800, "peak_mem_mb": 2800}},
                                         path=tmp_path / "bars.png"),
        "stacked.png": plots.stacked_memory(mem, path=tmp_path / "stacked.png"),
    }
    for name, fig in figs.items():
        assert _is_png(tmp_path / name), name
        assert "MB" in fig.axes[0].get_ylabel() or fig.axes[0].get_ylabel() == "fraction of requests"
        assert fig.axes[0].get_title()
    timeline = figs["timeline.png"].axes[0]
    assert {line.get_label() for line in timeline.get_lines()} >= {"static", "kvcached", "burst"}
    assert timeline.get_xlim()[0] < 1.0  # seconds since t0, not raw monotonic time
    cdf_labels = [line.get_label() for line in figs["cdf.png"].axes[0].get_lines()]
    assert cdf_labels == ["static (n=3)", "kvcached (n=2)"]  # the failed request is left out


def test_save_run_figures_from_a_run_directory(tmp_path: Path) -> None:
    run = Run("plots", {}, root=tmp_path)
    _memory().to_csv(run.memory_csv, index=False)
    reqs = _requests()
    reqs.to_csv(run.requests_csv, index=False)
    run.finish({"static": {"idle_mem_mb": 3900.0, "peak_mem_mb": 3900.0},
                "kvcached": {"idle_mem_mb": 1800.0, "peak_mem_mb": 2800.0}})
    paths = plots.save_run_figures(run)
    assert {p.name for p in paths} == {"memory_timeline.png", "kv_reserved_timeline.png", "memory_stacked.png",
                                       "ttft_cdf.png", "latency_cdf.png", "idle_peak.png"}
    assert all(_is_png(p) for p in paths)


def test_aligned_timeline_overlays_servers_run_in_turn(tmp_path: Path) -> None:
    mem = pd.DataFrame({"t_s": [10.0, 11.0, 50.0, 51.0], "series": ["static", "static", "kvcached", "kvcached"],
                        "metric": MEM_BYTES, "value": [3.9e9, 3.9e9, 1.8e9, 2.0e9]})
    phases = [{"name": "idle", "start_s": 10.0, "end_s": 10.5, "series": "static"},
              {"name": "idle", "start_s": 50.0, "end_s": 50.5, "series": "kvcached"}]
    fig = plots.memory_timeline(mem, phases=phases, t0_s=0.0, align_to_phase="idle", path=tmp_path / "a.png")
    starts = {line.get_label(): line.get_xdata()[0] for line in fig.axes[0].get_lines()}
    assert starts == {"static": 0.0, "kvcached": 0.0}
    assert _is_png(tmp_path / "a.png")
