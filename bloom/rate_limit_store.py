"""The `memory://` rate-limit store: fixed-window counters in this process's memory.

A storage backend for the `limits` library (which Flask-Limiter runs on), registered
under its own scheme. The library's own MemoryStorage expires keys from a timer thread
that lives 10 ms and is started again by the next hit, so under traffic each gunicorn
worker starts ~100 threads a second, and every `Thread.start()` waits for the new thread
to get the GIL. That cost 20-30 % of task-creation throughput in bench/run.py
(docs/PERFORMANCE.md). This store expires a key when it is next touched and drops every
expired key at most once a second, inline: no threads, and memory bounded by the client
addresses seen in the last window.

Counters are per process, as with any `memory://` store: set RATELIMIT_STORAGE_URI to a
Redis URI for limits that hold across processes and hosts.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import ClassVar

from limits.storage import Storage

SCHEME = "bloom-memory"
SWEEP_INTERVAL_S = 1.0


class ProcessMemoryStorage(Storage):
    STORAGE_SCHEME: ClassVar[list[str]] = [SCHEME]

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        clock: Callable[[], float] = time.time,
        **options: str,
    ) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._expires_at: dict[str, float] = {}
        self._next_sweep_at = 0.0

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError  # nothing here talks to a server

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        with self._lock:
            now = self._clock()
            if now >= self._next_sweep_at:
                self._drop_expired(now)
            if self._expires_at.get(key, 0.0) <= now:
                self._counts[key] = 0
                self._expires_at[key] = now + expiry
            self._counts[key] += amount
            return self._counts[key]

    def get(self, key: str) -> int:
        with self._lock:
            if self._expires_at.get(key, 0.0) <= self._clock():
                return 0
            return self._counts.get(key, 0)

    def get_expiry(self, key: str) -> float:
        with self._lock:
            return self._expires_at.get(key, self._clock())

    def clear(self, key: str) -> None:
        with self._lock:
            self._counts.pop(key, None)
            self._expires_at.pop(key, None)

    def reset(self) -> int:
        with self._lock:
            cleared = len(self._counts)
            self._counts.clear()
            self._expires_at.clear()
            return cleared

    def check(self) -> bool:
        return True

    def counters_held(self) -> int:
        """How many counters are held (for tests and curiosity)."""
        with self._lock:
            return len(self._counts)

    def _drop_expired(self, now: float) -> None:
        expired = [key for key, expires_at in self._expires_at.items() if expires_at <= now]
        for key in expired:
            del self._counts[key]
            del self._expires_at[key]
        self._next_sweep_at = now + SWEEP_INTERVAL_S
