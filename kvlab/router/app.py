"""The router: one OpenAI-compatible address in front of many engines, routing by the request's `model`.

Endpoints are the multi-LLM controller's (see docs/router.md). Model names in paths are URL-encoded
(`meta-llama%2FLlama-3.2-1B`); the routes take `{model:.+}` so a decoded slash still matches.

Who may call what: on a non-local bind every endpoint but `/health` needs the token. On a loopback bind any local
program may call, but not a web page: a browser sends any page's requests to 127.0.0.1 too, so a foreign `Origin`
or a `Host` that is not this machine's loopback name (DNS rebinding) is refused. Sleep and wake need the token
whenever one is configured.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import os
import re
import time
from typing import Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web

from kvlab.router.backends import Backend
from kvlab.router.proxy import ForwardResult, backend_down, error_response, forward, parse_body, upstream_failure
from kvlab.router.settings import RouterSettings, SleepSettings
from kvlab.router.sleep import ModelAsleep, SleepError, SleepLevel, SleepManager
from kvlab.router.traffic import TrafficMonitor

log = logging.getLogger("kvlab.router")
TOKEN_ENV = "KVLAB_ROUTER_TOKEN"
ROUTER_KEY: web.AppKey["Router"] = web.AppKey("kvlab_router", object)  # type: ignore[arg-type]
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# A Host header or an Origin's authority: a name or an IPv4 address, or an IPv6 address in brackets; then a port.
_AUTHORITY = re.compile(r"(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[^:\[\]/@\s]+))(?::(?P<port>[0-9]{1,5}))?")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _utf8(text: str) -> bytes:
    # hmac.compare_digest refuses str with non-ASCII characters; surrogatepass also takes the lone surrogates
    # that stand for a header's undecodable bytes.
    return text.encode("utf-8", "surrogatepass")


def _authority(text: str) -> tuple[str, int | None] | None:
    """(host, port or None) of a Host header or an Origin's authority; None when it is not one."""
    m = _AUTHORITY.fullmatch(text.strip().lower())
    if m is None:
        return None
    return m["v6"] or m["name"], int(m["port"]) if m["port"] else None


