"""A no-op OpenAI-compatible server: answers at once (or as slowly as asked), so what is measured is the client or
the router in front of it, never a model.

    python -m kvlab.bench.noop_server [--port N] [--model NAME] [--kv-instance NAME]

It stamps each request's arrival with time.monotonic() (system-wide on Linux, so comparable with a client's stamps
in another process) and streams `max_tokens` chunks `t0 t1 ...`, with a usage chunk when the request asks for it
(`stream_options.include_usage`), as vLLM does. Extra body fields help tests play an engine that misbehaves:

  noop_chunk_delay        seconds between chunks (hold a stream open, watch it being cancelled)
  noop_linger_after_done  keep the body open this long after `data: [DONE]`, as a slow engine can
  noop_die_after          drop the connection after this many chunks, the body left unfinished (a crashed engine)
  noop_stall_after        send nothing more after this many chunks until the client goes away (a hung engine;
                          0 stalls before the headers)
  noop_skip_done          end the stream cleanly but without `data: [DONE]`
  noop_encoding           answer in this content coding: `gzip` or `deflate` (a stream chunk by chunk), or any
                          other name to label the body with a coding nobody can decode (it stays plain)

With --kv-instance it also answers GET /kvcached/stats like a kvcached engine would (the router's `kv` sleep level
reads it).

  GET  /arrivals     JSON list of [monotonic_s, X-Request-Id or null], in arrival order
  POST /reset        forget the arrivals
  GET  /noop/stats   requests, finished streams, streams cut off by the client, streams that died on purpose,
                     streams active and the most ever active at once
  GET  /v1/models    the one model
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import zlib
from typing import Any

from aiohttp import web

DEFAULT_MODEL = "noop"


class NoopServer:
    """The no-op server's state and its aiohttp app."""

    def __init__(self, model: str = DEFAULT_MODEL, kv_instance: str | None = None) -> None:
        self.model = model
        self.kv_instance = kv_instance
        self.arrivals: list[tuple[float, str | None]] = []
        self.stats = {"requests": 0, "streams_finished": 0, "streams_cancelled": 0, "streams_died": 0, "active": 0,
                      "active_peak": 0}
        self.last_headers: dict[str, str] = {}  # what the last request carried, to see what a proxy forwards

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/arrivals", self.get_arrivals)
        app.router.add_post("/reset", self.reset)
        app.router.add_get("/noop/stats", self.noop_stats)
        app.router.add_get("/kvcached/stats", self.kvcached_stats)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def get_arrivals(self, request: web.Request) -> web.Response:
        return web.json_response(self.arrivals)

    async def reset(self, request: web.Request) -> web.Response:
        self.arrivals.clear()
        return web.json_response({"ok": True})

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

    def _chunk(self, body: dict, text: str, chat: bool, final: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if final else None}
        if chat:
            choice["delta" if body.get("stream") else "message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": "noop-1", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": body.get("model", self.model), "choices": [choice]}

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        # Stamp before reading the body: the arrival is when the request reached the server.
        self.arrivals.append((time.monotonic(), request.headers.get("X-Request-Id")))
        self.last_headers = dict(request.headers)
        body = await request.json()
        self.stats["requests"] += 1
        n = max(1, int(body.get("max_tokens") or 1))
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        coding = body.get("noop_encoding")
        if not body.get("stream"):
            out = self._chunk(body, " ".join(f"t{i}" for i in range(n)), chat, True)
            out["usage"] = usage
            if coding:
                encoder = _encoder(coding)
                payload = json.dumps(out).encode()
                if encoder is not None:
                    payload = encoder.compress(payload) + encoder.flush()
                return web.Response(body=payload, content_type="application/json",
                                    headers={"Content-Encoding": coding})
            return web.json_response(out)
        delay = float(body.get("noop_chunk_delay") or 0.0)
        die_after = body.get("noop_die_after")
        stall_after = body.get("noop_stall_after")
        chunks = [b"data: " + json.dumps(self._chunk(body, f"t{i}", chat, i == n - 1)).encode() + b"\n\n"
                  for i in range(n)]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(b"data: " + json.dumps({"id": "noop-1", "model": body.get("model", self.model),
                                                   "choices": [], "usage": usage}).encode() + b"\n\n")
        if not body.get("noop_skip_done"):
            chunks.append(b"data: [DONE]\n\n")
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if coding:
            headers["Content-Encoding"] = coding
            encoder = _encoder(coding)
            if encoder is not None:
                # A sync flush after each chunk keeps every chunk decodable on arrival, as a compressing proxy does.
                chunks = [encoder.compress(c) + encoder.flush(zlib.Z_SYNC_FLUSH) for c in chunks]
                chunks[-1] += encoder.flush()
        response = web.StreamResponse(headers=headers)
        self.stats["active"] += 1
        self.stats["active_peak"] = max(self.stats["active_peak"], self.stats["active"])
        try:
            if stall_after == 0:  # before the headers, as an engine stuck in a long prefill
                await asyncio.Event().wait()
            await response.prepare(request)
            if delay or die_after is not None or stall_after is not None:
                for i, chunk in enumerate(chunks):
                    if i == die_after:
                        if request.transport is not None:  # no final chunk: the body is cut off, as when an engine dies
                            request.transport.abort()
                        self.stats["streams_died"] += 1
                        return response
                    if i == stall_after:
                        await asyncio.Event().wait()  # until the client hangs up (handler cancellation)
                    await asyncio.sleep(delay)
                    await response.write(chunk)
            else:  # one write: at 1000 req/s the server must not be the bottleneck of what it measures
                await response.write(b"".join(chunks))
            await asyncio.sleep(float(body.get("noop_linger_after_done") or 0.0))
            await response.write_eof()
            self.stats["streams_finished"] += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.stats["streams_cancelled"] += 1
            raise
        finally:
            self.stats["active"] -= 1
        return response


def _encoder(coding: str) -> Any:
    """A compressor for an HTTP content coding; None for a coding this server only labels its body with."""
    if coding == "gzip":
        return zlib.compressobj(wbits=31)  # 31: the gzip container
    if coding == "deflate":
        return zlib.compressobj(wbits=15)  # HTTP's deflate is the zlib container
    return None


async def start_noop_server(host: str, port: int, model: str = DEFAULT_MODEL,
                            kv_instance: str | None = None) -> tuple[web.AppRunner, NoopServer]:
    """Start it on the running loop (tests); returns the runner to clean up and the server for its stats."""
    server = NoopServer(model, kv_instance)
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, server


class NoopServerProcess:
    """The no-op server in a child process (benchmarks: its event loop never shares a thread with the client's);
    stopped on exit."""

    def __init__(self, model: str = DEFAULT_MODEL) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvlab.bench.noop_server", "--port", "0",
                                      "--model", model], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"no-op server did not start: {line!r} {self.proc.stderr.read()[-2000:]!r}")
        self.url = line.split("listening on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def _call(self, method: str, path: str) -> Any:
        import urllib.request

        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)

    def reset(self) -> None:
        self._call("POST", "/reset")

    def arrivals(self) -> list[float]:
        return [t for t, _ in self._call("GET", "/arrivals")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "NoopServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.bench.noop_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--kv-instance", default=None, help="answer /kvcached/stats as this kvcached engine")
    args = parser.parse_args(argv)
    server = NoopServer(args.model, args.kv_instance)

    async def serve() -> None:
        runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
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
