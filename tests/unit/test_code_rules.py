"""The house rules CI checks on the code itself: import-linter's layering contracts (.importlinter) and ruff."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the test extra (`pip install -e .[test]`, `make setup`)")
    return str(path)


def test_import_contracts_are_kept() -> None:
    out = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"an import breaks a layering contract (.importlinter):\n{out.stdout[-4000:]}"
    assert "0 broken" in out.stdout


def test_ruff_is_clean() -> None:
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"ruff reports (fix them, or `ruff check --fix .`):\n{out.stdout[-4000:]}"
