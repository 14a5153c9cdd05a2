"""Fixtures of the unit tier: a private kvcached records directory per test, and both kinds of region."""
from __future__ import annotations

import shutil
import tempfile

import pytest
from fake_openai_server import fake_openai_server  # noqa: F401  (a fixture of the whole tier)


@pytest.fixture
def shm_dir(monkeypatch):
    """A fresh KVCACHED_SHM_DIR under /dev/shm for this test, removed afterwards."""
    path = tempfile.mkdtemp(prefix="kvcached-test-", dir="/dev/shm")
    monkeypatch.setenv("KVCACHED_SHM_DIR", path)
    monkeypatch.delenv("KVCACHED_IPC_NAME", raising=False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["recording", "host"])
def region_kind(request) -> str:
    return request.param
