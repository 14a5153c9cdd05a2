"""kvlab run's runner: parameter parsing like papermill's -p, sweeps, the kvlab kernel, and the report of a
failing cell, on throwaway notebooks made in a temp dir (a kernel start costs about a second)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from notebook_testing import make_notebook

from kvlab.cli import main as kvlab_main
from kvlab.notebooks.runner import (
    ensure_kernel,
    parse_parameters,
    parse_value,
    run_notebook,
    summary_rich_table,
)
from kvlab.sweeps.grid import parse_sweeps


@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e3", 1000.0), ("true", True), ("False", False), ("null", None),
    ("cuda", "cuda"), (".cache/models/tiny-llama", ".cache/models/tiny-llama"), ("Qwen/Qwen2.5-0.5B-Instruct",
                                                                                 "Qwen/Qwen2.5-0.5B-Instruct"),
    ("", ""), ("[1, 2]", [1, 2]),
])
def test_parse_value_reads_yaml_scalars(text: str, expected: object) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_parameters_file_then_pairs_override(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("burst_size: 4\ndevice: cpu\nmodel: tiny\n")
    params = parse_parameters([("burst_size", "8"), ("idle_s", "2.5")], [f])
    assert params == {"burst_size": 8, "device": "cpu", "model": "tiny", "idle_s": 2.5}


def test_parameters_file_must_be_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        parse_parameters([], [f])
    with pytest.raises(FileNotFoundError, match="-f"):
        parse_parameters([], [tmp_path / "missing.yaml"])


def test_sweeps_make_a_grid() -> None:
    assert parse_sweeps([]) == [{}]
    grid = parse_sweeps(["a=1,2", "b=x,true"])
    assert grid == [{"a": 1, "b": "x"}, {"a": 1, "b": True}, {"a": 2, "b": "x"}, {"a": 2, "b": True}]
    for bad in (["a"], ["=1"], ["a="], ["a=1", "a=2"]):
        with pytest.raises(ValueError):
            parse_sweeps(bad)


def test_kernel_runs_this_interpreter_and_is_idempotent() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    name = ensure_kernel()
    spec_dir = KernelSpecManager().find_kernel_specs()[name]
    before = (Path(spec_dir) / "kernel.json").stat().st_mtime_ns
    assert ensure_kernel() == name
    assert (Path(spec_dir) / "kernel.json").stat().st_mtime_ns == before  # left alone the second time
    assert KernelSpecManager().get_kernel_spec(name).argv[0] == sys.executable


def test_run_injects_parameters_and_run_dir(tmp_path: Path) -> None:
    nb = make_notebook(tmp_path / "ok_nb.ipynb", ("code", "import json, pathlib\n"
                   "pathlib.Path(run_dir, 'seen.json').write_text(json.dumps({'x': x, 'run_dir': run_dir}))"))
    result = run_notebook(nb, {"x": 42}, root=tmp_path / "results", progress=False)
    assert result.ok, result.failure
    assert result.run_dir.parent == (tmp_path / "results" / "ok_nb").resolve()
    seen = json.loads((result.run_dir / "seen.json").read_text())
    assert seen == {"x": 42, "run_dir": str(result.run_dir)}
    executed = nbformat.read(str(result.executed), as_version=4)
    assert result.executed.parent == result.run_dir
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)


def test_failing_cell_is_reported_with_source_index_and_error(tmp_path: Path) -> None:
    nb = make_notebook(tmp_path / "bad_nb.ipynb", ("md", "prose"), ("code", "y = x + 1"),
                   ("code", "# the failing cell\nraise ValueError(f'boom {y}')\nprint('never')"),
                   ("code", "open('after', 'w')"))
    result = run_notebook(nb, {"x": 1}, root=tmp_path / "results", progress=False, cwd=tmp_path)
    assert not result.ok
    f = result.failure
    assert f is not None and f.cell_index == 3  # index in the source notebook: papermill's added cells not counted
    assert f.ename == "ValueError" and f.evalue == "boom 2"
    report = f.report()
    assert "cell 3 failed" in report and "# the failing cell" in report and "ValueError: boom 2" in report
    assert result.executed.exists()  # the traceback stays on disk with the run
    assert not (tmp_path / "after").exists()  # execution stopped at the failing cell


def test_cli_exit_codes_and_failure_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = make_notebook(tmp_path / "bad.ipynb", ("code", "1 / 0"))
    rc = kvlab_main(["run", str(bad), "--root", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cell 1 failed" in err and "ZeroDivisionError" in err and "1 / 0" in err
    assert kvlab_main(["run", str(tmp_path / "missing.ipynb")]) == 2
    assert kvlab_main(["run", str(bad), "--sweep", "nokey"]) == 2


def test_cli_sweep_runs_each_point_and_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The notebook writes a summary.json in kvlab.runs' shape; the runner prints it as a table.
    nb = make_notebook(tmp_path / "sw.ipynb", ("code", "from kvlab.runs import Run\n"
                   "run = Run('sw', {'x': x}, run_dir=run_dir)\n"
                   "run.finish({'static': {'idle_mem_mb': 100.0, 'peak_mem_mb': 150.0, 'requests_ok': x},\n"
                   "            'kvcached': {'idle_mem_mb': 20.0, 'peak_mem_mb': 140.0, 'requests_ok': x}})"))
    rc = kvlab_main(["run", str(nb), "--root", str(tmp_path / "r"), "--sweep", "x=3,5", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    runs = sorted((tmp_path / "r" / "sw").iterdir())
    assert len(runs) == 2
    assert sorted(json.loads((r / "params.json").read_text())["x"] for r in runs) == [3, 5]
    assert "kvcached" in out and "80" in out  # idle saving 80 % in the table
    assert summary_rich_table(tmp_path / "nowhere") is None


def test_failing_cell_marks_the_runs_summary_failed(tmp_path: Path) -> None:
    # The Run is created in one cell and finished in a later one; a cell failing in between must not leave a
    # summary.json that says "running" forever.
    nb = make_notebook(tmp_path / "dies.ipynb", ("code", "from kvlab.runs import Run\n"
                   "run = Run('dies', {'x': x}, run_dir=run_dir)"),
                   ("code", "raise RuntimeError('engine gone')"),
                   ("code", "run.finish({})"))
    result = run_notebook(nb, {"x": 1}, root=tmp_path / "results", progress=False, cwd=tmp_path)
    assert not result.ok
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "cell 2 failed" in summary["error"] and "RuntimeError: engine gone" in summary["error"]
    assert summary["experiment"] == "dies" and json.loads((result.run_dir / "params.json").read_text()) == {"x": 1}
    assert "engine gone" in (result.run_dir / "error.txt").read_text()


def test_a_summary_the_notebook_closed_is_left_alone(tmp_path: Path) -> None:
    # Run as a context manager already marks its own failure (with the real exception); the runner keeps it.
    nb = make_notebook(tmp_path / "closed.ipynb", ("code", "from kvlab.runs import Run\n"
                   "with Run('closed', {}, run_dir=run_dir) as run:\n"
                   "    raise KeyError('inner')"))
    result = run_notebook(nb, {}, root=tmp_path / "results", progress=False, cwd=tmp_path)
    assert not result.ok
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "KeyError: 'inner'"
    from kvlab.notebooks.runner import mark_run_failed

    assert mark_run_failed(result.run_dir, "other") is False
    assert mark_run_failed(tmp_path / "no-run-here", "other") is False
