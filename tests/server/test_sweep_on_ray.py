"""Notebook 01 in a 2-point sweep on a local Ray cluster (the one `kvlab run --on ray` starts): with and without
its reuse phase, both runs at once on this node. Each run directory comes back into one results tree, whole and
comparable; the two runs' engines held different ports, budget groups and kvcached records while they ran side by
side; and the run with the reuse phase makes notebook 01's own points (this is notebook 01's server test too: one
run pays for both, where two would be the CI's longest test twice)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvlab
from kvlab.cli import main as kvlab_main

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]
POOL_GIB = 0.5
RUN_FILES = {"params.json", "env.json", "requests.csv", "memory.csv", "summary.json", "01_elastic_vs_static.ipynb",
             "memory_timeline.png", "ttft_cdf.png", "idle_peak.png"}
CONTRACT_KEYS = ("idle_mem_mb", "peak_mem_mb", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s",
                 "requests_ok", "requests_failed")


# Seven engine starts (two for each run's static and kvcached series, three for the reuse phase's modes), two
# notebook kernels and a Ray cluster on a 2-core machine, beside another test file's engines: more than the tier's
# 15 minutes per test, which stays the guard against a hang everywhere else.
@pytest.mark.timeout(1800)
def test_notebook01_sweep_on_local_ray(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray", reason="Ray is the optional extra kvlab[ray]; `make test` installs it")
    monkeypatch.chdir(REPO)
    root = tmp_path / "results"
    rc = kvlab_main(["run", "notebooks/01_elastic_vs_static.ipynb", "--on", "ray", "--root", str(root),
                     "--sweep", "reuse=true,false", "-p", "device", "cpu", "-p", "model", str(tiny_model_dir),
                     "-p", "kv_cache_gib", str(POOL_GIB), "-p", "burst_size", "8", "-p", "burst_every", "4",
                     "-p", "num_bursts", "2", "-p", "prompt_tokens", "128", "-p", "max_tokens", "16",
                     "-p", "idle_s", "2", "-p", "reuse_requests", "4", "-p", "reuse_prompt_tokens", "384",
                     "--cpus-per-run", "1", "--memory-per-run", "2G", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]

    index = json.loads(next((root / "sweeps").glob("*/sweep.json")).read_text())
    runs = index["runs"]
    assert [r["params"]["reuse"] for r in runs] == [True, False] and all(r["ok"] for r in runs), runs
    # Both ran at once on this node (two CPUs and the memory for both; one CPU and 2 GiB asked per run).
    with_reuse, without = runs
    assert with_reuse["node"] == without["node"]
    overlap = min(with_reuse["finished_s"], without["finished_s"]) - max(with_reuse["started_s"], without["started_s"])
    assert overlap > 0.5 * without["elapsed_s"], runs

    dirs = [Path(r["run_dir"]) for r in runs]
    for d in dirs:
        assert d.parent == (root / "01_elastic_vs_static").resolve()
        assert RUN_FILES <= {p.name for p in d.iterdir()}, RUN_FILES - {p.name for p in d.iterdir()}
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "ok", summary.get("error")
        for series in ("static", "kvcached"):
            figs = summary["series"][series]
            assert all(figs.get(k) is not None for k in CONTRACT_KEYS), (series, figs)
            assert figs["requests_ok"] > 0 and figs["requests_failed"] == 0, series

    # No collisions: every engine of both runs held its own port, group and kvcached record.
    engines = [e for d in dirs for e in json.loads((d / "params.json").read_text())["engines"].values()]
    assert len({e["url"] for e in engines}) == len(engines) >= 4, engines
    kvc = [e for e in engines if e["kvcached"]]
    assert len({e["kvcached_group"] for e in kvc}) == len({e["kvcached_record"] for e in kvc}) == len(kvc) >= 2, kvc

    # Comparable: one table over both runs; in each, the kvcached server idles well below the static one (the
    # point of notebook 01: idle, it does not hold the pool the static one does).
    table = kvlab.compare(*dirs)
    assert len(table) == 4 and set(table["series"]) == {"static", "kvcached"}
    pool_mb = POOL_GIB * (1 << 30) / 1e6
    for d in dirs:
        rows = table[table["run"].str.endswith(d.name)].set_index("series")
        assert rows.loc["kvcached", "idle_mem_mb"] < rows.loc["static", "idle_mem_mb"] - 0.5 * pool_mb, rows
    assert json.loads((dirs[0] / "params.json").read_text())["burst_size"] == 8
    assert "sweep of 2 run(s) on ray" in out.err

    # Notebook 01's reuse phase: with nobody short of memory, kvcached's prefix hits are static's (vLLM's counters);
    # without retention there are none, and nothing is retained. The run without the phase wrote none.
    reuse = json.loads((dirs[0] / "reuse" / "summary.json").read_text())
    assert reuse["status"] == "ok", reuse.get("error")
    hits = {mode: f["prefix_hit_rate"] for mode, f in reuse["workloads"]["reuse"].items()}
    assert hits["static"] >= 0.5 and hits["kvcached"] == hits["static"], hits
    assert hits["kvcached, no retention"] == 0, hits
    retained = {mode: f["idle_retained_bytes"] for mode, f in reuse["workloads"]["reuse"].items()}
    assert retained["kvcached"] > 0 and retained["kvcached, no retention"] == 0, retained
    assert not (dirs[1] / "reuse").exists()
