"""Sweeps: grids, run directories shipped back as archives (read as hostile input), `--on` and resource asks, and
whole sweeps on a local Ray cluster (two CPUs, started once for this module) with throwaway notebooks and
functions: runs gathered into one tree with an index, failures reported with their cell, a dead worker reported."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from notebook_testing import make_notebook

from kvlab.cli import main as kvlab_main
from kvlab.sweeps.archive import ArchiveError, pack_run_dir, unpack_run_dir
from kvlab.sweeps.backends import Resources, SweepError, parse_on, resources_for, run_device, task_runtime_env
from kvlab.sweeps.grid import MAX_POINTS, GridError, expand_grid, parse_sweeps

# ---- grids ----------------------------------------------------------------------------------------------------


def test_cli_grid_is_the_product_first_axis_slowest() -> None:
    assert parse_sweeps([]) == [{}]
    assert parse_sweeps(["a=1,2", "b=x,0.5"]) == [{"a": 1, "b": "x"}, {"a": 1, "b": 0.5}, {"a": 2, "b": "x"},
                                                  {"a": 2, "b": 0.5}]


@pytest.mark.parametrize("specs, match", [
    (["a"], "KEY=v1"), (["=1"], "KEY=v1"), (["a="], "KEY=v1"), (["a=1", "a=2"], "twice"),
    (["a b=1"], "identifier"), (["class=1"], "identifier"), (["run_dir=x"], "set by kvlab"),
    ([f"a={','.join(['1'] * 101)}", f"b={','.join(['1'] * 100)}"], "over"),
])
def test_cli_grid_refuses_what_papermill_could_not_inject(specs: list[str], match: str) -> None:
    with pytest.raises(GridError, match=match):
        parse_sweeps(specs)


def test_python_grid_fixes_scalars_and_takes_explicit_points() -> None:
    assert expand_grid({"a": [1, 2], "model": "m", "models": [["x", "y"]]}) == [
        {"a": 1, "model": "m", "models": ["x", "y"]}, {"a": 2, "model": "m", "models": ["x", "y"]}]
    assert expand_grid([{"a": 1}, {"a": 1, "b": 2}]) == [{"a": 1}, {"a": 1, "b": 2}]
    assert expand_grid(None) == [{}]
    assert len(expand_grid({"a": range(3)})) == 3
    import numpy as np

    assert expand_grid({"a": np.array([1, 2])}) == [{"a": 1}, {"a": 2}]
    assert type(expand_grid({"a": np.array([1])})[0]["a"]) is int  # papermill writes Python literals
    assert expand_grid({"a": (x for x in "xy"), "d": {"k": 1}}) == [{"a": "x", "d": {"k": 1}}, {"a": "y", "d": {"k": 1}}]
    for bad, match in (({"a": {1, 2}}, "a set"), ({"a": []}, "no values"), ([], "no points"), ("a=1", "mapping"), ([1], "not a dict"),
                       ({"1a": [1]}, "identifier"), ({"a": list(range(MAX_POINTS + 1))}, "over")):
        with pytest.raises(GridError, match=match):
            expand_grid(bad)


# ---- archives -------------------------------------------------------------------------------------------------


def test_run_directory_round_trips_without_links(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "reuse").mkdir(parents=True)
    (run / "summary.json").write_text('{"status": "ok"}')
    (run / "reuse" / "memory.csv").write_bytes(bytes(range(256)) * 100)
    (run / "link").symlink_to("/etc/passwd")
    dest = unpack_run_dir(pack_run_dir(run), tmp_path / "back" / "run")
    assert (dest / "summary.json").read_text() == '{"status": "ok"}'
    assert (dest / "reuse" / "memory.csv").read_bytes() == bytes(range(256)) * 100
    assert not (dest / "link").exists() and not (dest / "link").is_symlink()
    with pytest.raises(FileExistsError, match="never overwrites"):
        unpack_run_dir(pack_run_dir(run), dest)
    (tmp_path / "back" / "empty").mkdir()  # even an empty directory of that name is someone else's
    with pytest.raises(FileExistsError, match="never overwrites"):
        unpack_run_dir(pack_run_dir(run), tmp_path / "back" / "empty")


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("data, match", [
    (_tar((_info("../escape"), b"x")), "outside"),
    (_tar((_info("/abs"), b"x")), "outside"),
    (_tar((_info("a/../../b"), b"x")), "outside"),
    (_tar((_info("ln", tarfile.SYMTYPE, "/etc/passwd"), None)), "not a regular file"),
    (_tar((_info("hard", tarfile.LNKTYPE, "summary.json"), None)), "not a regular file"),
    (_tar((_info("dev", tarfile.CHRTYPE), None)), "not a regular file"),
    (_tar((_info("twice"), b"a"), (_info("twice"), b"b")), "not a whole"),
    (_tar((_info("f"), b"a"), (_info("f/g"), b"b")), "not a whole"),
    (b"not a tar at all", "not a whole"),
    (pack_run_dir.__doc__.encode()[:10], "not a whole"),
], ids=["parent", "absolute", "dotdot", "symlink", "hardlink", "device", "twice", "file-then-dir", "not-tar",
        "truncated"])  # names, not the bytes: gzip stamps the time in them, and xdist workers must agree on test ids
def test_hostile_archives_are_refused_and_leave_nothing(tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(ArchiveError, match=match):
        unpack_run_dir(data, tmp_path / "exp" / "run")
    assert list((tmp_path / "exp").iterdir()) == []  # no run, and no half-unpacked staging folder
    assert not (tmp_path / "escape").exists()


def test_truncated_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "big").write_bytes(os.urandom(200_000))
    data = pack_run_dir(tmp_path / "run")
    with pytest.raises(ArchiveError):
        unpack_run_dir(data[: len(data) // 2], tmp_path / "exp" / "run")
    assert list((tmp_path / "exp").iterdir()) == []


# ---- where and with what -----------------------------------------------------------------------------------------


def test_on_names_local_ray_or_a_client_address() -> None:
    assert parse_on(None) is None and parse_on("local") is None
    assert parse_on("ray") == "ray" and parse_on("ray://head.example:10001") == "ray://head.example:10001"
    assert parse_on("ray://[::1]:10001") == "ray://[::1]:10001"
    for bad in ("Ray", "ray://", "ray://host", "ray://host:0", "ray://host:70000", "ray://a b:1", "slurm",
                "ray://host:1/extra"):
        with pytest.raises(SweepError, match="--on wants"):
            parse_on(bad)


def test_a_run_asks_for_a_gpu_or_for_cpu_and_memory() -> None:
    assert run_device({"device": "cuda"}, cluster_has_gpu=False) == "cuda"
    assert run_device({"device": "auto"}, cluster_has_gpu=True) == "cuda"
    assert run_device({}, cluster_has_gpu=False) == "cpu"
    gpu = resources_for("cuda")
    assert (gpu.num_gpus, gpu.num_cpus, gpu.memory) == (1.0, 1.0, 0)
    cpu = resources_for("cpu", memory=2 << 30)
    assert (cpu.num_gpus, cpu.num_cpus, cpu.memory) == (0.0, 1.0, 2 << 30)
    assert Resources(num_gpus=1).fits({"GPU": 8.0, "CPU": 64.0, "memory": 1e12})
    assert not Resources(num_gpus=1).fits({"CPU": 64.0, "memory": 1e12})
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(SweepError, match="finite"):
            resources_for("cpu", cpus=bad)


def test_a_cpu_run_computes_unpinned_on_the_cpus_it_asked_for() -> None:
    # vLLM-CPU would pin every engine of the node to the same cores; a CPU run gets as many threads as CPUs asked.
    assert task_runtime_env(Resources(num_cpus=4), None, environ={}) == {
        "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "4"}}
    assert task_runtime_env(Resources(num_cpus=0.5), None, environ={})["env_vars"]["OMP_NUM_THREADS"] == "1"
    # What the caller set wins: its runtime_env, or its own environment (then nothing is added for that name).
    given = {"pip": ["x"], "env_vars": {"OMP_NUM_THREADS": "8"}}
    assert task_runtime_env(Resources(num_cpus=2), given, environ={}) == {
        "pip": ["x"], "env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "8"}}
    assert given == {"pip": ["x"], "env_vars": {"OMP_NUM_THREADS": "8"}}, "the caller's dict is not changed"
    mine = {"VLLM_CPU_OMP_THREADS_BIND": "0-3", "OMP_NUM_THREADS": "4"}
    assert task_runtime_env(Resources(num_cpus=2), None, environ=mine) is None
    # A GPU run computes on its GPU: its runtime_env is the caller's alone.
    assert task_runtime_env(Resources(num_gpus=1), None, environ={}) is None
    assert task_runtime_env(Resources(num_gpus=1), given, environ={}) == given


def test_cli_refuses_bad_sweep_options_before_anything_runs(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    nb = make_notebook(tmp_path / "nb.ipynb", ("code", "print(x)"))
    root = tmp_path / "r"
    cases = [
        (["--on", "slurm"], "--on wants"),
        (["--shared-root", str(tmp_path)], "add --on ray"),
        (["--cpus-per-run", "nan"], "finite"),
        (["--memory-per-run", "lots"], "memory-per-run"),
        (["-p", "a b", "1"], "identifier"),
        (["-p", "run_dir", "/etc"], "set by kvlab"),
        (["--sweep", "typo=1,2", "--on", "ray"], "has no parameter 'typo'"),
    ]
    broken = tmp_path / "broken.ipynb"
    broken.write_text("{not json")
    assert kvlab_main(["run", str(broken), "--on", "ray", "--root", str(root)]) == 2
    assert "not a readable notebook" in capsys.readouterr().err
    for extra, match in cases:
        with pytest.raises(SystemExit) if extra[0].endswith("-per-run") else contextlib.nullcontext():
            rc = kvlab_main(["run", str(nb), "--root", str(root), "--no-progress", *extra])
            assert rc == 2, extra
        assert match in capsys.readouterr().err, extra
    assert not root.exists()  # nothing ran


def test_on_ray_without_ray_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    nb = make_notebook(tmp_path / "nb.ipynb", ("code", "print(x)"))
    assert kvlab_main(["run", str(nb), "--on", "ray", "--root", str(tmp_path / "r")]) == 2
    assert "pip install 'kvlab[ray]'" in capsys.readouterr().err


def test_a_workers_answer_never_names_another_place_in_the_tree(tmp_path: Path) -> None:
    from kvlab.sweeps.backends import _as_submitted
    from kvlab.sweeps.work import PointResult, SweepJob

    job = SweepJob(index=3, experiment="exp", run_id="rid", params={"x": 1}, shared_root=str(tmp_path))
    answer = PointResult(index=0, experiment="../..", run_id="../../etc", params={}, ok=True, run_dir="/etc")
    result = _as_submitted(answer, job)
    assert (result.index, result.experiment, result.run_id, result.params) == (3, "exp", "rid", {"x": 1})
    assert result.run_dir == str(tmp_path / "exp" / "rid")


def test_an_interrupted_sweep_still_writes_its_index(tmp_path: Path) -> None:
    import kvlab

    def experiment(run_dir: str, x: int) -> None:
        if x == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second run
        Path(run_dir, "done").write_text("1")

    with pytest.raises(KeyboardInterrupt):
        kvlab.sweep(experiment, {"x": [1, 2, 3]}, root=tmp_path, progress=False)
    index = json.loads(next((tmp_path / "sweeps").glob("*/sweep.json")).read_text())
    assert [r["ok"] for r in index["runs"]] == [True, False, False]
    assert all("cancelled before it finished" in r["error"] for r in index["runs"][1:])


# ---- whole sweeps on a local Ray cluster ----------------------------------------------------------------------

RECORDING_CELLS = (
    ("code", "import os, socket\nfrom kvlab.runs import Run\nrun = Run('toy', {'x': x}, run_dir=run_dir)"),
    ("code", "if fail:\n    raise ValueError(f'x={x} is not allowed')"),
    ("code", "run.finish({'static': {'idle_mem_mb': 100.0 * x, 'requests_ok': 1},\n"
             "            'kvcached': {'idle_mem_mb': 10.0 * x, 'requests_ok': 1}})"),
)


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    ray = pytest.importorskip("ray", reason="Ray is the optional extra kvlab[ray]; `make test` installs it")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    yield ray
    ray.shutdown()


def test_notebook_sweep_on_a_ray_cluster_of_its_own_gathers_every_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # First of the Ray tests, before the module's cluster exists: `--on ray` starts a local cluster itself.
    ray = pytest.importorskip("ray", reason="Ray is the optional extra kvlab[ray]; `make test` installs it")
    assert not ray.is_initialized()
    nb = make_notebook(tmp_path / "toy.ipynb", *RECORDING_CELLS, parameters="x = 1\nfail = False\nrun_dir = None")
    root = tmp_path / "results"
    rc = kvlab_main(["run", str(nb), "--sweep", "x=1,2,3", "-p", "fail", "false", "--on", "ray",
                     "--root", str(root), "--memory-per-run", "100M", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    runs = sorted((root / "toy").iterdir())
    assert len(runs) == 3
    assert sorted(json.loads((r / "params.json").read_text())["x"] for r in runs) == [1, 2, 3]
    for r in runs:  # each run directory came back whole, executed notebook included
        assert {"params.json", "env.json", "summary.json", "toy.ipynb"} <= {p.name for p in r.iterdir()}
    index = json.loads(next((root / "sweeps").glob("*/sweep.json")).read_text())
    assert index["on"] == "ray" and [r["params"]["x"] for r in index["runs"]] == [1, 2, 3]
    assert all(r["ok"] and r["node"] and Path(r["run_dir"]).is_dir() for r in index["runs"])
    table = pd.read_csv(next((root / "sweeps").glob("*/summary.csv")))
    assert len(table) == 6 and set(table["series"]) == {"static", "kvcached"}
    kvc = table[table["series"] == "kvcached"].sort_values("x")
    assert list(kvc["idle_savings_pct"].round()) == [90.0, 90.0, 90.0]
    assert not ray.is_initialized()  # the cluster it started is gone with the sweep


def test_notebook_sweep_on_ray_reports_the_failing_cell(tmp_path: Path, ray_cluster: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    nb = make_notebook(tmp_path / "toy.ipynb", *RECORDING_CELLS, parameters="x = 1\nfail = False\nrun_dir = None")
    root2 = tmp_path / "results2"
    rc = kvlab_main(["run", str(nb), "--sweep", "fail=false,true", "-p", "x", "7", "--on", "ray",
                     "--root", str(root2), "--memory-per-run", "100M", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cell 2 failed" in err and "ValueError: x=7 is not allowed" in err and "1 of 2 run(s) failed" in err
    failed = [r for r in (root2 / "toy").iterdir() if json.loads((r / "summary.json").read_text())["status"] != "ok"]
    assert len(failed) == 1 and (failed[0] / "toy.ipynb").exists()  # the traceback came back with the run
    index = json.loads(next((root2 / "sweeps").glob("*/sweep.json")).read_text())
    bad = [r for r in index["runs"] if not r["ok"]]
    assert bad[0]["failure"]["cell_index"] == 2 and bad[0]["failure"]["ename"] == "ValueError"


def test_function_sweep_on_ray_returns_a_table_and_survives_a_dead_worker(tmp_path: Path, ray_cluster: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import kvlab

    for name in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def experiment(run_dir: str, x: int, die: bool = False) -> None:
        from kvlab.runs import Run

        if die:
            os._exit(3)  # the worker process dies mid-run, as an OOM kill would end it
        with Run("fn", {"x": x}, run_dir=run_dir) as run:
            run.finish({"static": {"idle_mem_mb": 50.0, "requests_ok": x}})

    table = kvlab.sweep(experiment, [{"x": 1}, {"x": 2, "die": True}, {"x": 3}], on="ray", root=tmp_path,
                        memory_per_run=100 << 20, progress=False)
    rows = table.sort_values("x")
    assert list(rows["ok"]) == [True, False, True]
    dead = rows[rows["x"] == 2].iloc[0]
    assert "did not finish" in dead["error"] and pd.isna(dead["run_dir"])
    assert list(rows[rows["ok"]]["requests_ok"]) == [1, 3]
    gathered = [d for d in rows["run_dir"].dropna()]
    assert len(kvlab.compare(*gathered)) == 2
    for d in gathered:  # each CPU run computed unpinned, on the one CPU it asked for (env.json is the worker's)
        env = json.loads((Path(d) / "env.json").read_text())["env"]
        assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["OMP_NUM_THREADS"]) == ("nobind", "1"), env
    assert (Path(table.attrs["sweep_dir"]) / "sweep.json").is_file()


def test_shared_root_keeps_runs_where_workers_wrote_them(tmp_path: Path, ray_cluster: Any) -> None:
    import kvlab

    def experiment(run_dir: str, x: int) -> None:
        Path(run_dir, "written_by.txt").write_text(str(os.getpid()))

    shared = tmp_path / "shared"
    table = kvlab.sweep(experiment, {"x": [1, 2]}, on="ray", root=tmp_path / "local", shared_root=shared,
                        memory_per_run=100 << 20, progress=False)
    assert all(Path(d).parent.parent == shared.resolve() for d in table["run_dir"])
    assert {int(Path(d, "written_by.txt").read_text()) for d in table["run_dir"]} != {os.getpid()}
    assert not (tmp_path / "local" / "experiment").exists()  # nothing shipped: the index alone is local
    assert (Path(table.attrs["sweep_dir"]) / "summary.csv").is_file()


def test_a_run_no_node_can_host_is_refused_before_submitting(tmp_path: Path, ray_cluster: Any) -> None:
    import kvlab

    with pytest.raises(SweepError, match="no node of the cluster can give a run 1 GPU"):
        kvlab.sweep(lambda run_dir, x: None, {"x": [1], "device": "cuda"}, on="ray", root=tmp_path, progress=False)
    with pytest.raises(SweepError, match="64 CPU"):
        kvlab.sweep(lambda run_dir, x: None, {"x": [1]}, on="ray", root=tmp_path, cpus_per_run=64, progress=False)
    assert not (tmp_path / "sweeps").exists()
