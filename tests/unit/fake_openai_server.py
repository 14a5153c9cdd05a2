"""A fake OpenAI-compatible server made for the workload tests (no model: tokens are canned text).

It runs aiohttp on a private thread and event loop, so synchronous test code (run_workload) can talk to it.
It records when each request arrived (time.monotonic, the lab's clock), and it misbehaves on request, so the
tests exercise what a real server does on the wire:
- every SSE event is written in two pieces cut inside a multi-byte UTF-8 character, with CRLF line ends,
  a `: ping` comment and a multi-line `data:` field no JSON parser would accept whole;
- a prompt containing FAIL gets HTTP 500, HANG never answers, CUT drops the stream after one token;
- /tokenize counts whitespace-separated words plus one BOS token, /detokenize joins words with spaces.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import pytest
from aiohttp import web

TOKEN_TEXT = "é日"  # two and three bytes in UTF-8: cuts land inside characters


@dataclass
class Arrival:
    t: float
    request_id: str | None
    body: dict


@dataclass
class FakeOpenAIServer:
    """`token_delay_s` between tokens, `first_token_delay_s` before the first one."""

    token_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    tokenize: bool = True  # False: no /tokenize or /detokenize, as most OpenAI-compatible servers that are not vLLM
    arrivals: list[Arrival] = field(default_factory=list)
    url: str = ""
    _vocab: dict[str, int] = field(default_factory=dict)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/completions", self._completions)
            app.router.add_post("/v1/chat/completions", self._completions)
            if self.tokenize:
                app.router.add_post("/tokenize", self._tokenize)
                app.router.add_post("/detokenize", self._detokenize)
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()
            # After stop(): end the handlers the runner's cleanup left behind (a stream whose client hung up), so
            # they are not destroyed pending when the interpreter exits.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # ---- tokenizer ------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return [self._vocab.setdefault(w, len(self._vocab) + 10) for w in text.split()]

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        ids = self._ids(body["prompt"])
        if body.get("add_special_tokens", True):
            ids = [1, *ids]
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": 4096})

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        words = {i: w for w, i in self._vocab.items()}
        return web.json_response({"prompt": " ".join(words[i] for i in body["tokens"] if i in words)})

    # ---- generation -----------------------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        t = time.monotonic()
        body = await request.json()
        self.arrivals.append(Arrival(t, request.headers.get("X-Request-Id"), body))
        chat = "messages" in body
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        n = int(body.get("max_tokens", 16))
        usage = {"prompt_tokens": len(self._ids(prompt)) + 1, "completion_tokens": n,
                 "total_tokens": len(self._ids(prompt)) + 1 + n}
        if "FAIL" in prompt:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        if "HANG" in prompt:
            await asyncio.sleep(3600)
        if not body.get("stream"):
            await asyncio.sleep(self.first_token_delay_s + self.token_delay_s * (n - 1))
            text = TOKEN_TEXT * n
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return web.json_response({"id": "x", "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": ping\r\n\r\n")
        for i in range(n):
            await asyncio.sleep(self.first_token_delay_s if i == 0 else self.token_delay_s)
            choice = {"index": 0, "delta": {"content": TOKEN_TEXT}} if chat else {"index": 0, "text": TOKEN_TEXT}
            data = json.dumps({"id": "x", "choices": [choice], "usage": None}, ensure_ascii=False)
            # Split the JSON over two data: lines (joined by "\n" per SSE, still valid JSON).
            cut = data.index(",")
            event = f"data: {data[:cut + 1]}\r\ndata: {data[cut + 1:]}\r\n\r\n".encode()
            mid = event.index(TOKEN_TEXT.encode()) + 1  # inside "é"
            await resp.write(event[:mid])
            await resp.write(event[mid:])
            if "CUT" in prompt:
                assert request.transport is not None
                request.transport.close()
                return resp
        await resp.write(f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\r\n\r\n".encode())
        await resp.write(b"data: [DONE]\r\n\r\n")
        await resp.write_eof()
        return resp


@pytest.fixture
def fake_openai_server() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer().start()
    yield server
    server.stop()
