"""Router behaviour against the no-op backend fixture: routing, error codes, URL-encoded names, traffic counts,
streaming pass-through and cancellation, and the sleep gate with a fake sleep level."""
from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import AsyncIterator

import aiohttp
import pytest

from kvlab.bench.noop_server import NoopServer, start_noop_server
from kvlab.engines.ports import free_port
from kvlab.router import Backend, Router, serve_app
from kvlab.router.settings import RouterSettings, SleepSettings

SLASH_MODEL = "meta-llama/Llama-3.2-1B"


class FakeSleepLevel:
    """A fake sleep level (no engine to free here): records calls, can be slowed down or made to fail."""

    name = "fake"

    def __init__(self, wake_delay: float = 0.0) -> None:
        self.calls: list[str] = []
        self.wake_delay = wake_delay
        self.unavailable: str | None = None

    def unavailable_reason(self) -> str | None:
        return self.unavailable

    async def kv_instance(self) -> str | None:
        return None

    async def sleep(self) -> None:
        self.calls.append("sleep")

    async def wake(self) -> None:
        await asyncio.sleep(self.wake_delay)
        self.calls.append("wake")


def fake_measure(backend: Backend, kv_instance: str | None) -> dict:
    """Memory probe fake: the no-op backend holds no engine memory worth measuring."""
    return {"pids": 0, "rss_bytes": 0, "pss_bytes": 0, "kv_reserved_bytes": None}


class Fleet:
    def __init__(self, router: Router, url: str, noops: dict[str, NoopServer], levels: dict[str, FakeSleepLevel]):
        self.router, self.url, self.noops, self.levels = router, url, noops, levels


@asynccontextmanager
async def running_router(models: tuple[str, ...] = ("noop-a", SLASH_MODEL), *, settings: RouterSettings | None = None,
                         sleep_settings: SleepSettings | None = None, wake_delay: float = 0.0,
                         down: tuple[str, ...] = (), bind: str = "127.0.0.1") -> AsyncIterator[Fleet]:
    """Routers over no-op backends, served on 127.0.0.1; `bind` is the address the router believes it is bound to
    (its security rules follow it), so a non-local bind can be tested without exposing a port."""
    runners, noops, backends, levels = [], {}, [], {}
    for model in models:
        port = free_port()
        if model not in down:
            runner, noop = await start_noop_server("127.0.0.1", port, model)
            runners.append(runner)
            noops[model] = noop
        backends.append(Backend(name=model.replace("/", "-"), model=model, url=f"http://127.0.0.1:{port}"))
        levels[model] = FakeSleepLevel(wake_delay)
    router = Router(backends, settings, sleep_settings or SleepSettings(), levels=levels, gpu=False)
    router.sleep._measure = fake_measure
    port = free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_app(router.build_app(bind), "127.0.0.1", port, stop))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            try:
                async with s.get(url + "/health"):
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
    try:
        yield Fleet(router, url, noops, levels)
    finally:
        stop.set()
        await task
        for runner in runners:
            await runner.cleanup()


def run(coro) -> None:
    asyncio.run(coro)


def test_routes_by_model_and_counts_traffic():
    async def scenario():
        async with running_router() as f, aiohttp.ClientSession() as s:
            for model in ("noop-a", "noop-a", SLASH_MODEL):
                async with s.post(f.url + "/v1/completions",
                                  json={"model": model, "prompt": "hi", "max_tokens": 3}) as resp:
                    assert resp.status == 200
                    body = await resp.json()
                    assert body["model"] == model and body["choices"][0]["text"] == "t0 t1 t2"
            async with s.post(f.url + "/v1/chat/completions",
                              json={"model": "noop-a", "messages": [{"role": "user", "content": "x"}]}) as resp:
                assert (await resp.json())["choices"][0]["message"]["content"] == "t0"
            assert f.noops["noop-a"].stats["requests"] == 3 and f.noops[SLASH_MODEL].stats["requests"] == 1
            async with s.get(f.url + "/traffic/stats") as resp:
                stats = (await resp.json())["traffic_stats"]
            assert stats["noop-a"]["total_requests"] == 3 and stats["noop-a"]["successful_requests"] == 3
            assert stats[SLASH_MODEL]["total_requests"] == 1 and stats[SLASH_MODEL]["failed_requests"] == 0
            assert set(stats["noop-a"]) == {"total_requests", "successful_requests", "failed_requests", "request_rate",
                                            "avg_response_time", "last_activity_time", "idle_time_seconds", "is_idle"}
            assert stats["noop-a"]["request_rate"] > 0 and stats["noop-a"]["is_idle"] is False
            async with s.get(f.url + "/v1/models") as resp:
                assert {m["id"] for m in (await resp.json())["data"]} == {"noop-a", SLASH_MODEL}
    run(scenario())


