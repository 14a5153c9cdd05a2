"""The router against failing backends and hostile clients: streams cut short, timeouts, the per-backend cap,
compressed answers, malformed input, and who may call what (the token, Origin and Host)."""
from __future__ import annotations

import asyncio
import json
import socket
from contextlib import contextmanager
from typing import Iterator

import aiohttp
import pytest
from test_router import running_router

from kvlab.engines.fleet_config import FleetConfigError, parse_fleet_config
from kvlab.router.settings import RouterSettings

# A hang guard, not a timing assertion: a router that never ends a stream fails instead of hanging the tier.
GUARD_S = 60


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, GUARD_S))


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("KVLAB_ROUTER_TOKEN", raising=False)


def sse_data(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]


async def read_cut_stream(resp: aiohttp.ClientResponse) -> bytes:
    """Everything the router sent before the body broke off; fails if the body ended cleanly."""
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    return bytes(received)


async def settled_stats(f, model: str, requests: int = 1) -> dict:
    """The model's traffic once its requests have been counted (the router counts one as its handler ends)."""
    for _ in range(500):
        stats = f.router.traffic.model_stats(model)
        if stats["total_requests"] >= requests:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"the router never counted {requests} request(s) to {model}")


def stream_body(**extra) -> dict:
    return {"model": "noop-a", "prompt": "x", "stream": True, "max_tokens": 5, **extra}


# ---- 1. a stream that ends early ends in an error every client sees ------------------------------------------
@pytest.mark.faults
def test_a_backend_dying_mid_stream_gives_an_error_event_and_a_broken_body():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/completions", json=stream_body(noop_die_after=2)) as resp:
                assert resp.status == 200
                raw = await read_cut_stream(resp)
            events = sse_data(raw)
            assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["t0", "t1"]
            error = json.loads(events[-1])["error"]
            assert error["code"] == "backend_disconnected" and error["type"] == "server_error"
            assert "noop-a" in error["message"]
            assert "[DONE]" not in events
            assert f.noops["noop-a"].stats["streams_died"] == 1
            stats = await settled_stats(f, "noop-a")
            assert stats["failed_requests"] == 1 and stats["successful_requests"] == 0
    run(scenario())


@pytest.mark.faults
def test_a_stream_that_ends_without_done_is_not_taken_for_a_whole_answer():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/chat/completions",
                              json={"model": "noop-a", "messages": [], "stream": True, "max_tokens": 2,
                                    "noop_skip_done": True}) as resp:
                raw = await read_cut_stream(resp)
            events = sse_data(raw)
            assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == ["t0", "t1"]
            error = json.loads(events[-1])["error"]
            assert error["code"] == "backend_disconnected" and "[DONE]" in error["message"]
            assert (await settled_stats(f, "noop-a"))["failed_requests"] == 1
    run(scenario())


@pytest.mark.faults
def test_the_openai_client_raises_on_a_stream_cut_short():
    import openai

    async def scenario():
        async with running_router(("noop-a",)) as f:
            client = openai.AsyncOpenAI(base_url=f.url + "/v1", api_key="unused", max_retries=0)
            try:
                stream = await client.completions.create(model="noop-a", prompt="x", max_tokens=5, stream=True,
                                                         extra_body={"noop_die_after": 2})
                texts = []
                with pytest.raises(openai.APIError, match="noop-a"):
                    async for chunk in stream:
                        texts.append(chunk.choices[0].text)
                assert texts == ["t0", "t1"]
            finally:
                await client.close()
    run(scenario())


@pytest.mark.faults
def test_the_openai_client_raises_on_a_stalled_stream():
    import openai

    async def scenario():
        async with running_router(("noop-a",), settings=RouterSettings(read_timeout_seconds=0.3)) as f:
            client = openai.AsyncOpenAI(base_url=f.url + "/v1", api_key="unused", max_retries=0)
            try:
                stream = await client.chat.completions.create(
                    model="noop-a", messages=[{"role": "user", "content": "x"}], max_tokens=5, stream=True,
                    extra_body={"noop_stall_after": 1})
                with pytest.raises(openai.APIError, match="read_timeout_seconds"):
                    async for _ in stream:
                        pass
            finally:
                await client.close()
    run(scenario())


def test_a_complete_stream_still_ends_cleanly_with_done():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/completions", json=stream_body(noop_chunk_delay=0.01)) as resp:
                events = sse_data(await resp.read())
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
            assert (await settled_stats(f, "noop-a"))["successful_requests"] == 1
    run(scenario())


