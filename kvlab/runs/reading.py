"""Run directories read back into DataFrames and dicts: what notebooks and `compare` work from."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlab.probes import read_memory_csv
from kvlab.runs.run import Run


@dataclass
class RunData:
    """A run directory read back: what notebooks and `compare` work from."""

    dir: Path
    params: dict[str, Any]
    env: dict[str, Any]
    summary: dict[str, Any]
    requests: Any = None  # DataFrame of requests.csv (empty if none)
    memory: Any = None  # DataFrame of memory.csv (empty if none)
    figures: list[Path] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    @property
    def name(self) -> str:
        return f"{self.summary.get('experiment', self.dir.parent.name)}/{self.summary.get('run_id', self.dir.name)}"

    @property
    def phases(self) -> list[dict[str, Any]]:
        return list(self.summary.get("phases", []))

    @property
    def series(self) -> dict[str, dict[str, Any]]:
        return dict(self.summary.get("series", {}))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def load_run(run_dir: Path | str | Run) -> RunData:
    """Read a run directory (or a live Run) back into DataFrames and dicts."""
    import pandas as pd

    path = run_dir.dir if isinstance(run_dir, Run) else Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}: pass results/<experiment>/<run-id>")
    requests_csv = path / "requests.csv"
    requests = pd.read_csv(requests_csv) if requests_csv.exists() and requests_csv.stat().st_size else \
        pd.DataFrame()
    return RunData(dir=path, params=_read_json(path / "params.json"), env=_read_json(path / "env.json"),
                   summary=_read_json(path / "summary.json"), requests=requests,
                   memory=read_memory_csv(path / "memory.csv"), figures=sorted(path.glob("*.png")))


def latest_run(experiment: str, root: Path | str = "results") -> RunData:
    """The newest run of an experiment (run ids sort by time)."""
    runs = sorted(p for p in (Path(root) / experiment).glob("*") if (p / "params.json").exists())
    if not runs:
        raise FileNotFoundError(f"no runs of {experiment!r} under {root}: run the experiment first")
    return load_run(runs[-1])
