"""A no-op OpenAI-like backend: answers instantly (or as slowly as asked), so what is measured is the router.

    python -m kvlab.bench.noop_backend --port N [--model NAME]

`max_tokens` sets how many chunks a stream sends; an extra body field `noop_chunk_delay` (seconds) paces them,
which lets tests hold a stream open and watch it being cancelled; `noop_linger_after_done` (seconds) keeps the
body open after `data: [DONE]`, as a slow engine can, so a client that hangs up at [DONE] does so mid-body. GET /noop/stats counts requests, finished
streams and streams cut off by the client. With --kv-instance it also answers GET /kvcached/stats like a
kvcached engine would (the router's `kv` sleep level reads it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web


class NoopBackend:
    def __init__(self, model: str = "noop", kv_instance: str | None = None) -> None:
        self.model = model
        self.kv_instance = kv_instance
        self.stats = {"requests": 0, "streams_finished": 0, "streams_cancelled": 0, "active": 0}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/noop/stats", self.noop_stats)
        app.router.add_get("/kvcached/stats", self.kvcached_stats)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def noop_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def kvcached_stats(self, request: web.Request) -> web.Response:
        if not self.kv_instance:
            return web.json_response({"enabled": False, "instance": None, "instances": []})
        return web.json_response({"enabled": True, "instance": self.kv_instance})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    def _chunk(self, body: dict, i: int, chat: bool, final: bool) -> dict[str, Any]:
        text = f"t{i}"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if final else None}
        if chat:
            choice["delta" if body.get("stream") else "message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": "noop-1", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model", self.model), "choices": [choice]}

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.stats["requests"] += 1
        n = max(1, int(body.get("max_tokens") or 1))
        if not body.get("stream"):
            out = self._chunk(body, 0, chat, True)
            if chat:
                out["choices"][0]["message"]["content"] = " ".join(f"t{i}" for i in range(n))
            else:
                out["choices"][0]["text"] = " ".join(f"t{i}" for i in range(n))
            out["usage"] = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            return web.json_response(out)
        delay = float(body.get("noop_chunk_delay") or 0.0)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        self.stats["active"] += 1
        try:
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                chunk = self._chunk(body, i, chat, i == n - 1)
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await asyncio.sleep(float(body.get("noop_linger_after_done") or 0.0))
            await response.write_eof()
            self.stats["streams_finished"] += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.stats["streams_cancelled"] += 1
            raise
        finally:
            self.stats["active"] -= 1
        return response


async def start_noop_backend(host: str, port: int, model: str = "noop",
                             kv_instance: str | None = None) -> tuple[web.AppRunner, NoopBackend]:
    """Start it on the running loop (tests); returns the runner to clean up and the backend for its stats."""
    backend = NoopBackend(model, kv_instance)
    runner = web.AppRunner(backend.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.bench.noop_backend", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="noop")
    parser.add_argument("--kv-instance", default=None)
    args = parser.parse_args(argv)
    backend = NoopBackend(args.model, args.kv_instance)
    web.run_app(backend.app(), host=args.host, port=args.port, access_log=None, print=None,
                handler_cancellation=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
