"""Per-model request counts, rate, response time and idleness: what the sleep manager decides on.

Thread-safe (one lock), since benchmarks and tests read it from other threads while the router's event loop
writes it. Timestamps for rates use the monotonic clock; `last_activity_time` is wall-clock for people.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _ModelTraffic:
    registered_mono: float
    total: int = 0
    ok: int = 0
    failed: int = 0
    response_time_sum: float = 0.0
    last_activity_mono: float | None = None
    last_activity_wall: float | None = None
    in_flight: int = 0
    recent: deque = field(default_factory=deque)  # monotonic start times inside the rate window


class TrafficMonitor:
    """Counts requests per model; `idle_threshold` decides `is_idle` in the stats."""

    def __init__(self, window_seconds: float = 60.0, idle_threshold: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.window_seconds = window_seconds
        self.idle_threshold = idle_threshold
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._models: dict[str, _ModelTraffic] = {}

    def register(self, model: str) -> None:
        """Known models appear in the stats before their first request; their idle time counts from here."""
        with self._lock:
            self._models.setdefault(model, _ModelTraffic(registered_mono=self._clock()))

    def _get(self, model: str) -> _ModelTraffic:
        entry = self._models.get(model)
        if entry is None:
            entry = self._models[model] = _ModelTraffic(registered_mono=self._clock())
        return entry

    def request_started(self, model: str) -> float:
        """Mark a request's arrival (activity now); returns the start time to pass to request_finished."""
        now = self._clock()
        with self._lock:
            entry = self._get(model)
            entry.in_flight += 1
            entry.last_activity_mono = now
            entry.last_activity_wall = self._wall()
            entry.recent.append(now)
        return now

    def request_finished(self, model: str, started: float, success: bool) -> None:
        now = self._clock()
        with self._lock:
            entry = self._get(model)
            entry.in_flight = max(0, entry.in_flight - 1)
            entry.total += 1
            if success:
                entry.ok += 1
            else:
                entry.failed += 1
            entry.response_time_sum += now - started
            # A long generation is activity until its end, so the model is not idle while it streams.
            entry.last_activity_mono = now
            entry.last_activity_wall = self._wall()

    def idle_seconds(self, model: str) -> float:
        with self._lock:
            return self._idle(self._get(model), self._clock())

    def _idle(self, entry: _ModelTraffic, now: float) -> float:
        if entry.in_flight:
            return 0.0
        since = entry.last_activity_mono if entry.last_activity_mono is not None else entry.registered_mono
        return max(0.0, now - since)

    def in_flight(self, model: str) -> int:
        with self._lock:
            return self._get(model).in_flight

    def model_stats(self, model: str, idle_threshold: float | None = None) -> dict:
        threshold = self.idle_threshold if idle_threshold is None else idle_threshold
        now = self._clock()
        with self._lock:
            entry = self._get(model)
            while entry.recent and entry.recent[0] < now - self.window_seconds:
                entry.recent.popleft()
            idle = self._idle(entry, now)
            finished = entry.ok + entry.failed
            return {
                "total_requests": entry.total,
                "successful_requests": entry.ok,
                "failed_requests": entry.failed,
                "request_rate": len(entry.recent) / self.window_seconds,
                "avg_response_time": entry.response_time_sum / finished if finished else 0.0,
                "last_activity_time": entry.last_activity_wall,
                "idle_time_seconds": idle,
                "is_idle": idle >= threshold,
            }

    def models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def all_stats(self) -> dict:
        """The seed's shape: {"traffic_stats": {model: {...}}}."""
        return {"traffic_stats": {model: self.model_stats(model) for model in self.models()}}

    def idle_models(self, threshold: float) -> list[str]:
        return [m for m in self.models() if self.idle_seconds(m) >= threshold]

    def active_models(self, threshold: float) -> list[str]:
        return [m for m in self.models() if self.idle_seconds(m) < threshold]