# ---- 2. timeouts and the per-backend cap ---------------------------------------------------------------------
@pytest.mark.faults
def test_a_stream_that_stalls_past_the_read_timeout_ends_in_an_error_and_frees_the_engine():
    async def scenario():
        async with running_router(("noop-a",), settings=RouterSettings(read_timeout_seconds=0.3)) as f, \
                aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/completions", json=stream_body(noop_stall_after=2)) as resp:
                raw = await read_cut_stream(resp)
            events = sse_data(raw)
            assert len(events) == 3 and "[DONE]" not in events
            error = json.loads(events[-1])["error"]
            assert error["code"] == "backend_timeout" and "read_timeout_seconds" in error["message"]
            noop = f.noops["noop-a"]
            for _ in range(500):  # the router hung up on the engine, so the engine stops generating
                if noop.stats["streams_cancelled"]:
                    break
                await asyncio.sleep(0.01)
            assert noop.stats["streams_cancelled"] == 1 and noop.stats["active"] == 0
    run(scenario())


@pytest.mark.faults
def test_a_backend_silent_before_its_headers_answers_504():
    async def scenario():
        async with running_router(("noop-a",), settings=RouterSettings(read_timeout_seconds=0.3)) as f, \
                aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/completions", json=stream_body(noop_stall_after=0)) as resp:
                assert resp.status == 504
                error = (await resp.json())["error"]
            assert error["code"] == "backend_timeout" and "read_timeout_seconds" in error["message"]
            assert (await settled_stats(f, "noop-a"))["failed_requests"] == 1
    run(scenario())


