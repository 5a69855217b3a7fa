"""Request-level concerns shared by every blueprint: JSON bodies, auth, rate limits, https."""
from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from flask import Flask, jsonify, redirect, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from .config import Settings
from .errors import BadRequest, error_body
from .rate_limit_store import SCHEME as PROCESS_MEMORY_SCHEME
from .schemas import unstorable_reason

log = logging.getLogger(__name__)

PROTECTED_PREFIXES = ("/api/runtime/", "/api/membridge/")
# Monitoring and the connection test stay open, as in the Express service.
OPEN_PATHS = frozenset({
    "/api/runtime/health",
    "/api/runtime/ready",
    "/api/runtime/openapi.json",
    "/api/runtime/test-connection",
})

# Monitoring is never throttled.
UNLIMITED_PATHS = frozenset({"/api/runtime/health", "/api/runtime/ready", "/api/runtime/openapi.json", "/metrics"})
TEST_CONNECTION_ENDPOINT = "config.test_connection"


def json_body() -> Any:
    """The request body as JSON; an empty body is {}; anything unparsable is a 400."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Malformed JSON body") from None


def _exempt_from_shared_limit() -> bool:
    return request.path in UNLIMITED_PATHS or not request.path.startswith(PROTECTED_PREFIXES)


def _limit_storage_uri(configured: str) -> str:
    """memory:// is this process's memory, kept by bloom/rate_limit_store.py (no timer
    threads); any other URI (redis://...) goes to the `limits` library as it is."""
    return f"{PROCESS_MEMORY_SCHEME}://" if configured == "memory://" else configured


def init_limiter(app: Flask, config: Settings) -> Limiter:
    """One counter per client address shared by all API routes, plus test-connection's own.

    Call after the blueprints are registered: the stricter limit wraps a registered view.
    """
    limiter = Limiter(
        key_func=get_remote_address,
        app=None,
        application_limits=[config.rate_limit],
        application_limits_exempt_when=_exempt_from_shared_limit,
        storage_uri=_limit_storage_uri(config.ratelimit_storage_uri),
        headers_enabled=True,
        swallow_errors=True,  # a rate-limit store outage must not take requests down with it
        in_memory_fallback_enabled=True,
        key_prefix="bloom-runtime",
    )
    limiter.init_app(app)
    view = app.view_functions.get(TEST_CONNECTION_ENDPOINT)
    if view is not None:
        app.view_functions[TEST_CONNECTION_ENDPOINT] = limiter.limit(
            config.test_connection_rate_limit, override_defaults=False
        )(view)
    return limiter


def install_request_guards(app: Flask, config: Settings) -> None:
    @app.before_request
    def _https_redirect():
        if config.production and request.headers.get("X-Forwarded-Proto") == "http":
            return redirect(request.url.replace("http://", "https://", 1), code=301)
        return None

    @app.before_request
    def _storable_path_and_query():
        for text in (request.path, *request.args.keys(), *request.args.values()):
            reason = unstorable_reason(text)
            if reason:
                raise BadRequest(reason)
        return None

    @app.before_request
    def _api_key():
        expected = config.runtime_api_key
        if not expected or request.path in OPEN_PATHS or not request.path.startswith(PROTECTED_PREFIXES):
            return None
        given = request.headers.get("X-Runtime-API-Key", "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return jsonify(error_body("Unauthorized")), 401
        return None