class Router:
    """Backends by model, their traffic and sleep state, and the aiohttp app that serves them."""

    def __init__(self, backends: Iterable[Backend], settings: RouterSettings | None = None,
                 sleep_settings: SleepSettings | None = None, levels: dict[str, SleepLevel] | None = None,
                 gpu: bool | None = None) -> None:
        self.settings = settings or RouterSettings()
        self.sleep_settings = sleep_settings or SleepSettings()
        self.backends: dict[str, Backend] = {}
        for backend in backends:
            if backend.model in self.backends:
                raise ValueError(f"two backends serve model {backend.model!r}: give one --served-model-name")
            self.backends[backend.model] = backend
        self.traffic = TrafficMonitor(self.settings.traffic_window_seconds, self.sleep_settings.idle_threshold_seconds)
        for model in self.backends:
            self.traffic.register(model)
        self._session: aiohttp.ClientSession | None = None
        self.sleep = SleepManager(self.backends, self.traffic, self.sleep_settings, levels=levels,
                                  session=self.session, gpu=gpu)
        self.token = self.settings.api_token or os.environ.get(TOKEN_ENV) or None
        self.started = time.time()
        s = self.settings
        self._timeout = aiohttp.ClientTimeout(total=s.request_timeout_seconds, connect=s.connect_timeout_seconds,
                                              sock_read=s.read_timeout_seconds)
        # Requests past the cap wait here for a slot; the engine's own queue stays bounded.
        self._slots = {model: asyncio.Semaphore(s.max_concurrent_per_backend) for model in self.backends}
        self._require_token = False
        self._bind_host = "127.0.0.1"

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            raise RuntimeError("the router's HTTP session exists only while the app runs (after startup)")
        return self._session

    def check_bind(self, host: str) -> None:
        """Refuse to listen on a non-local address without a token."""
        if not is_loopback(host) and not self.token:
            raise SystemExit(f"refusing to bind the router to {host} without an API token: set router.api_token "
                             f"in the fleet file or {TOKEN_ENV}, or bind 127.0.0.1")

    # ---- app -------------------------------------------------------------------------------------------
    def build_app(self, host: str = "127.0.0.1") -> web.Application:
        self.check_bind(host)
        self._require_token = not is_loopback(host)
        self._bind_host = host.strip("[]").lower()
        # The body limit is enforced while reading (a JSON 413); aiohttp's own check would answer in plain text.
        app = web.Application(client_max_size=self.settings.max_body_bytes + 1,
                              middlewares=[self._errors_in_openai_form, self._guard])
        app[ROUTER_KEY] = self
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        r = app.router
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_get("/v1/models", self.v1_models)
        r.add_get("/health", self.health)
        r.add_get("/health/all", self.health_all)
        r.add_get("/health/{model:.+}", self.health_model)
        r.add_get("/models", self.models)
        r.add_get("/traffic/stats", self.traffic_stats)
        r.add_get("/traffic/stats/model/{model:.+}", self.traffic_model)
        r.add_get("/traffic/idle", self.traffic_idle)
        r.add_get("/traffic/active", self.traffic_active)
        r.add_get("/sleep/status", self.sleep_status)
        r.add_get("/sleep/candidates", self.sleep_candidates)
        r.add_post("/sleep/model/{model:.+}", self.sleep_model)
        r.add_post("/wake/model/{model:.+}", self.wake_model)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        # One pool for all backends, no connection cap of its own: the per-backend slots bound what each engine gets.
        # auto_decompress: an engine that compresses anyway is decoded (see kvlab.router.proxy).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=True)
        self.sleep.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.sleep.close()
        if self._session:
            await self._session.close()

    # ---- middlewares: errors in OpenAI's form, who may call ---------------------------------------------
    @web.middleware
    async def _errors_in_openai_form(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp answers a wrong method or path in plain text, which OpenAI clients cannot parse."""
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as e:
            allowed = ", ".join(sorted(e.allowed_methods))
            return error_response(405, f"{request.method} is not allowed on {request.path}: use {allowed}",
                                  "invalid_request_error", "method_not_allowed", headers={"Allow": allowed})
        except web.HTTPNotFound:
            return error_response(404, f"the router has no endpoint {request.method} {request.path} "
                                  "(docs/router.md lists them)", "invalid_request_error", "unknown_url")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(e.status, e.text or e.reason, "invalid_request_error",
                                  e.reason.lower().replace(" ", "_"))

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._require_token:
            if request.path != "/health" and not self._token_matches(request):
                return self._token_required(f"the router listens on {self._bind_host}: every endpoint but /health "
                                            "needs `Authorization: Bearer <token>`")
        else:
            refused = self._forged_by_a_web_page(request)
            if refused:
                return error_response(403, refused, "permission_error", "forbidden")
        return await handler(request)

    def _local_port(self, request: web.Request) -> int | None:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None

    def _forged_by_a_web_page(self, request: web.Request) -> str | None:
        """Why a request to the loopback router looks sent by a web page, or None.

        Programs send no Origin and name this machine in Host. A page on another site sends its Origin; a page
        whose own domain was rebound to 127.0.0.1 sends that domain as the Host (and, being same-origin, no
        foreign Origin). Host's port is not checked, so a tunnel (`ssh -L 9000:127.0.0.1:8080`) still works;
        an Origin must then name the address the client used."""
        names = (*LOOPBACK_NAMES, self._bind_host)
        host = request.headers.get("Host")
        addressed_port = self._local_port(request)
        if host is not None:
            authority = _authority(host)
            if authority is None or authority[0] not in names:
                return (f"Host {host!r} is not this machine: call the router as 127.0.0.1, localhost or [::1] "
                        "(a web page that rebinds its own domain to this machine is refused)")
            addressed_port = authority[1] or 80
        origin = request.headers.get("Origin")
        if origin is not None:
            scheme, sep, rest = origin.partition("://")
            authority = _authority(rest) if sep and scheme.lower() == "http" else None
            if authority is None or authority[0] not in names or (authority[1] or 80) != addressed_port:
                return (f"requests from web pages are refused (Origin {origin!r} is not this router): call the "
                        "router from a program, or set router.api_token and bind a non-local address")
        return None

    def _token_matches(self, request: web.Request) -> bool:
        if not self.token:
            return False
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_utf8(given.strip()), _utf8(self.token))

    def _token_required(self, why: str) -> web.Response:
        return error_response(401, f"{why} (router.api_token or {TOKEN_ENV})", "authentication_error",
                              "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ---- OpenAI endpoints ------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/v1/completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "/v1/chat/completions")

    async def _read_body(self, request: web.Request) -> bytes | None:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > limit:
                return None
        return bytes(data)

    def _unknown_model(self, model: str) -> web.Response:
        known = ", ".join(sorted(self.backends)) or "none"
        return error_response(404, f"model {model!r} is not served here; known models: {known}",
                              "invalid_request_error", "model_not_found")

    async def _proxy(self, request: web.Request, path: str) -> web.StreamResponse:
        raw = await self._read_body(request)
        if raw is None:
            return error_response(413, f"request body is larger than {self.settings.max_body_bytes} bytes "
                                  "(router.max_body_bytes)", "invalid_request_error", "request_too_large")
        data, bad = parse_body(raw)
        if bad is not None:
            return bad
        model = data.get("model")
        if not isinstance(model, str) or not model:
            return error_response(400, "request has no `model` field: name one of " + ", ".join(sorted(self.backends)),
                                  "invalid_request_error", "model_required")
        backend = self.backends.get(model)
        if backend is None:
            return self._unknown_model(model)
        started = self.traffic.request_started(model)
        result = ForwardResult()
        try:
            async with self.sleep.admit(model), self._slots[model]:
                return await forward(request, self.session(), backend.url + path, raw, result, self._timeout, model)
        except ModelAsleep as e:
            return error_response(503, str(e), "service_unavailable", "model_asleep", headers={"Retry-After": "5"})
        except SleepError as e:
            return backend_down(model, backend.url, str(e))
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError) as e:
            if result.response is not None:
                return result.response  # the stream had begun and the client went away mid-answer
            return upstream_failure(model, backend.url, e, self._timeout)
        finally:
            self.traffic.request_finished(model, started, result.success)

    async def v1_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": int(self.started), "owned_by": "kvlab",
                 "root": b.name} for m, b in self.backends.items()]
        return web.json_response({"object": "list", "data": data})

    # ---- health and introspection ----------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy", "models": len(self.backends),
                                  "uptime_seconds": time.time() - self.started})

    async def _backend_health(self, backend: Backend) -> dict:
        out = {"model": backend.model, "name": backend.name, "url": backend.url,
               "sleep_state": self.sleep.state(backend.model)}
        if self.sleep.is_sleeping(backend.model):
            out["status"] = "sleeping"  # a request wakes it; the engine may be stopped by design
            return out
        try:
            async with self.session().get(backend.url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                out["status"] = "healthy" if resp.status == 200 else "unhealthy"
                if resp.status != 200:
                    out["detail"] = f"GET /health answered {resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            out["status"] = "unhealthy"
            out["detail"] = type(e).__name__ + (f": {e}" if str(e) else "")
        return out

    def _model_from_path(self, request: web.Request) -> str:
        return request.match_info["model"]

    async def health_model(self, request: web.Request) -> web.Response:
        model = self._model_from_path(request)
        backend = self.backends.get(model)
        if backend is None:
            return self._unknown_model(model)
        out = await self._backend_health(backend)
        return web.json_response(out, status=200 if out["status"] != "unhealthy" else 503)

    async def health_all(self, request: web.Request) -> web.Response:
        results = await asyncio.gather(*(self._backend_health(b) for b in self.backends.values()))
        healthy = sum(r["status"] != "unhealthy" for r in results)
        return web.json_response({"status": "healthy" if healthy == len(results) else "degraded",
                                  "healthy": healthy, "total": len(results),
                                  "models": {r["model"]: r for r in results}})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"model": m, "name": b.name, "url": b.url, "engine": b.engine, "kvcached": b.kvcached,
             "sleep_state": self.sleep.state(m), "sleep_level": self.sleep.status()["models"][m]["level"]}
            for m, b in self.backends.items()]})

    async def traffic_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.traffic.all_stats())

    async def traffic_model(self, request: web.Request) -> web.Response:
        model = self._model_from_path(request)
        if model not in self.backends:
            return self._unknown_model(model)
        return web.json_response({"model": model, "traffic_stats": self.traffic.model_stats(model)})

    def _threshold(self, request: web.Request) -> float | web.Response:
        raw = request.query.get("threshold")
        if raw is None:
            return self.sleep_settings.idle_threshold_seconds
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:  # NaN would make every comparison false
            return error_response(400, f"threshold={raw!r} is not a finite number of seconds >= 0",
                                  "invalid_request_error", "invalid_threshold")
        return value

    async def traffic_idle(self, request: web.Request) -> web.Response:
        threshold = self._threshold(request)
        if isinstance(threshold, web.Response):
            return threshold
        return web.json_response({"idle_models": self.traffic.idle_models(threshold), "threshold_seconds": threshold})

    async def traffic_active(self, request: web.Request) -> web.Response:
        threshold = self._threshold(request)
        if isinstance(threshold, web.Response):
            return threshold
        return web.json_response({"active_models": self.traffic.active_models(threshold),
                                  "threshold_seconds": threshold})

    # ---- sleep ----------------------------------------------------------------------------------------
    async def sleep_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.sleep.status())

    async def sleep_candidates(self, request: web.Request) -> web.Response:
        return web.json_response({"sleep_candidates": self.sleep.candidates(),
                                  "idle_threshold_seconds": self.sleep_settings.idle_threshold_seconds})

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """Sleep and wake need the token whenever one is configured, on a loopback bind too."""
        if not self.token or self._token_matches(request):
            return None
        return self._token_required("sleep and wake need `Authorization: Bearer <token>` when the router has a token")

    def _sleep_wake_target(self, request: web.Request) -> str | web.Response:
        """The model a sleep or wake call names, or the 401/404 that refuses it."""
        denied = self._unauthorized(request)
        if denied:
            return denied
        model = self._model_from_path(request)
        return model if model in self.backends else self._unknown_model(model)

    async def sleep_model(self, request: web.Request) -> web.Response:
        model = self._sleep_wake_target(request)
        if isinstance(model, web.Response):
            return model
        try:
            entry = await self.sleep.sleep(model, manual=True)
        except SleepError as e:
            return error_response(409, str(e), "invalid_request_error", "sleep_failed")
        return web.json_response({"message": f"model {model} is asleep", "model": model, **entry})

    async def wake_model(self, request: web.Request) -> web.Response:
        model = self._sleep_wake_target(request)
        if isinstance(model, web.Response):
            return model
        try:
            out = await self.sleep.wake(model, reason="manual")
        except SleepError as e:
            return error_response(503, str(e), "service_unavailable", "wake_failed", headers={"Retry-After": "5"})
        return web.json_response({"message": f"model {model} is awake", **out})


async def serve_app(app: web.Application, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set. Handler cancellation on: a client that hangs up cancels its upstream request."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        log.info("router listening on http://%s:%d", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
