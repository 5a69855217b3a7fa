"""Rate limits: one counter per client address shared by every API route, and the
connection test's stricter limit of its own.

Flask-Limiter holds the store (RATELIMIT_STORAGE_URI: this host's shared table for
`memory://`, or Redis) and runs the connection test's limit, a decorated view. The shared
limit, which every API request passes, is one hit of the `limits` strategy on that same
store, in a before-request hook of ours: Flask-Limiter works out on every request which
of its default, application, blueprint and view limits and exemptions apply, and that
resolution was a fifth of a lifecycle request's CPU, ahead of all its SQL
(docs/PERFORMANCE.md). The hook knows the answer already: every path under
PROTECTED_PREFIXES but monitoring's.

When the store fails (Redis away), requests are counted in this process and served; the
store is tried again after a back-off, and the outage and the recovery are logged once
each.
"""
from __future__ import annotations

import logging
import threading
import time

from flask import Flask, current_app, g, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import RateLimitItem
from limits import parse as parse_limit
from limits.strategies import FixedWindowRateLimiter, RateLimiter
from werkzeug.exceptions import TooManyRequests

from ..agents.dispatch import DELIVERY_PREFIX
from ..settings import Settings
from .rate_limit_store import ProcessMemoryStorage, memory_scheme

log = logging.getLogger(__name__)

KEY_PREFIX = "bloom-runtime"
PROTECTED_PREFIXES = ("/api/runtime/", "/api/membridge/")
# Monitoring is never throttled.
UNLIMITED_PATHS = frozenset({"/api/runtime/health", "/api/runtime/ready", "/api/runtime/openapi.json", "/metrics"})
TEST_CONNECTION_ENDPOINT = "config.test_connection"
DELIVERY_CALLBACKS = f"{DELIVERY_PREFIX}/"
LIMITER_KEY = "bloom.limiter"  # app.extensions: Flask-Limiter, and its store
# The scopes of the counters kept per client address.
API_SCOPE, FAILED_AUTH_SCOPE, REFUSED_CALLBACK_SCOPE = "api", "failed-auth", "refused-callback"


class ClientLimit:
    """A fixed-window limit per client address, counted in a store shared by the
    processes (and hosts) that serve the API, or, while that store fails, in this
    process's memory."""

    FIRST_RETRY_S = 1.0
    LAST_RETRY_S = 60.0

    def __init__(self, limit: RateLimitItem, shared: RateLimiter, fallback: RateLimiter | None = None) -> None:
        self.limit = limit
        self._shared = shared
        self._fallback = fallback or FixedWindowRateLimiter(ProcessMemoryStorage())
        self._lock = threading.Lock()
        self._retry_shared_at = 0.0  # time.monotonic(); 0 while the shared store answers
        self._retry_after_s = self.FIRST_RETRY_S
        self._probing = False  # one request asks the failing store again; the others do not wait

    def hit(self, scope: str, address: str) -> tuple[bool, RateLimiter]:
        """Count one request of this client in this scope: (within the limit?, the
        strategy that counted it, for reading its window back)."""
        strategy = self._counting()
        try:
            return strategy.hit(self.limit, KEY_PREFIX, scope, address), strategy
        except Exception as error:  # the store's own errors (connection refused, timeouts)
            self._shared_failed(error)
            return self._fallback.hit(self.limit, KEY_PREFIX, scope, address), self._fallback

    def has_room(self, scope: str, address: str) -> bool:
        """Would one more hit of this client in this scope be within the limit? (Counts nothing.)"""
        strategy = self._counting()
        try:
            return strategy.test(self.limit, KEY_PREFIX, scope, address)
        except Exception as error:
            self._shared_failed(error)
            return self._fallback.test(self.limit, KEY_PREFIX, scope, address)

    def window(self, strategy: RateLimiter, scope: str, address: str) -> tuple[int, int] | None:
        """(reset time in epoch seconds, requests left) of the client's current window, or
        None if the store cannot say: the answer goes out without the headers."""
        try:
            reset_at, remaining = strategy.get_window_stats(self.limit, KEY_PREFIX, scope, address)
        except Exception as error:
            if strategy is self._shared:
                self._shared_failed(error)
            return None
        return int(reset_at + 1), remaining

    def _counting(self) -> RateLimiter:
        retry_at = self._retry_shared_at
        if not retry_at:
            return self._shared
        if time.monotonic() < retry_at:
            return self._fallback
        with self._lock:  # single flight: a store that hangs costs one request its timeout, not all
            if self._probing:
                return self._fallback
            self._probing = True
        try:
            answers = self._shared.storage.check()
        except Exception:
            answers = False
        with self._lock:
            self._probing = False
            if answers and self._retry_shared_at:
                self._retry_shared_at, self._retry_after_s = 0.0, self.FIRST_RETRY_S
                log.warning("rate-limit store answers again: limits are shared across processes again")
            elif not answers:
                self._retry_after_s = min(self._retry_after_s * 2, self.LAST_RETRY_S)
                self._retry_shared_at = time.monotonic() + self._retry_after_s
        return self._shared if answers else self._fallback

    def _shared_failed(self, error: Exception) -> None:
        with self._lock:
            if self._retry_shared_at:
                return
            self._retry_shared_at = time.monotonic() + self._retry_after_s
        # Once per outage; the error's type only (a URI in its text may hold a password).
        log.warning("rate-limit store unavailable (%s): counting in this process until it answers",
                    type(error).__name__)