@contextmanager
def backend_that_never_accepts(port: int) -> Iterator[None]:
    """A listening socket whose accept queue is full: a connection to it hangs, like an engine wedged at start."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(0)
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(c)
        yield
    finally:
        for c in fillers:
            c.close()
        server.close()


@pytest.mark.faults
def test_a_backend_that_never_accepts_answers_503_after_the_connect_timeout():
    async def scenario():
        settings = RouterSettings(connect_timeout_seconds=0.3)
        async with running_router(("noop-a", "stuck"), settings=settings, down=("stuck",)) as f, \
                aiohttp.ClientSession() as s:
            port = int(f.router.backends["stuck"].url.rsplit(":", 1)[1])
            with backend_that_never_accepts(port):
                async with s.post(f.url + "/v1/completions", json={"model": "stuck", "prompt": "x"}) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"]
                    error = (await resp.json())["error"]
            assert error["code"] == "backend_unavailable" and "connect_timeout_seconds" in error["message"]
    run(scenario())


def test_requests_over_the_per_backend_cap_wait_for_a_slot():
    async def scenario():
        async with running_router(("noop-a",), settings=RouterSettings(max_concurrent_per_backend=1)) as f, \
                aiohttp.ClientSession() as s:
            async def ask() -> list[str]:
                async with s.post(f.url + "/v1/completions", json=stream_body(noop_chunk_delay=0.02)) as resp:
                    assert resp.status == 200
                    return sse_data(await resp.read())
            answers = await asyncio.gather(*(ask() for _ in range(4)))
            assert all(events[-1] == "[DONE]" for events in answers), "no request was dropped"
            noop = f.noops["noop-a"]
            assert noop.stats["requests"] == 4 and noop.stats["active_peak"] == 1
    run(scenario())


def test_default_timeouts_and_cap():
    d = RouterSettings()
    assert d.connect_timeout_seconds == 10 and d.read_timeout_seconds == 600 and d.max_concurrent_per_backend == 256


@pytest.mark.parametrize("bad", [
    {"connect_timeout_seconds": 0}, {"connect_timeout_seconds": float("nan")}, {"read_timeout_seconds": -1},
    {"read_timeout_seconds": float("inf")}, {"max_concurrent_per_backend": 0}, {"max_concurrent_per_backend": 2.5},
    {"request_timeout_seconds": float("nan")},
])
def test_settings_refuse_nonsense_and_name_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RouterSettings(**bad)


def test_fleet_file_router_keys_for_timeouts_and_cap():
    base = {"instances": [{"name": "a", "model": "m", "port": 12001}]}
    config = parse_fleet_config({**base, "router": {"connect_timeout_seconds": 2, "read_timeout_seconds": None,
                                                    "max_concurrent_per_backend": 8}})
    r = config.router
    assert r.connect_timeout_seconds == 2 and r.read_timeout_seconds is None and r.max_concurrent_per_backend == 8
    assert parse_fleet_config(base).router == RouterSettings()
    for bad in ({"read_timeout_seconds": 0}, {"connect_timeout_seconds": "soon"}, {"max_concurrent_per_backend": 0}):
        with pytest.raises(FleetConfigError, match=next(iter(bad))):
            parse_fleet_config({**base, "router": bad})


# ---- 3. compressed answers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_compressed_answers_are_relayed_decoded(coding):
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(f.url + "/v1/completions",
                              json={"model": "noop-a", "prompt": "x", "max_tokens": 3, "noop_encoding": coding}) as resp:
                assert resp.status == 200 and "Content-Encoding" not in resp.headers
                assert json.loads(await resp.read())["choices"][0]["text"] == "t0 t1 t2"
            async with s.post(f.url + "/v1/completions", json=stream_body(noop_encoding=coding)) as resp:
                assert resp.status == 200 and "Content-Encoding" not in resp.headers
                events = sse_data(await resp.read())
            assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [f"t{i}" for i in range(5)]
            assert events[-1] == "[DONE]"
            assert (await settled_stats(f, "noop-a", 2))["successful_requests"] == 2
    run(scenario())


def test_a_coding_the_router_cannot_decode_is_relayed_with_its_header():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.post(f.url + "/v1/completions",
                              json={"model": "noop-a", "prompt": "x", "noop_encoding": "x-custom"}) as resp:
                assert resp.status == 200 and resp.headers["Content-Encoding"] == "x-custom"
                assert json.loads(await resp.read())["choices"][0]["text"] == "t0"
    run(scenario())


def test_engines_are_asked_for_an_uncompressed_answer():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"},
                              headers={"Accept-Encoding": "gzip, br"}) as resp:
                assert resp.status == 200
            assert f.noops["noop-a"].last_headers["Accept-Encoding"] == "identity"
    run(scenario())


# ---- 4. malformed input --------------------------------------------------------------------------------------
def test_deeply_nested_json_is_a_400():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            depth = 100_000
            body = b'{"model": "noop-a", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
            async with s.post(f.url + "/v1/completions", data=body,
                              headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
            assert error["code"] == "invalid_json" and "nested" in error["message"]
            assert f.noops["noop-a"].stats["requests"] == 0
    run(scenario())


def test_a_non_ascii_bearer_token_is_a_401():
    async def scenario():
        settings = RouterSettings(api_token="sesame")
        async with running_router(("noop-a",), settings=settings, bind="0.0.0.0") as f, \
                aiohttp.ClientSession() as s:
            async with s.post(f.url + "/sleep/model/noop-a", headers={"Authorization": "Bearer sésame"}) as resp:
                assert resp.status == 401 and (await resp.json())["error"]["type"] == "authentication_error"
            async with s.get(f.url + "/sleep/status", headers={"Authorization": "Bearer sésame"}) as resp:
                assert resp.status == 401
            assert f.levels["noop-a"].calls == []
    run(scenario())


def test_a_non_ascii_token_can_be_configured():
    async def scenario():
        settings = RouterSettings(api_token="sésame")
        async with running_router(("noop-a",), settings=settings, bind="0.0.0.0") as f, \
                aiohttp.ClientSession() as s:
            async with s.post(f.url + "/sleep/model/noop-a", headers={"Authorization": "Bearer sésame"}) as resp:
                assert resp.status == 200
            async with s.get(f.url + "/sleep/status", headers={"Authorization": "Bearer sesame"}) as resp:
                assert resp.status == 401
    run(scenario())


def test_wrong_methods_and_unknown_paths_answer_in_openai_form():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            async with s.get(f.url + "/v1/completions") as resp:
                assert resp.status == 405 and "POST" in resp.headers["Allow"]
                error = (await resp.json())["error"]
            assert error["code"] == "method_not_allowed" and "POST" in error["message"]
            async with s.post(f.url + "/v1/embeddings", json={"model": "noop-a"}) as resp:
                assert resp.status == 404
                error = (await resp.json())["error"]
            assert error["code"] == "unknown_url" and "/v1/embeddings" in error["message"]
            async with s.delete(f.url + "/health") as resp:
                assert resp.status == 405 and (await resp.json())["error"]["type"] == "invalid_request_error"
    run(scenario())


def test_a_threshold_must_be_a_finite_number_of_seconds():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            for path in ("/traffic/idle", "/traffic/active"):
                for bad in ("nan", "NaN", "inf", "-inf", "1e999", "-1", "abc", ""):
                    async with s.get(f.url + path, params={"threshold": bad}) as resp:
                        assert resp.status == 400, (path, bad)
                        assert (await resp.json())["error"]["code"] == "invalid_threshold"
                for good in ("0", "2.5"):
                    async with s.get(f.url + path, params={"threshold": good}) as resp:
                        assert resp.status == 200 and (await resp.json())["threshold_seconds"] == float(good)
    run(scenario())


# ---- 5. who may call what ------------------------------------------------------------------------------------
READ_ENDPOINTS = ("/v1/models", "/models", "/health/all", "/health/noop-a", "/traffic/stats",
                  "/traffic/stats/model/noop-a", "/traffic/idle", "/traffic/active", "/sleep/status",
                  "/sleep/candidates")


def test_a_non_local_bind_needs_the_token_everywhere_but_health():
    async def scenario():
        settings = RouterSettings(api_token="sesame")
        async with running_router(("noop-a",), settings=settings, bind="0.0.0.0") as f, \
                aiohttp.ClientSession() as s:
            good = {"Authorization": "Bearer sesame"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                for path in READ_ENDPOINTS:
                    async with s.get(f.url + path, headers=headers) as resp:
                        assert resp.status == 401, path
                        assert (await resp.json())["error"]["code"] == "invalid_api_key"
                async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"},
                                  headers=headers) as resp:
                    assert resp.status == 401
                async with s.post(f.url + "/v1/chat/completions", json={"model": "noop-a", "messages": []},
                                  headers=headers) as resp:
                    assert resp.status == 401
            assert f.noops["noop-a"].stats["requests"] == 0
            async with s.get(f.url + "/health") as resp:
                assert resp.status == 200
            for path in READ_ENDPOINTS:
                async with s.get(f.url + path, headers=good) as resp:
                    assert resp.status == 200, path
            async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"},
                              headers=good) as resp:
                assert resp.status == 200
    run(scenario())


def test_the_openai_client_passes_with_the_token_on_a_non_local_bind():
    import openai

    async def scenario():
        settings = RouterSettings(api_token="sesame")
        async with running_router(("noop-a",), settings=settings, bind="0.0.0.0") as f:
            for key, ok in (("sesame", True), ("wrong", False)):
                client = openai.AsyncOpenAI(base_url=f.url + "/v1", api_key=key, max_retries=0)
                try:
                    if ok:
                        answer = await client.completions.create(model="noop-a", prompt="x", max_tokens=2)
                        assert answer.choices[0].text == "t0 t1"
                    else:
                        with pytest.raises(openai.AuthenticationError):
                            await client.completions.create(model="noop-a", prompt="x")
                finally:
                    await client.close()
    run(scenario())


def test_with_a_token_sleep_and_wake_need_it_on_loopback_too():
    async def scenario():
        settings = RouterSettings(api_token="sesame")
        async with running_router(("noop-a",), settings=settings) as f, aiohttp.ClientSession() as s:
            for path in ("/sleep/model/noop-a", "/wake/model/noop-a"):
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    async with s.post(f.url + path, headers=headers) as resp:
                        assert resp.status == 401, (path, headers)
            assert f.levels["noop-a"].calls == []
            good = {"Authorization": "Bearer sesame"}
            async with s.post(f.url + "/sleep/model/noop-a", headers=good) as resp:
                assert resp.status == 200
            async with s.post(f.url + "/wake/model/noop-a", headers=good) as resp:
                assert resp.status == 200
            assert f.levels["noop-a"].calls == ["sleep", "wake"]
            # The rest stays open to local programs.
            async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"}) as resp:
                assert resp.status == 200
            async with s.get(f.url + "/traffic/stats") as resp:
                assert resp.status == 200
    run(scenario())


def test_on_loopback_requests_a_web_page_could_forge_are_403():
    async def scenario():
        async with running_router(("noop-a",)) as f, aiohttp.ClientSession() as s:
            port = int(f.url.rsplit(":", 1)[1])
            forged = [{"Origin": "http://evil.example"}, {"Origin": "null"},
                      {"Origin": f"http://localhost:{port + 1}"}, {"Origin": f"https://evil.example:{port}"},
                      {"Origin": f"http://127.0.0.1:{port}", "Host": f"localhost:{port + 1}"},
                      {"Host": f"evil.example:{port}"}, {"Host": "evil.example"}, {"Host": "127.0.0.1.evil.example"},
                      {"Host": "localhost@evil.example"}, {"Host": ""}]
            for headers in forged:
                async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"},
                                  headers=headers) as resp:
                    assert resp.status == 403, headers
                    error = (await resp.json())["error"]
                    assert error["type"] == "permission_error", headers
                async with s.post(f.url + "/sleep/model/noop-a", headers=headers) as resp:
                    assert resp.status == 403, headers
                async with s.get(f.url + "/traffic/stats", headers=headers) as resp:
                    assert resp.status == 403, headers
            assert f.noops["noop-a"].stats["requests"] == 0 and f.levels["noop-a"].calls == []
            allowed = [{}, {"Origin": f"http://127.0.0.1:{port}"}, {"Origin": f"http://localhost:{port}"},
                       {"Host": "localhost"}, {"Host": f"localhost:{port}"}, {"Host": "127.0.0.1"},
                       {"Host": f"[::1]:{port}"}, {"Host": "[::1]"}, {"Host": f"LOCALHOST:{port}"},
                       # through a tunnel (ssh -L 9000:127.0.0.1:PORT) the client names another port
                       {"Host": "localhost:9000"}, {"Host": "localhost:9000", "Origin": "http://localhost:9000"}]
            for headers in allowed:
                async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"},
                                  headers=headers) as resp:
                    assert resp.status == 200, headers
    run(scenario())


def test_the_openai_client_works_on_loopback_without_a_token():
    import openai

    async def scenario():
        async with running_router(("noop-a",)) as f:
            client = openai.AsyncOpenAI(base_url=f.url + "/v1", api_key="anything", max_retries=0)
            try:
                answer = await client.completions.create(model="noop-a", prompt="x", max_tokens=2)
                assert answer.choices[0].text == "t0 t1"
                texts = [c.choices[0].text async for c in await client.completions.create(
                    model="noop-a", prompt="x", max_tokens=3, stream=True)]
                assert texts == ["t0", "t1", "t2"]
            finally:
                await client.close()
    run(scenario())


# ---- 6. the router's credentials stay at the router ----------------------------------------------------------
def test_authorization_and_cookie_are_not_forwarded_to_engines():
    async def scenario():
        settings = RouterSettings(api_token="sesame")
        async with running_router(("noop-a",), settings=settings, bind="0.0.0.0") as f, \
                aiohttp.ClientSession() as s:
            headers = {"Authorization": "Bearer sesame", "Cookie": "session=secret", "X-Request-Id": "r-1"}
            async with s.post(f.url + "/v1/completions", json={"model": "noop-a", "prompt": "x"},
                              headers=headers) as resp:
                assert resp.status == 200
            seen = {k.lower(): v for k, v in f.noops["noop-a"].last_headers.items()}
            assert "authorization" not in seen and "cookie" not in seen
            assert seen["x-request-id"] == "r-1"
    run(scenario())


def test_serve_status_sends_the_token_a_non_local_router_needs(monkeypatch, capsys):
    from kvlab.cli import main

    async def scenario():
        settings = RouterSettings(api_token="sesame")
        async with running_router(("noop-a",), settings=settings, bind="0.0.0.0") as f:
            monkeypatch.delenv("KVLAB_ROUTER_TOKEN", raising=False)
            refused = await asyncio.to_thread(main, ["serve", "status", "--router", f.url, "--json"])
            monkeypatch.setenv("KVLAB_ROUTER_TOKEN", "sesame")
            allowed = await asyncio.to_thread(main, ["serve", "status", "--router", f.url, "--json"])
            return refused, allowed
    refused, allowed = asyncio.run(asyncio.wait_for(scenario(), GUARD_S))
    out = capsys.readouterr()
    assert refused == 2 and "KVLAB_ROUTER_TOKEN" in out.err, "a refusal names the token, not 'no router answers'"
    assert allowed == 0 and '"noop-a"' in out.out


def test_counts_in_the_router_section_must_be_whole_numbers():
    for key in ("max_concurrent_per_backend", "max_body_bytes"):
        with pytest.raises(FleetConfigError, match=f"router.{key}.*whole, finite number"):
            parse_fleet_config({"router": {key: 2.5}, "instances": [{"name": "a", "model": "m"}]},
                               check_ports=False)
