"""The router's settings (the `router:` and `sleep_manager:` sections of a fleet file), with their defaults.

The fleet file's parser (kvlab.engines.fleet_config) validates the YAML and builds these; the router, its sleep
manager and tests build them directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SLEEP_LEVELS = ("kv", "engine", "stop")
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Between two chunks of an answer, and before its first: a long prompt's prefill on a CPU can take minutes.
DEFAULT_READ_TIMEOUT_S = 600.0
DEFAULT_MAX_CONCURRENT_PER_BACKEND = 256


def _positive_seconds(value: object, key: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        allowed = "a finite number of seconds > 0" + (" or None (no limit)" if optional else "")
        raise ValueError(f"router.{key} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class RouterSettings:
    enable_router: bool = True
    router_port: int = 8080
    router_host: str = "127.0.0.1"
    api_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    traffic_window_seconds: float = 60.0
    request_timeout_seconds: float | None = None  # None: a generation may take as long as it takes
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_seconds: float | None = DEFAULT_READ_TIMEOUT_S  # None: wait for an engine's next byte forever
    # Past this many requests in flight to one engine, more wait in the router for a slot (never dropped).
    max_concurrent_per_backend: int = DEFAULT_MAX_CONCURRENT_PER_BACKEND

    def __post_init__(self) -> None:
        _positive_seconds(self.request_timeout_seconds, "request_timeout_seconds", optional=True)
        _positive_seconds(self.connect_timeout_seconds, "connect_timeout_seconds", optional=False)
        _positive_seconds(self.read_timeout_seconds, "read_timeout_seconds", optional=True)
        cap = self.max_concurrent_per_backend
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"router.max_concurrent_per_backend must be a whole number >= 1, got {cap!r}")


@dataclass(frozen=True)
class SleepSettings:
    idle_threshold_seconds: float = 300.0
    check_interval_seconds: float = 60.0
    auto_sleep_enabled: bool = False
    wakeup_on_request: bool = True
    # Anti-flapping: auto-sleep leaves a model awake at least this long after it woke, so a model that is
    # asleep far shorter than this never pays a sleep+wake cycle for nothing. Requests and manual calls act at once.
    min_sleep_duration: float = 60.0
    sleep_level: str | None = None  # None: each engine's default (kvlab.router.sleep.default_sleep_level)
    drain_timeout_seconds: float = 30.0  # how long a sleep waits for the model's requests in flight
