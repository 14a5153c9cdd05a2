"""The router's settings (the `router:` and `sleep_manager:` sections of a fleet file), with their defaults.

The fleet file's parser (kvlab.engines.fleet_config) validates the YAML and builds these; the router, its sleep
manager and tests build them directly.
"""
from __future__ import annotations

from dataclasses import dataclass

SLEEP_LEVELS = ("kv", "engine", "stop")
DEFAULT_MAX_BODY_BYTES = 16 << 20


@dataclass(frozen=True)
class RouterSettings:
    enable_router: bool = True
    router_port: int = 8080
    router_host: str = "127.0.0.1"
    api_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    traffic_window_seconds: float = 60.0
    request_timeout_seconds: float | None = None  # None: a generation may take as long as it takes


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
