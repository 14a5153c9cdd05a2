"""Two processes, each mapping CUDA pages through KVCacheManager, share one budget group with a cap.

The cap is smaller than what the two want together, so it binds: the group's reserved bytes, sampled from
outside while both churn, never pass it, each process's driver-mapped bytes equal its reservation, tagged
block data survives the churn, and nothing is left mapped or reserved at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kvcached import _core

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _core.cuda_available(),
        reason="no CUDA GPU here: the cuda backend needs libcuda.so.1 and a visible NVIDIA device",
    ),
]

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("cuda_budget_worker.py")
CAP_LOGICAL_PAGES = 10  # each worker alone could use 16


def test_two_processes_share_a_capped_group_on_cuda(tmp_path, monkeypatch) -> None:
    pytest.importorskip("torch", reason="the workers tag blocks with torch kernels: install a CUDA torch")
    from kvcached import budget

    shm = Path(tempfile.mkdtemp(prefix="kvcached-gpu-group-", dir="/dev/shm"))
    monkeypatch.setenv("KVCACHED_SHM_DIR", str(shm))
    gran = _core.granularity("cuda", 0)
    logical_page_bytes = 2 * gran  # the workers' layout has two layers
    cap = CAP_LOGICAL_PAGES * logical_page_bytes
    group = "gpu-pair"
    budget.set_group_limit(group, cap, create=True)
    go_file = tmp_path / "go"
    env = dict(os.environ, KVCACHED_SHM_DIR=str(shm),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, str(WORKER), f"engine{i}", group, str(go_file), "3.0", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        for p in procs:
            line = p.stdout.readline().strip()
            assert line == "ready", f"worker did not start: {line!r} {p.stderr.read() if p.poll() is not None else ''}"
        go_file.touch()
        peak, samples = 0, 0
        while any(p.poll() is None for p in procs):
            peak = max(peak, budget.group_reserved(group))
            samples += 1
            time.sleep(0.002)
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        budget.set_group_limit(group, None)
        shutil.rmtree(shm, ignore_errors=True)
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, f"worker failed:\n{err[-3000:]}"
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert samples > 20
    assert 0 < peak <= cap, f"group reserved peaked at {peak} B, over the cap {cap} B"
    assert sum(r["budget_refusals"] for r in reports) > 0, "the cap never refused an allocation"
    for r in reports:
        assert r["allocs"] > 0 and r["frees"] > 0
        assert r["data_errors"] == 0, r
        assert r["accounting_errors"] == 0, r
        assert r["max_reserved"] <= cap
        assert r["leaked_pages"] == 0 and r["final_reserved"] == 0, r
    assert budget.list_instances(group=group) == []
