"""A no-op OpenAI-compatible server that records when each request arrives (time.monotonic).

It answers /v1/completions and /v1/chat/completions at once with canned tokens, streamed or not, so a
load generator can be measured where its requests land, with no model in the way. It runs in its own
process (`python -m kvlab.bench.noop_server`) so the client's event loop and the server's never share a
thread; time.monotonic is system-wide on Linux, so its stamps compare with the client's.

  GET  /arrivals   JSON list of [monotonic_s, X-Request-Id or null], in arrival order
  POST /reset      forget the arrivals
  GET  /v1/models  one model, "noop"
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from aiohttp import web

MODEL = "noop"


def make_app() -> web.Application:
    arrivals: list[tuple[float, str | None]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        # Stamp before reading the body: the arrival is when the request reached the server.
        arrivals.append((time.monotonic(), request.headers.get("X-Request-Id")))
        body = await request.json()
        chat = "messages" in body
        n = max(1, int(body.get("max_tokens") or 1))
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": "x" * n}} if chat else \
                {"index": 0, "text": "x" * n}
            return web.json_response({"id": "noop", "object": "text_completion", "model": MODEL,
                                      "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        choice = {"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"}
        token = b"data: " + json.dumps({"id": "noop", "model": MODEL, "choices": [choice]}).encode() + b"\n\n"
        tail = b"data: " + json.dumps({"id": "noop", "model": MODEL, "choices": [], "usage": usage}).encode() \
            + b"\n\ndata: [DONE]\n\n"
        await resp.write(token * n + tail)
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def get_arrivals(request: web.Request) -> web.Response:
        return web.json_response(arrivals)

    async def reset(request: web.Request) -> web.Response:
        arrivals.clear()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/arrivals", get_arrivals)
    app.router.add_post("/reset", reset)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.bench.noop_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    args = parser.parse_args(argv)

    import asyncio

    async def serve() -> None:
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        # The parent reads this line to learn the port.
        print(f"listening on http://{args.host}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        # uvloop when present: the server must not be the bottleneck of the generator it measures.
        import uvloop
        run_loop = uvloop.run
    except ImportError:
        run_loop = asyncio.run
    try:
        run_loop(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
