"""`kvlab bench sampler` end to end with a short duration: the result's shape, never its timings."""
from __future__ import annotations

import json

from kvlab.bench.sampler import measure
from kvlab.cli import main


def test_measure_reports_cpu_share_for_both_settings() -> None:
    result = measure(duration=0.3, rate=50.0)
    assert result["processes"] == 3
    for key in ("cheap", "cheap_plus_pss_1hz"):
        row = result[key]
        assert row["ticks"] > 0 and row["samples"] > 0
        assert row["cpu_pct_of_core"] == 100.0 * row["cpu_s"] / row["wall_s"]
    assert result["pass"] == (result["cheap"]["cpu_pct_of_core"] <= result["goal_cpu_pct"])


def test_cli_prints_json(capsys) -> None:
    assert main(["bench", "sampler", "--duration", "0.2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rate_hz"] == 100.0


def test_cli_rejects_bad_arguments(capsys) -> None:
    assert main(["bench", "sampler", "--duration", "0"]) == 2
    assert "--duration" in capsys.readouterr().err
