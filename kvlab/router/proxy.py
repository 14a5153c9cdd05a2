"""Forward one OpenAI request to its backend and the answer back, streaming SSE chunk by chunk.

The upstream response is closed (not returned to the pool) whenever the client goes away or anything fails,
so the engine sees the disconnect and aborts the generation instead of finishing it for nobody.
"""
from __future__ import annotations

import json
from typing import Any

import aiohttp
from aiohttp import web

# Headers that describe one hop, or that aiohttp computes itself for the new message.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                "transfer-encoding", "upgrade", "content-length", "host", "content-encoding"}
RETRY_AFTER_S = 5


class DoneWatcher:
    """Sees OpenAI's end-of-stream event `data: [DONE]` go by in relayed SSE bytes, even split across chunks.

    Clients (the openai package among them) hang up as soon as they read it, often before the engine has ended
    the HTTP body, so a stream counts as complete once it has been relayed. It is matched at the start of a line:
    generated text can contain the words, but its JSON never holds a raw newline.
    """

    _EVENT = b"\ndata: [DONE]"

    def __init__(self) -> None:
        self.seen = False
        self._tail = b"\n"  # the stream starts a line

    def feed(self, chunk: bytes) -> bool:
        window = self._tail + chunk
        self.seen = self.seen or self._EVENT in window
        self._tail = window[-len(self._EVENT):]
        return self.seen


def error_response(status: int, message: str, err_type: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An error in OpenAI's JSON form, so OpenAI clients show the message instead of a parse failure."""
    body = {"error": {"message": message, "type": err_type, "code": code if code is not None else status}}
    return web.json_response(body, status=status, headers=headers)


def backend_down(model: str, url: str, detail: str) -> web.Response:
    return error_response(503, f"backend for model {model!r} at {url} is unavailable ({detail}); retry shortly",
                          "service_unavailable", "backend_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}


class ForwardResult:
    """What the traffic monitor needs to know about one forwarded request."""

    __slots__ = ("status", "completed", "response")

    def __init__(self) -> None:
        self.status = 0
        self.completed = False  # the whole answer (for a stream: up to [DONE]) reached the client
        self.response: web.StreamResponse | None = None  # set once headers went out: no error reply is possible

    @property
    def success(self) -> bool:
        return self.completed and self.status < 400


async def forward(request: web.Request, session: aiohttp.ClientSession, url: str, body: bytes,
                  result: ForwardResult, timeout: aiohttp.ClientTimeout | None = None) -> web.StreamResponse:
    """POST `body` to `url`; relay status, headers and body. Raises aiohttp.ClientError before any byte is sent
    to the client (the caller answers 503); after that, errors end the stream."""
    upstream = await session.post(url, data=body, headers=_forward_headers(request.headers),
                                  timeout=timeout or aiohttp.ClientTimeout(total=None, sock_connect=10))
    body_read = False  # only a fully read upstream connection may go back to the pool
    try:
        result.status = upstream.status
        headers = _forward_headers(upstream.headers)
        if not upstream.content_type.startswith("text/event-stream"):
            payload = await upstream.read()
            body_read = result.completed = True
            return web.Response(body=payload, status=upstream.status, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        result.response = response
        done = DoneWatcher()
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)  # raises once the client has gone: the finally closes upstream
            if done.feed(chunk):
                result.completed = True
        body_read = True
        await response.write_eof()
        result.completed = True
        return response
    finally:
        if body_read:
            upstream.release()
        else:
            upstream.close()


def parse_body(raw: bytes) -> tuple[dict | None, web.Response | None]:
    """The request's JSON object, or the 400 that says what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return None, error_response(400, f"request body is not valid JSON: {e}", "invalid_request_error",
                                    "invalid_json")
    if not isinstance(data, dict):
        return None, error_response(400, "request body must be a JSON object", "invalid_request_error",
                                    "invalid_json")
    return data, None
