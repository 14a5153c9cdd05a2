"""A 2-point sweep of notebook 01 on a local Ray cluster (the one `kvlab run --on ray` starts), both runs at once on
this node: each run directory comes back into one results tree, whole and comparable, and the two runs' engines
held different ports, budget groups and kvcached records while they ran side by side."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import kvlab
from kvlab.cli import main as kvlab_main

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]


def test_two_point_sweep_of_notebook01_on_local_ray(tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray", reason="Ray is the optional extra kvlab[ray]; `make test` installs it")
    monkeypatch.chdir(REPO)
    root = tmp_path / "results"
    rc = kvlab_main(["run", "notebooks/01_elastic_vs_static.ipynb", "--on", "ray", "--root", str(root),
                     "--sweep", "burst_size=4,6", "-p", "device", "cpu", "-p", "model", str(tiny_model_dir),
                     "-p", "kv_cache_gib", "0.25", "-p", "num_bursts", "1", "-p", "burst_every", "2",
                     "-p", "prompt_tokens", "64", "-p", "max_tokens", "8", "-p", "idle_s", "1",
                     "-p", "reuse", "false", "--cpus-per-run", "1", "--memory-per-run", "2G", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]

    index = json.loads(next((root / "sweeps").glob("*/sweep.json")).read_text())
    runs = index["runs"]
    assert [r["params"]["burst_size"] for r in runs] == [4, 6] and all(r["ok"] for r in runs), runs
    # Both ran at once on this node (two CPUs and the memory for both; one CPU and 2 GiB asked per run).
    (a, b) = runs
    assert a["node"] == b["node"]
    overlap = min(a["finished_s"], b["finished_s"]) - max(a["started_s"], b["started_s"])
    assert overlap > 0.5 * min(a["elapsed_s"], b["elapsed_s"]), (a, b)

    dirs = [Path(r["run_dir"]) for r in runs]
    for d in dirs:
        assert d.parent == (root / "01_elastic_vs_static").resolve()
        assert {"params.json", "env.json", "requests.csv", "memory.csv", "summary.json",
                "01_elastic_vs_static.ipynb"} <= {p.name for p in d.iterdir()}
        assert json.loads((d / "summary.json").read_text())["status"] == "ok"

    # No collisions: every engine of both runs held its own port, group and kvcached record.
    engines = [e for d in dirs for e in json.loads((d / "params.json").read_text())["engines"].values()]
    assert len(engines) == 4
    urls = [e["url"] for e in engines]
    assert len(set(urls)) == 4, urls
    kvc = [e for e in engines if e["kvcached"]]
    assert len(kvc) == 2 and len({e["kvcached_group"] for e in kvc}) == 2 and len({e["kvcached_record"]
                                                                                  for e in kvc}) == 2, kvc

    # Comparable: one table over both runs, and each run's kvcached server idles below its static one.
    table = kvlab.compare(*dirs)
    assert len(table) == 4 and set(table["series"]) == {"static", "kvcached"}
    for d in dirs:
        rows = table[table["run"].str.endswith(d.name)].set_index("series")
        assert rows.loc["kvcached", "idle_mem_mb"] < rows.loc["static", "idle_mem_mb"], rows
    assert "sweep of 2 run(s) on ray" in out.err