def within_failed_auth_limit() -> bool:
    """Count one refused credential of this client on a path the limits exempt (/metrics),
    against the configured limit: guesses are throttled like any other calls, while a
    scraper with the right key is never counted. False once over the limit."""
    allowed, _ = current_app.extensions["bloom.client_limit"].hit(FAILED_AUTH_SCOPE, get_remote_address())
    return allowed


def _limit_storage_uri(configured: str) -> str:
    """memory:// is this host's shared memory under gunicorn, else this process's memory
    (bloom/web/rate_limit_store.py, no timer threads); any other URI (redis://...) goes to
    the `limits` library as it is."""
    return f"{memory_scheme()}://" if configured == "memory://" else configured


def init_limiter(app: Flask, config: Settings) -> Limiter:
    """The shared per-client limit and the connection test's own. Call after the
    blueprints are registered (the stricter limit wraps a registered view) and before
    the API key check (a request with a wrong key still counts against its client's
    limit, so a key cannot be guessed at line speed)."""
    limiter = Limiter(
        key_func=get_remote_address,
        app=None,
        storage_uri=_limit_storage_uri(config.ratelimit_storage_uri),
        headers_enabled=True,
        swallow_errors=True,  # a rate-limit store outage must not take requests down with it
        in_memory_fallback_enabled=True,
        key_prefix=KEY_PREFIX,
    )
    _install_client_limit(app)  # before Flask-Limiter's hooks: see _add_headers
    # Flask-Limiter looks at the connection test only; every other request leaves it at once.
    limiter.request_filter(lambda: request.endpoint != TEST_CONNECTION_ENDPOINT)
    limiter.init_app(app)  # opens the store
    app.extensions["bloom.client_limit"] = ClientLimit(parse_limit(config.rate_limit),
                                                       FixedWindowRateLimiter(limiter.storage))
    view = app.view_functions.get(TEST_CONNECTION_ENDPOINT)
    if view is not None:
        # Flask-Limiter's decorator is typed for async views too.
        app.view_functions[TEST_CONNECTION_ENDPOINT] = limiter.limit(  # type: ignore[assignment]
            config.test_connection_rate_limit, override_defaults=False
        )(view)
    return limiter


def _install_client_limit(app: Flask) -> None:
    extensions = app.extensions

    @app.before_request
    def _count_request():
        path = request.path
        if path in UNLIMITED_PATHS or not path.startswith(PROTECTED_PREFIXES):
            return
        address = get_remote_address()
        if path.startswith(DELIVERY_CALLBACKS):
            # An agent's callbacks on a delivery are authenticated by its lease (the URL
            # names it), and the real agent never retries one: not client traffic to limit
            # (an agent running short tasks got hundreds of 429s). Only refused ones (a wrong
            # or stale lease) count, so guessing leases stays throttled.
            if not extensions["bloom.client_limit"].has_room(REFUSED_CALLBACK_SCOPE, address):
                raise TooManyRequests()
            g.callback_from = address
            return
        allowed, strategy = extensions["bloom.client_limit"].hit(API_SCOPE, address)
        g.client_window = (strategy, address)
        if not allowed:
            raise TooManyRequests()

    # after_request hooks run in the reverse order of their registration: this one after
    # Flask-Limiter's, whose headers (the connection test's stricter limit) it leaves be.
    @app.after_request
    def _add_headers(response):
        callback_from = g.get("callback_from")
        if callback_from is not None and response.status_code in (404, 409):
            extensions["bloom.client_limit"].hit(REFUSED_CALLBACK_SCOPE, callback_from)
        counted = g.get("client_window")
        if counted is None or "X-RateLimit-Limit" in response.headers:
            return response
        client_limit = extensions["bloom.client_limit"]
        window = client_limit.window(counted[0], API_SCOPE, counted[1])
        if window is None:
            return response
        reset_at, remaining = window
        headers = response.headers
        headers["X-RateLimit-Limit"] = str(client_limit.limit.amount)
        headers["X-RateLimit-Remaining"] = str(remaining)
        headers["X-RateLimit-Reset"] = str(reset_at)
        if response.status_code == 429:
            headers["Retry-After"] = str(max(0, reset_at - int(time.time())))
        return response
