"""A kvcached vLLM-CPU server whose pool lives on a tmpfs far smaller than the burst it gets: a full tmpfs
(ENOSPC) is the allocator's refusal, so requests wait and then complete, the engine stays up, and the pool computes
the right outputs afterwards. The fault is real: a tmpfs mounted with a small size, holding KVCACHED_SHM_DIR.

The burst's own answers are checked for completeness, not compared token for token with a server that ran each
prompt alone: vLLM-CPU is not batch-invariant, and a static server given the same burst with the same small KV
cache answers two of these prompts differently from one that ran them alone, exactly as kvcached does (measured;
the batches that form under a full KV cache differ from the ones with room). The token-for-token comparison is
made after the burst, on the pool that went through the refusals."""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvcached import budget
from kvlab.load import client

pytestmark = [pytest.mark.server, pytest.mark.faults, pytest.mark.usefixtures("cross_process_engines")]

TMPFS_MB = 80  # a few logical pages of the tiny model: one for the null block, a couple of requests at a time


def _prompt(i: int) -> str:
    words = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river", "runs", "to", "sea")
    return f"Document {i}. " + " ".join(words[(i * 5 + k * 7) % len(words)] for k in range(700))


@pytest.fixture
def small_shm_dir():
    path = Path(tempfile.mkdtemp(prefix="kvcached-small-"))
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=700", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}): this test needs root or CAP_SYS_ADMIN")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
    os.rmdir(path)


def test_requests_wait_for_a_full_tmpfs_then_complete(start_server, static_server, small_shm_dir, monkeypatch):
    server = start_server(kvcached=True, name="kvcached-small-tmpfs", env={"KVCACHED_SHM_DIR": str(small_shm_dir)})
    monkeypatch.setenv("KVCACHED_SHM_DIR", str(small_shm_dir))  # read the engine's record where it lives
    prompts = [_prompt(i) for i in range(12)]  # ~1100 tokens each: together several times the tmpfs
    reserved: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            reserved.append(budget.find_instance(server.kvcached_name).reserved_bytes)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            burst = list(pool.map(lambda p: client.post_json(server.url + "/v1/completions", {
                "model": server.model_name, "prompt": p, "max_tokens": 16, "temperature": 0.0}), prompts))
    finally:
        done.set()
        watcher.join()
    page = budget.find_instance(server.kvcached_name).page_bytes
    assert max(reserved) <= TMPFS_MB << 20, "kvcached never held more than the tmpfs has"
    assert max(reserved) >= (TMPFS_MB << 20) - 2 * page, "the burst filled the tmpfs: requests had to wait"
    server.check()  # the engine is alive: no step failed on the full tmpfs
    for out in burst:  # every request of the burst waited and then completed: the whole answer, no error
        choice = out["choices"][0]
        assert choice["finish_reason"] in ("length", "stop") and out["usage"]["prompt_tokens"] > 500, out
        assert choice["finish_reason"] == "stop" or out["usage"]["completion_tokens"] == 16, out
    # Half the prompts, one at a time on each server: the pool the refusals went through is the same either way.
    again = prompts[::2]
    got = [client.complete(server.url, server.model_name, p, max_tokens=16) for p in again]
    want = [client.complete(static_server.url, static_server.model_name, p, max_tokens=16) for p in again]
    assert got == want, "after the refusals, the pool's greedy outputs equal a static server's"
    log = server.read_log()
    assert "EngineDeadError" not in log and "Traceback" not in log
    st = os.statvfs(small_shm_dir)
    assert st.f_blocks * st.f_frsize <= TMPFS_MB << 20
