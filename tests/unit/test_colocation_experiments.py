"""What the colocation experiment uses, without engines: schedules, names, kvcached tables on real budget records,
and the per-mode comparison and figure."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvcached.budget import BudgetRecord, set_group_limit
from kvlab.experiments.common import alternating_offsets, gpu_share_args, series_names
from kvlab.probes.kvcached_records import group_table, instances_table
from kvlab.runs.compare import mode_comparison
from kvlab.runs.plots import mode_bars

MIB = 1 << 20


def test_alternating_offsets_send_each_round_to_one_model() -> None:
    a = alternating_offsets(2, 0, rounds=4, burst_size=3, gap_s=5.0)
    b = alternating_offsets(2, 1, rounds=4, burst_size=3, gap_s=5.0)
    assert a == [0.0] * 3 + [10.0] * 3 and b == [5.0] * 3 + [15.0] * 3
    assert alternating_offsets(3, 2, rounds=2, burst_size=1, gap_s=1.0) == []  # fewer rounds than models


def test_engines_on_one_gpu_split_vllms_memory_share_unless_one_is_given() -> None:
    """vLLM checks at start that its --gpu-memory-utilization share of the GPU is free (0.9 by default): the second
    of two engines with the default would refuse to start (vllm/v1/worker/utils.py:request_memory)."""
    assert gpu_share_args("cuda", 2, ["--max-model-len", "4096"]) == [
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.45"]
    assert gpu_share_args("cuda", 3, ["--gpu-memory-utilization=0.2"]) == ["--gpu-memory-utilization=0.2"]
    assert gpu_share_args("cuda", 1, []) == []
    assert gpu_share_args("cpu", 2, []) == []


def test_series_names_are_distinct() -> None:
    assert series_names([".cache/models/tiny-llama", "Qwen/Qwen2.5-0.5B-Instruct"]) == ["tiny-llama",
                                                                                       "Qwen2.5-0.5B-Instruct"]
    assert series_names(["m/x", "n/x/"]) == ["x-0", "x-1"]


def test_tables_read_the_shared_records(shm_dir) -> None:  # noqa: F811
    set_group_limit("colo-test", 96 * MIB, create=True)
    a = BudgetRecord.create(64 * MIB, name="model-a", group="colo-test")
    b = BudgetRecord.create(64 * MIB, name="model-b", group="colo-test")
    other = BudgetRecord.create(64 * MIB, name="elsewhere", group="other")
    try:
        assert a.try_reserve(32 * MIB)
        a.set_used(0, 0, reserved_pages=16)
        rows = instances_table("colo-test")
        assert len(rows) == 2 and sorted(rows["name"]) == sorted([a.name, b.name])
        assert rows["reserved_mb"].sum() == pytest.approx(32 * MIB / 1e6)
        assert set(rows["virtual_mb"]) == {64 * MIB / 1e6}
        g = group_table("colo-test")
        assert len(g) == 1 and g.loc[0, "cap_mb"] == pytest.approx(96 * MIB / 1e6) and g.loc[0, "members"] == 2
        assert len(instances_table()) == 3
    finally:
        for rec in (a, b, other):
            rec.close()


def _summary() -> dict:
    return {"series": {
        "m1": {"ttft_p99_s": 0.1},  # Part B series: not a mode, left out
        "static/m1": {"ttft_p99_s": 2.0, "requests_ok": 8}, "elastic/m1": {"ttft_p99_s": 0.5, "requests_ok": 8},
        "static/m2": {"ttft_p99_s": 1.5, "requests_ok": 8}, "elastic/m2": {"ttft_p99_s": None, "requests_ok": 8},
    }}


def test_mode_comparison_rows_per_model_columns_per_mode() -> None:
    df = mode_comparison(_summary(), keys=("ttft_p99_s", "requests_ok"))
    assert list(df.index) == ["m1", "m2"]
    assert df.loc["m1", ("ttft_p99_s", "static")] == 2.0 and df.loc["m1", ("ttft_p99_s", "elastic")] == 0.5
    assert df.loc["m2", ("requests_ok", "elastic")] == 8


def test_mode_bars_render_a_png(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    path = tmp_path / "bars.png"
    fig = mode_bars(_summary(), path=path)
    assert path.stat().st_size > 1000 and len(fig.axes[0].patches) == 4  # 2 models x 2 modes (None drawn as 0)
    plt.close(fig)


def test_vllm_peaks_from_the_memory_timeline() -> None:
    import pandas as pd

    from kvlab.runs.memory_figures import vllm_peaks

    memory = pd.DataFrame([(0.0, "static/m", "requests_running", 3.0), (1.0, "static/m", "requests_running", 21.0),
                           (1.0, "static/m", "kv_cache_usage", 1.0), (1.0, "elastic/m", "requests_running", 32.0)],
                          columns=["t_s", "series", "metric", "value"])
    assert vllm_peaks(memory, "static/m") == {"max_requests_running": 21.0, "max_requests_waiting": None,
                                              "max_kv_cache_usage": 1.0}
    assert vllm_peaks(memory, "elastic/m")["max_requests_running"] == 32.0