def test_url_encoded_model_names_reach_their_model():
    async def scenario():
        async with running_router() as f, aiohttp.ClientSession() as s:
            encoded = "meta-llama%2FLlama-3.2-1B"
            async with s.post(f.url + "/v1/completions", json={"model": SLASH_MODEL, "prompt": "x"}) as resp:
                assert resp.status == 200
            async with s.get(f.url + f"/traffic/stats/model/{encoded}") as resp:
                assert resp.status == 200
                body = await resp.json()
                assert body["model"] == SLASH_MODEL and body["traffic_stats"]["total_requests"] == 1
            async with s.get(f.url + f"/health/{encoded}") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "healthy"
            async with s.post(f.url + f"/sleep/model/{encoded}") as resp:
                assert resp.status == 200 and (await resp.json())["model"] == SLASH_MODEL
            async with s.get(f.url + "/sleep/status") as resp:
                assert SLASH_MODEL in (await resp.json())["sleeping_models"]
            async with s.post(f.url + f"/wake/model/{encoded}") as resp:
                assert resp.status == 200 and (await resp.json())["woken"] is True
    run(scenario())


def test_error_codes_in_openai_form():
    async def scenario():
        settings = RouterSettings(max_body_bytes=1000)
        async with running_router(("noop-a", "gone"), settings=settings, down=("gone",)) as f, \
                aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/completions", data=b"{not json",
                              headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["error"]["type"] == "invalid_request_error"
            async with s.post(f.url + "/v1/completions", json={"model": "nope", "prompt": "x"}) as resp:
                assert resp.status == 404
                err = (await resp.json())["error"]
                assert "noop-a" in err["message"] and err["code"] == "model_not_found"
            async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x" * 2000}) as resp:
                assert resp.status == 413 and "max_body_bytes" in (await resp.json())["error"]["message"]
            async with s.post(f.url + "/v1/completions", json={"prompt": "x"}) as resp:
                assert resp.status == 400 and "model" in (await resp.json())["error"]["message"]
            async with s.post(f.url + "/v1/completions", json={"model": "gone", "prompt": "x"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "backend_unavailable"
            async with s.get(f.url + "/health/gone") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "unhealthy"
            async with s.get(f.url + "/health/all") as resp:
                body = await resp.json()
                assert body["healthy"] == 1 and body["total"] == 2 and body["status"] == "degraded"
            async with s.get(f.url + "/health/nope") as resp:
                assert resp.status == 404
            async with s.get(f.url + "/traffic/idle?threshold=abc") as resp:
                assert resp.status == 400
            async with s.get(f.url + "/traffic/stats") as resp:
                assert (await resp.json())["traffic_stats"]["gone"]["failed_requests"] == 1
    run(scenario())


def test_streaming_passes_every_chunk_through():
    async def scenario():
        async with running_router() as f, aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/chat/completions",
                              json={"model": "noop-a", "messages": [], "stream": True, "max_tokens": 5}) as resp:
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                text = (await resp.read()).decode()
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == [f"t{i}" for i in range(5)]
            assert f.noops["noop-a"].stats["streams_finished"] == 1
    run(scenario())


def test_done_watcher_sees_the_end_event_only_at_a_line_start():
    from kvlab.router.proxy import DoneWatcher

    stream = b'data: {"text": "data: [DONE]"}\n\ndata: [DONE]\n\n'
    end = stream.rindex(b"data: [DONE]")
    for cut in range(1, len(stream)):  # every split into two chunks
        w = DoneWatcher()
        first = w.feed(stream[:cut])
        assert first == (cut >= end + len(b"data: [DONE]")), cut  # the words inside the JSON text do not count
        assert w.feed(stream[cut:])
    assert DoneWatcher().feed(b"data: [DONE]\n\n")  # a stream that is only the end event


def test_client_hanging_up_at_done_counts_as_a_success():
    """The openai package closes the connection as soon as it reads [DONE], before the engine ends the body."""
    async def scenario():
        async with running_router() as f, aiohttp.ClientSession() as s:
            resp = await s.post(f.url + "/v1/completions",
                                json={"model": "noop-a", "prompt": "x", "stream": True, "max_tokens": 3,
                                      "noop_linger_after_done": 0.5})
            while not (await resp.content.readline()).startswith(b"data: [DONE]"):
                pass
            resp.close()  # hang up mid-body, right after [DONE]
            for _ in range(100):
                stats = f.router.traffic.model_stats("noop-a")
                if stats["successful_requests"] + stats["failed_requests"]:
                    break
                await asyncio.sleep(0.02)
            assert stats["successful_requests"] == 1 and stats["failed_requests"] == 0
    run(scenario())


def test_client_disconnect_mid_stream_cancels_the_backend_request():
    async def scenario():
        async with running_router() as f:
            noop = f.noops["noop-a"]
            async with aiohttp.ClientSession() as s:
                resp = await s.post(f.url + "/v1/completions",
                                    json={"model": "noop-a", "prompt": "x", "stream": True, "max_tokens": 1000,
                                          "noop_chunk_delay": 0.01})
                await resp.content.readline()  # the stream has begun
                assert noop.stats["active"] == 1
                resp.close()  # hang up
            for _ in range(200):
                if noop.stats["streams_cancelled"]:
                    break
                await asyncio.sleep(0.02)
            assert noop.stats["streams_cancelled"] == 1 and noop.stats["streams_finished"] == 0
            assert noop.stats["active"] == 0
            stats = f.router.traffic.model_stats("noop-a")
            assert stats["failed_requests"] == 1
    run(scenario())


def test_request_to_sleeping_model_is_held_until_it_wakes():
    async def scenario():
        async with running_router(wake_delay=0.3) as f, aiohttp.ClientSession() as s:
            level = f.levels["noop-a"]
            async with s.post(f.url + "/sleep/model/noop-a") as resp:
                body = await resp.json()
                assert resp.status == 200 and body["manual_sleep"] is True and body["level"] == "fake"
            assert f.router.sleep.state("noop-a") == "asleep"
            # Two requests arrive while asleep: both wait for one wake, then both succeed.
            async def ask() -> int:
                async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"}) as r:
                    return r.status
            statuses = await asyncio.gather(ask(), ask())
            assert statuses == [200, 200]
            assert level.calls == ["sleep", "wake"]
            assert f.noops["noop-a"].stats["requests"] == 2
            status = f.router.sleep.status()
            assert status["sleeping_models"] == {}
            assert status["models"]["noop-a"]["last_wake"]["reason"] == "request"
            assert status["models"]["noop-a"]["last_wake"]["wake_seconds"] >= 0.3
    run(scenario())


def test_without_wake_on_request_a_sleeping_model_answers_503():
    async def scenario():
        async with running_router(sleep_settings=SleepSettings(wakeup_on_request=False)) as f, \
                aiohttp.ClientSession() as s:
            await f.router.sleep.sleep("noop-a")
            async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"]
                assert "/wake/model/noop-a" in (await resp.json())["error"]["message"]
            assert f.noops["noop-a"].stats["requests"] == 0
    run(scenario())


def test_sleep_waits_for_requests_in_flight():
    async def scenario():
        async with running_router() as f, aiohttp.ClientSession() as s:
            async def long_stream() -> bytes:
                async with s.post(f.url + "/v1/completions",
                                  json={"model": "noop-a", "prompt": "x", "stream": True, "max_tokens": 20,
                                        "noop_chunk_delay": 0.02}) as r:
                    return await r.read()
            stream = asyncio.create_task(long_stream())
            while f.router.sleep.status()["models"]["noop-a"]["in_flight"] == 0:
                await asyncio.sleep(0.005)
            await f.router.sleep.sleep("noop-a")
            assert stream.done(), "the sleep began only after the stream in flight ended"
            assert (await stream).decode().rstrip().endswith("[DONE]")
    run(scenario())


def test_auto_sleep_candidates_threshold_and_min_sleep_duration():
    async def scenario():
        settings = SleepSettings(idle_threshold_seconds=0.2, check_interval_seconds=0.05, auto_sleep_enabled=True,
                                 min_sleep_duration=30)
        async with running_router(("noop-a",), sleep_settings=settings) as f, aiohttp.ClientSession() as s:
            for _ in range(100):
                if f.router.sleep.state("noop-a") == "asleep":
                    break
                await asyncio.sleep(0.05)
            status = f.router.sleep.status()
            assert status["sleeping_models"]["noop-a"]["manual_sleep"] is False
            async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"}) as resp:
                assert resp.status == 200
            # Woken just now: min_sleep_duration keeps it awake though it goes idle again.
            await asyncio.sleep(0.5)
            assert f.router.sleep.state("noop-a") == "awake"
            assert f.router.sleep.candidates() == []
            async with s.get(f.url + "/traffic/idle?threshold=0.1") as resp:
                assert (await resp.json())["idle_models"] == ["noop-a"]
            async with s.get(f.url + "/traffic/active?threshold=100") as resp:
                assert (await resp.json())["active_models"] == ["noop-a"]
    run(scenario())


def test_unavailable_level_is_refused_with_the_reason():
    async def scenario():
        async with running_router() as f, aiohttp.ClientSession() as s:
            f.levels["noop-a"].unavailable = "level stop needs process control: run `kvlab serve`"
            async with s.post(f.url + "/sleep/model/noop-a") as resp:
                assert resp.status == 409 and "kvlab serve" in (await resp.json())["error"]["message"]
            async with s.get(f.url + "/sleep/status") as resp:
                model = (await resp.json())["models"]["noop-a"]
                assert "kvlab serve" in model["level_unavailable"] and model["state"] == "awake"
    run(scenario())


def test_non_local_bind_needs_a_token(monkeypatch):
    monkeypatch.delenv("KVLAB_ROUTER_TOKEN", raising=False)
    router = Router([Backend("a", "a", "http://127.0.0.1:1")], levels={"a": FakeSleepLevel()}, gpu=False)
    with pytest.raises(SystemExit, match="api_token"):
        router.build_app("0.0.0.0")

    async def scenario():
        monkeypatch.setenv("KVLAB_ROUTER_TOKEN", "sesame")
        router = Router([Backend("a", "a", "http://127.0.0.1:1")], levels={"a": FakeSleepLevel()}, gpu=False)
        router.sleep._measure = fake_measure
        port, stop = free_port(), asyncio.Event()
        task = asyncio.create_task(serve_app(router.build_app("0.0.0.0"), "127.0.0.1", port, stop))
        await asyncio.sleep(0.2)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{port}/sleep/model/a") as resp:
                    assert resp.status == 401
                async with s.post(f"http://127.0.0.1:{port}/sleep/model/a",
                                  headers={"Authorization": "Bearer sesame"}) as resp:
                    assert resp.status == 200
        finally:
            stop.set()
            await task
    run(scenario())
