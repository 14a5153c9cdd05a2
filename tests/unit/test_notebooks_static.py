"""The committed notebooks and the GPU workflow, read as files: valid, parameterised, stripped, Colab-ready."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
REQUIRED = {"00_quickstart", "01_elastic_vs_static", "02_multi_model_colocation", "03_router_and_sleep",
            "04_prefix_sharing"}


def test_required_notebooks_exist() -> None:
    assert REQUIRED <= {p.stem for p in NOTEBOOKS}


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def notebook(request: pytest.FixtureRequest) -> tuple[Path, nbformat.NotebookNode]:
    path = request.param
    return path, nbformat.read(str(path), as_version=4)


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged `parameters` (papermill injects after it)"
    return tagged[0]


def test_valid_nbformat_with_python_kernel(notebook: tuple[Path, nbformat.NotebookNode]) -> None:
    _, nb = notebook
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["language"] == "python"  # papermill needs the language


def test_no_outputs_or_execution_counts(notebook: tuple[Path, nbformat.NotebookNode]) -> None:
    path, nb = notebook
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{path.name} cell {i} has outputs: run scripts/strip_notebooks.py {path.relative_to(REPO)}"
    assert "papermill" not in nb.metadata


def test_parameters_cell_takes_run_dir_and_is_plain_assignments(notebook: tuple[Path, nbformat.NotebookNode]) -> None:
    _, nb = notebook
    tree = ast.parse(_parameters_cell(nb).source)
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.Assign), "the parameters cell holds only `name = literal` lines"
        ast.literal_eval(node.value)
        names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    assert {"run_dir", "device"} <= names


def test_code_cells_parse(notebook: tuple[Path, nbformat.NotebookNode]) -> None:
    path, nb = notebook
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            src = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("!", "%")))
            compile(src, f"{path.name}[{i}]", "exec")


def test_first_code_cell_installs_only_when_missing(notebook: tuple[Path, nbformat.NotebookNode]) -> None:
    _, nb = notebook
    first = next(c for c in nb.cells if c.cell_type == "code")
    src = first.source
    assert "KVLAB_REPO_URL" in src and "except ImportError" in src and "pip" in src and "ensure_vllm()" in src
    assert nb.cells.index(first) < nb.cells.index(_parameters_cell(nb))


def test_notebook01_parameters_are_the_documented_ones() -> None:
    nb = nbformat.read(str(REPO / "notebooks" / "01_elastic_vs_static.ipynb"), as_version=4)
    src = _parameters_cell(nb).source
    for name in ("model", "device", "kv_cache_gib", "gpu_memory_utilization", "burst_size", "burst_every",
                 "num_bursts", "prompt_tokens", "max_tokens", "idle_s", "run_dir"):
        assert re.search(rf"^{name} = ", src, re.MULTILINE), name


def test_notebook03_parameters_are_the_documented_ones() -> None:
    nb = nbformat.read(str(REPO / "notebooks" / "03_router_and_sleep.ipynb"), as_version=4)
    src = _parameters_cell(nb).source
    for name in ("models", "device", "kv_cache_gib", "sleep_level", "deep_sleep_level", "idle_threshold_s",
                 "burst_size", "num_bursts", "prompt_tokens", "max_tokens", "asleep_s", "run_dir"):
        assert re.search(rf"^{name} = ", src, re.MULTILINE), name


def test_readme_has_a_colab_badge_per_notebook() -> None:
    readme = (REPO / "README.md").read_text()
    for stem in REQUIRED:
        url = f"https://colab.research.google.com/github/YOUR_ORG/YOUR_REPO/blob/main/notebooks/{stem}.ipynb"
        assert url in readme, stem


def test_strip_script_strips_and_checks(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[0].execution_count = 3
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, str(path))
    script = REPO / "scripts" / "strip_notebooks.py"
    assert subprocess.run([sys.executable, str(script), "--check", str(path)], capture_output=True, check=False).returncode == 1
    assert subprocess.run([sys.executable, str(script), str(path)], capture_output=True, check=False).returncode == 0
    assert subprocess.run([sys.executable, str(script), "--check", str(path)], capture_output=True, check=False).returncode == 0
    cell = nbformat.read(str(path), as_version=4).cells[0]
    assert cell.outputs == [] and cell.execution_count is None and cell.source == "print(1)"


def test_gpu_workflow_runs_the_notebooks_on_a_self_hosted_gpu_runner() -> None:
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-notebooks.yml").read_text())
    job = wf["jobs"]["notebooks"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    runs = " ".join(step.get("run", "") for step in job["steps"])
    assert "make setup" in runs
    assert "kvlab run" in runs and "-p device cuda" in runs
    for stem in ("01_elastic_vs_static", "02_multi_model_colocation", "03_router_and_sleep", "04_prefix_sharing"):
        assert f"notebooks/{stem}.ipynb" in runs
    upload = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload and "results/" in upload[0]["with"]["path"] and upload[0].get("if") == "always()"
    # PyYAML reads the bare key `on` as True; either spelling must hold the triggers.
    dispatch = (wf.get("on") or wf.get(True))["workflow_dispatch"]
    assert set(dispatch["inputs"]) == {"ray_address", "notebook", "grid"}
    assert dispatch["inputs"]["ray_address"]["default"] == ""  # by hand with no address: the notebooks job
    assert job["if"] == "inputs.ray_address == ''"


def test_gpu_workflow_can_submit_a_sweep_to_a_ray_cluster() -> None:
    wf = yaml.safe_load((REPO / ".github" / "workflows" / "gpu-notebooks.yml").read_text())
    job = wf["jobs"]["sweep"]
    assert job["if"] == "inputs.ray_address != ''"
    submit = next(s for s in job["steps"] if s.get("name") == "Submit the sweep")
    # The inputs reach the script only through the environment (never pasted into it), as --sweep items.
    assert "${{" not in submit["run"] and set(submit["env"]) == {"RAY_ADDRESS", "NOTEBOOK", "GRID"}
    assert "kvlab run" in submit["run"] and "--on" in submit["run"] and '--sweep "$item"' in submit["run"]
    upload = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload and upload[0]["with"]["path"] == "results/" and upload[0].get("if") == "always()"


@pytest.mark.parametrize("name", ["02_multi_model_colocation", "03_router_and_sleep"])
def test_per_engine_memory_figures_show_gpu_memory_on_a_gpu(name: str) -> None:
    """On the H200 these figures showed each engine's host memory (flat, ~2 GB) while its KV pool lived on the GPU:
    they take the metric for the device the notebook picked."""
    source = "\n".join("".join(c.source) for c in nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4).cells)
    assert "server_memory_metric(dev)" in source and "metric=MEM_BYTES" not in source


def test_server_memory_metric_is_gpu_memory_on_cuda_only() -> None:
    from kvlab.probes import GPU_PROCESS_BYTES, MEM_BYTES, server_memory_metric

    assert server_memory_metric("cuda") == (GPU_PROCESS_BYTES, "GPU memory")
    assert server_memory_metric("cpu") == (MEM_BYTES, "Process memory")
