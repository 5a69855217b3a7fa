"""One log line per /api request (method, path, status, duration, request id), and an
X-Request-ID on every response: the caller's, or a new one. Never a header value."""
from __future__ import annotations

import logging
import os
import re
import time

from flask import Flask, g, request

from .. import metrics
from .guards import printable

log = logging.getLogger("bloom.requests")

# A caller's id is echoed only if it is plain enough to be safe in logs and headers.
_ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


_CONVERTER = re.compile(r"<\w+:(\w+)>")
_ROUTE_LABELS: dict[str, str] = {}


def _route_label(rule: str) -> str:
    """The route as a metrics label, every parameter written alike (`<worker_id>`, as
    `<task_id>`, not `<worker_id:worker_id>`); worked out once per route."""
    label = _ROUTE_LABELS.get(rule)
    if label is None:
        label = _ROUTE_LABELS.setdefault(rule, _CONVERTER.sub(r"<\1>", rule))
    return label


def new_request_id() -> str:
    """32 random hex digits (the form uuid4().hex had, without building a UUID)."""
    return os.urandom(16).hex()


def install_request_log(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if given and _ACCEPTABLE_ID.match(given) else new_request_id()
        g.request_started = time.perf_counter()

    @app.after_request
    def _finish(response):
        request_id = getattr(g, "request_id", None) or new_request_id()
        response.headers["X-Request-ID"] = request_id
        started = getattr(g, "request_started", None)
        elapsed_s = time.perf_counter() - started if started is not None else 0.0
        # Labels from bounded sets only: a client must not mint time series at will.
        req = request._get_current_object()
        rule = req.url_rule
        route = _route_label(rule.rule) if rule is not None else "unmatched"
        method = req.method if req.method in _METHODS else "OTHER"
        metrics.count_request(route, method, response.status_code, elapsed_s)
        if response.status_code == 429:
            metrics.RATE_LIMITED.inc()
        if log.isEnabledFor(logging.INFO) and req.path.startswith("/api/"):
            duration_ms = elapsed_s * 1000
            log.info(
                "%s %s %s %.1fms rid=%s client=%s",
                printable(req.method, 16), printable(req.path), response.status_code, duration_ms,
                request_id, req.remote_addr,
            )
        return response
