"""Plain-HTTP helpers for OpenAI-compatible servers: readiness, completions, a batch of prompts.

Standard library only (urllib plus threads), so it works the same in a script and inside a running
Jupyter event loop, and never imports vLLM.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Protocol, Sequence, Union


class ServerLike(Protocol):
    """What send_requests needs of a server object (VLLMServer has it)."""

    name: str

    @property
    def url(self) -> str: ...

    @property
    def model_name(self) -> str: ...


Target = Union[str, ServerLike]


def root_url(url: str) -> str:
    """`http://h:p`, whether given `http://h:p`, `http://h:p/` or `http://h:p/v1`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class HTTPStatusError(RuntimeError):
    """The server answered with an error status; `status` and the start of the body are kept."""

    def __init__(self, url: str, status: int, body: str) -> None:
        super().__init__(f"POST {url} failed with HTTP {status}: {body}")
        self.status = status
        self.body = body


def get_json(url: str, timeout: float = 10.0, token: str | None = None) -> Any:
    """GET a JSON document; `token` goes as `Authorization: Bearer` (a router on a non-local address needs it)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        return json.load(resp)


def post_json(url: str, payload: dict, timeout: float = 300.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        raise HTTPStatusError(url, e.code, e.read().decode(errors="replace")[:2000]) from None


def is_ready(url: str, timeout: float = 2.0) -> bool:
    """True when GET /v1/models answers 200 (vLLM answers only once the engine is up)."""
    try:
        with urllib.request.urlopen(root_url(url) + "/v1/models", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_ready(url: str, timeout: float = 600.0, interval: float = 1.0) -> float:
    """Poll until the server answers; return the seconds waited. TimeoutError names the URL."""
    start = time.monotonic()
    while not is_ready(url):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{root_url(url)} not ready after {timeout:.0f} s: is the server running?")
        time.sleep(interval)
    return time.monotonic() - start


def served_model(url: str) -> str:
    """The first model id the server lists (a vLLM server serves one)."""
    models = get_json(root_url(url) + "/v1/models")["data"]
    if not models:
        raise RuntimeError(f"{root_url(url)}/v1/models lists no model")
    return models[0]["id"]


def complete(url: str, model: str, prompt: str, max_tokens: int = 16, temperature: float = 0.0,
             timeout: float = 300.0) -> str:
    """Text of one /v1/completions choice."""
    out = post_json(root_url(url) + "/v1/completions",
                    {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature},
                    timeout=timeout)
    return out["choices"][0]["text"]


def chat(url: str, model: str, messages: Sequence[dict], max_tokens: int = 16, temperature: float = 0.0,
         timeout: float = 300.0) -> str:
    """Content of one /v1/chat/completions choice."""
    out = post_json(root_url(url) + "/v1/chat/completions",
                    {"model": model, "messages": list(messages), "max_tokens": max_tokens,
                     "temperature": temperature}, timeout=timeout)
    return out["choices"][0]["message"]["content"] or ""


def _resolve(target: Target) -> tuple[str, str, str]:
    """(name, url, model) for a server object or a URL."""
    if isinstance(target, str):
        url = root_url(target)
        return url, url, served_model(url)
    return target.name, root_url(target.url), target.model_name


def send_requests(servers_or_urls: Target | Iterable[Target], prompts: Sequence[str], max_tokens: int = 32,
                  temperature: float = 0.0, concurrency: int = 8) -> dict[str, list[str]]:
    """Send every prompt to every server, concurrently; completions per server name, in prompt order.

    A server object is keyed by its `.name`, a URL by itself.
    """
    targets = [servers_or_urls] if isinstance(servers_or_urls, str) or hasattr(servers_or_urls, "url") \
        else list(servers_or_urls)
    resolved = [_resolve(t) for t in targets]
    names = [name for name, _, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"servers must have distinct names, got {names}")
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {name: [pool.submit(complete, url, model, p, max_tokens, temperature) for p in prompts]
                   for name, url, model in resolved}
        return {name: [f.result() for f in fs] for name, fs in futures.items()}
