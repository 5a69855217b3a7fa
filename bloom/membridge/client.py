"""Client of the Membridge control plane (README, "Membridge").

One requests.Session whose urllib3 Retry retries GETs on connection errors, read
errors and 5xx (3 retries, backoff 0.5 s, 1 s, 2 s plus jitter), and retries a POST
only when the connection failed before the request was sent, so a leadership change
is never applied twice. The admin key is read from the current runtime config for
each call and never appears in a log line, an error message or a response.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .. import metrics

log = logging.getLogger(__name__)

ADMIN_HEADER = "X-MEMBRIDGE-ADMIN"
REQUEST_TIMEOUT_S = 10.0
SYNC_TIMEOUT_S = 8.0


class BackoffRetry(Retry):
    """urllib3's Retry waits nothing before the first retry; ours waits 0.5 s, then doubles."""

    def get_backoff_time(self) -> float:
        errors = len(self.history)
        if errors == 0:
            return 0.0
        backoff = self.backoff_factor * (2 ** (errors - 1))
        if self.backoff_jitter:
            import random

            backoff += random.random() * self.backoff_jitter
        return min(self.backoff_max, backoff)


def build_session(pool_size: int = 10) -> requests.Session:
    retry = BackoffRetry(
        total=3,
        connect=3,
        read=3,
        status=3,
        other=0,
        allowed_methods=frozenset({"GET"}),  # read and 5xx retries; connect retries apply to any method
        status_forcelist=(500, 502, 503, 504),
        backoff_factor=0.5,
        backoff_jitter=0.25,
        backoff_max=4.0,
        raise_on_status=False,
        respect_retry_after_header=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def encode_segment(value: str) -> str:
    """One path segment, fully escaped: '/', '?', '#', '%' and dot segments cannot escape it."""
    return quote(value, safe="").replace(".", "%2E")


class UpstreamUnreachable(Exception):
    """No answer from Membridge after the retries."""


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    body: Any  # parsed JSON, or the text when the body is not JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def refused_admin_key(self) -> bool:
        return self.status in (401, 403)

    @property
    def detail(self) -> Any:
        """Upstream's own account of an error, as JSON (FastAPI's `detail`, or the body)."""
        if isinstance(self.body, dict) and "detail" in self.body:
            return self.body["detail"]
        return self.body if not isinstance(self.body, str) else self.body[:1000]

    def error_message(self) -> str:
        """One readable line: FastAPI's 422 list becomes 'body.field: message; ...'."""
        if self.refused_admin_key:
            return "Membridge refused the admin key"
        detail = self.detail
        if isinstance(self.body, dict) and "detail" not in self.body and isinstance(self.body.get("error"), str):
            detail = self.body["error"]
        if isinstance(detail, str) and detail.strip():
            return " ".join(detail.split())[:500]
        if isinstance(detail, list):
            lines = [_validation_line(item) for item in detail[:10]]
            return "; ".join(line for line in lines if line)[:500] or f"Membridge answered {self.status}"
        return f"Membridge answered {self.status}"


def _validation_line(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)[:200]
    location = ".".join(str(part) for part in item.get("loc") or [])
    message = str(item.get("msg") or item.get("type") or "invalid")
    return f"{location}: {message}" if location else message


class UpstreamHealth:
    """consecutiveFailures / lastSuccess / lastError / connected of this process's calls.

    `on_change` (if given) receives each new snapshot, outside the lock: the runtime
    config store shares it with every other process (README, "Membridge").
    """

    def __init__(self, on_change: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"consecutiveFailures": 0, "lastSuccess": None, "lastError": None, "connected": False}
        self._observed_at = 0
        self.on_change = on_change

    def success(self) -> None:
        with self._lock:
            now = int(time.time() * 1000)
            failed_before = self._state["consecutiveFailures"]
            self._state.update(consecutiveFailures=0, lastSuccess=now, connected=True)
            self._observed_at = now
        metrics.MEMBRIDGE_CALLS.labels("ok").inc()
        if failed_before:  # one line when an outage ends, none per call
            log.info("Membridge answers again, after %d failed call(s)", failed_before)
        self._announce()

    def failure(self, message: str) -> None:
        with self._lock:
            self._state["consecutiveFailures"] += 1
            first = self._state["consecutiveFailures"] == 1
            self._state.update(lastError=message, connected=False)
            self._observed_at = int(time.time() * 1000)
        metrics.MEMBRIDGE_CALLS.labels("error").inc()
        # One line when an outage starts; the calls that fail during it are not logged again.
        log.log(logging.WARNING if first else logging.DEBUG, "Membridge call failed: %s", message)
        self._announce()

    def forget(self, reason: str) -> None:
        """Not known to be connected any more (the target or key changed), yet no failure."""
        with self._lock:
            self._state.update(lastError=reason, connected=False)
            self._observed_at = int(time.time() * 1000)
        self._announce()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._state, "observedAt": self._observed_at}

    def _announce(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(self.snapshot())
        except Exception as error:  # sharing is best effort: the call's own outcome stands
            log.warning("could not share the Membridge status: %s", type(error).__name__)


class MembridgeClient:
    def __init__(
        self,
        current_target: Callable[[], tuple[str, str]],
        health: UpstreamHealth | None = None,
        session: requests.Session | None = None,
    ) -> None:
        """`current_target()` returns (server_url, admin_key) from the live runtime config."""
        self._current_target = current_target
        self.health = health or UpstreamHealth()
        self._session = session or build_session()

    def request(
        self, method: str, path: str, *, json_body: Any = None, admin: bool = True, timeout: float = REQUEST_TIMEOUT_S,
        caller_input: bool = False,
    ) -> UpstreamResponse:
        """One call upstream. With `caller_input` (the path or body came from our caller),
        an upstream 4xx other than a refused admin key is the caller's mistake: it says
        nothing about the connection, so the upstream status is left as it was."""
        base_url, admin_key = self._current_target()
        headers = {"Accept": "application/json"}
        if admin:
            headers[ADMIN_HEADER] = admin_key
        url = f"{base_url.rstrip('/')}{path}"
        prepared = self._session.prepare_request(requests.Request(method, url, json=json_body, headers=headers))
        # requests re-quotes URLs and would turn an escaped '%2E%2E' back into a '..' segment.
        prepared.url = url
        try:
            response = self._session.send(prepared, timeout=timeout)
        except requests.RequestException as error:
            message = f"Membridge unreachable: {_describe(error)}"
            self.health.failure(message)
            log.debug("%s %s failed: %s", method, path, message)
            raise UpstreamUnreachable(message) from None
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        result = UpstreamResponse(response.status_code, body)
        if result.ok:
            self.health.success()
        elif caller_input and 400 <= result.status < 500 and not result.refused_admin_key:
            log.debug("%s %s: Membridge refused the caller's request (%d)", method, path, result.status)
        else:
            self.health.failure(f"Membridge answered {response.status_code} to {method} {path.split('/')[1]}: "
                                f"{result.error_message()}"[:300])
        return result

    def get(self, path: str, **kwargs: Any) -> UpstreamResponse:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json_body: Any, **kwargs: Any) -> UpstreamResponse:
        return self.request("POST", path, json_body=json_body, **kwargs)


def _describe(error: requests.RequestException) -> str:
    """The kind of failure, without URLs or headers."""
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.ConnectionError):
        return "connection failed"
    return type(error).__name__
