"""Forward one OpenAI request to its backend and the answer back, streaming SSE chunk by chunk.

The upstream response is closed (not returned to the pool) whenever the client goes away or anything fails,
so the engine sees the disconnect and aborts the generation instead of finishing it for nobody.

A stream that breaks off (the engine died, stalled past the read timeout, or ended without `data: [DONE]`) ends
with one SSE error event and a chunked body left unfinished. A clean end would be wrong: OpenAI clients take a
stream that ends cleanly for a complete answer, [DONE] or not. The error event is what SSE readers (the openai
package) raise on; the broken body is what plain HTTP clients raise on.

Compressed answers are decoded, not passed through. The router asks engines for `Accept-Encoding: identity` (on
one host or one rack, compression costs CPU and saves nothing); an engine that compresses anyway gets its gzip or
deflate (br and zstd when their packages are installed) decoded by the HTTP client and relayed without
`Content-Encoding`. The router has to read a stream, to see [DONE] and to append an error event, which it cannot
do inside compressed bytes; and the client never asked for the engine's coding. A coding the router cannot
decode is relayed untouched with its header, and such a stream ends as the engine ends it.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

# Headers that describe one hop, or that aiohttp computes itself for the new message.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                "transfer-encoding", "upgrade", "content-length", "host"}
# The router's credentials are not the engine's; the router has read the whole body already, so nothing to expect;
# and it picks the engine's coding itself (identity).
_CLIENT_ONLY_HEADERS = _HOP_HEADERS | {"authorization", "cookie", "expect", "accept-encoding", "content-encoding"}
# Codings after which aiohttp's client (auto_decompress) hands over plain bytes; br and zstd raise when their
# package is missing, and anything else comes through still encoded.
_PLAIN_CODINGS = {"gzip", "deflate", "br", "zstd", "identity"}
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

    def event_separator(self) -> bytes:
        """What to write so that a new SSE event starts after the bytes seen so far."""
        if self._tail.endswith(b"\n\n") or self._tail.endswith(b"\r\n\r\n"):
            return b""
        return b"\n" if self._tail.endswith(b"\n") else b"\n\n"


def error_body(message: str, err_type: str, code: str | int) -> dict:
    return {"error": {"message": message, "type": err_type, "code": code}}


def error_response(status: int, message: str, err_type: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An error in OpenAI's JSON form, so OpenAI clients show the message instead of a parse failure."""
    return web.json_response(error_body(message, err_type, code if code is not None else status), status=status,
                             headers=headers)


def backend_down(model: str, url: str, detail: str) -> web.Response:
    return error_response(503, f"backend for model {model!r} at {url} is unavailable ({detail}); retry shortly",
                          "service_unavailable", "backend_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def upstream_failure(model: str, url: str, exc: BaseException, timeout: aiohttp.ClientTimeout) -> web.Response:
    """The answer for a request whose engine failed before the router sent the client anything."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return backend_down(model, url, f"no connection within {timeout.connect:g} s "
                                        "(router.connect_timeout_seconds)")
    if isinstance(exc, asyncio.TimeoutError):
        return error_response(504, f"backend for model {model!r} at {url} {_timeout_detail(exc, timeout)}",
                              "service_unavailable", "backend_timeout", headers={"Retry-After": str(RETRY_AFTER_S)})
    return backend_down(model, url, type(exc).__name__ + (f": {exc}" if str(exc) else ""))


def _timeout_detail(exc: BaseException, timeout: aiohttp.ClientTimeout) -> str:
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return (f"sent nothing for {timeout.sock_read:g} s (router.read_timeout_seconds; raise it if a long prompt's "
                "prefill takes longer)")
    return f"did not finish within {timeout.total:g} s (router.request_timeout_seconds)"


def _forward_headers(headers: Any, drop: set[str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in drop}


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
                  result: ForwardResult, timeout: aiohttp.ClientTimeout, model: str) -> web.StreamResponse:
    """POST `body` to `url`; relay status, headers and body. Raises aiohttp.ClientError or asyncio.TimeoutError
    before any byte is sent to the client (the caller answers with `upstream_failure`); after that, a failure of
    the engine ends the stream as a broken one, and a client that goes away raises."""
    headers = _forward_headers(request.headers, _CLIENT_ONLY_HEADERS)
    headers["Accept-Encoding"] = "identity"
    upstream = await session.post(url, data=body, headers=headers, timeout=timeout)
    body_read = False  # only a fully read upstream connection may go back to the pool
    try:
        result.status = upstream.status
        headers = _forward_headers(upstream.headers, _HOP_HEADERS)
        coding = upstream.headers.get("Content-Encoding", "").strip().lower()
        readable = not coding or coding in _PLAIN_CODINGS
        if readable:
            headers = _forward_headers(headers, {"content-encoding"})  # aiohttp decoded the body
        if not upstream.content_type.startswith("text/event-stream"):
            payload = await upstream.read()
            body_read = result.completed = True
            return web.Response(body=payload, status=upstream.status, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        result.response = response
        done = DoneWatcher()
        failure: BaseException | None = None
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                failure = e
                break
            if not chunk:
                body_read = True
                break
            await response.write(chunk)  # raises once the client has gone: the finally closes upstream
            if readable and done.feed(chunk):
                result.completed = True
        if done.seen or (not readable and failure is None):
            # The client has the whole answer, even if the engine lingered or stalled after [DONE].
            await response.write_eof()
            result.completed = True
            return response
        if readable:
            code = "backend_timeout" if isinstance(failure, asyncio.TimeoutError) else "backend_disconnected"
            event = error_body(_break_message(model, failure, timeout), "server_error", code)
            await response.write(done.event_separator() + b"data: " + json.dumps(event).encode() + b"\n\n")
        _break_body(request)
        return response
    finally:
        if body_read:
            upstream.release()
        else:
            upstream.close()


def _break_message(model: str, failure: BaseException | None, timeout: aiohttp.ClientTimeout) -> str:
    if failure is None:
        what = "ended the stream without `data: [DONE]`"
    elif isinstance(failure, asyncio.TimeoutError):
        what = _timeout_detail(failure, timeout)
    else:
        what = "closed the connection mid-answer (" + type(failure).__name__ + (f": {failure}" if str(failure) else "")
        what += "); its log says why"
    return f"the engine for model {model!r} {what}: the answer is incomplete, retry the request"


def _break_body(request: web.Request) -> None:
    """End the connection without the chunked body's last chunk, so HTTP clients see an incomplete answer.

    close(), not abort(): it sends what is buffered (the error event) first. aiohttp's own end of the body then
    finds the transport closing and gives up quietly."""
    transport = request.transport
    if transport is not None:
        transport.close()


def parse_body(raw: bytes) -> tuple[dict | None, web.Response | None]:
    """The request's JSON object, or the 400 that says what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return None, error_response(400, f"request body is not valid JSON: {e}", "invalid_request_error",
                                    "invalid_json")
    except RecursionError:
        return None, error_response(400, "request body is nested too deeply to parse: flatten it",
                                    "invalid_request_error", "invalid_json")
    if not isinstance(data, dict):
        return None, error_response(400, "request body must be a JSON object", "invalid_request_error",
                                    "invalid_json")
    return data, None
