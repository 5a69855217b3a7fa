"""Request-level concerns shared by every blueprint: JSON bodies, auth, rate limits, https."""
from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, g, jsonify, redirect, request
from marshmallow import Schema
from werkzeug.exceptions import RequestEntityTooLarge

from ..errors import BadRequest, Unavailable
from ..large_bodies import LargeBodies, keep_large_buffers_out_of_the_heap
from ..schemas import load, unstorable_reason
from ..settings import Settings
from . import request_body
from .error_handlers import error_body
from .rate_limits import PROTECTED_PREFIXES

log = logging.getLogger(__name__)

# Monitoring and the connection test stay open, as in the Express service.
OPEN_PATHS = frozenset({
    "/api/runtime/health",
    "/api/runtime/ready",
    "/api/runtime/openapi.json",
    "/api/runtime/test-connection",
    "/api/runtime/agent-install-script",  # holds no secret: the node's shell supplies the keys
})


MAX_JSON_DEPTH = 32


def json_body() -> Any:
    """The request body as JSON; an empty body is {}; anything unparsable is a 400, a
    body over BLOOM_MAX_BODY_BYTES a 413 (chunked ones too), nesting past MAX_JSON_DEPTH a 400."""
    return _parsed_body()[0]


def load_body(schema_class: type[Schema], fast: Callable[[Any], dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """The request body, parsed (json_body) and validated against the schema. Its texts
    are looked through for what PostgreSQL cannot store only when the raw body could hold
    any: in JSON text a NUL character or an unpaired surrogate can only be written as a
    \\u escape (the parser refuses raw control characters and ill-formed UTF-8), so a
    UTF-8 body without such an escape has none. That walk was a fifth of the time of a
    1,000-task batch (docs/PERFORMANCE.md)."""
    value, raw = _parsed_body()
    may_hold_unstorable = json.detect_encoding(raw) != "utf-8" or _UNSTORABLE_ESCAPE.search(raw) is not None
    return load(schema_class, value, check_text=may_hold_unstorable, fast=fast)


# \u0000, and \uD800-\uDFFF (surrogates), in either case; an escaped backslash before
# one only costs the walk.
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def _parsed_body() -> tuple[Any, bytes]:
    raw = _body_bytes()
    if not raw.strip():
        return {}, raw
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BadRequest(f"JSON body nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Malformed JSON body") from None
    if _nesting_exceeds(value, MAX_JSON_DEPTH):
        raise BadRequest(f"JSON body nested deeper than {MAX_JSON_DEPTH} levels")
    return value, raw


def _take_large_body_slot(size: int) -> None:
    gate: LargeBodies | None = current_app.extensions.get("bloom.large_bodies")
    if gate is None or size <= LargeBodies.LARGE_BODY_BYTES or g.get("large_body"):
        return
    if not gate.take():
        g.retry_after = "5"
        raise Unavailable("Too many large requests at once; try again shortly")
    g.large_body = gate


def _body_bytes() -> bytes:
    """The body, read once from the server's input stream (the API reads it nowhere else):
    received at no less than a floor rate (408), spooled while it arrives, and only then,
    when large, held under one of the process's large-body slots (bloom/web/request_body.py).
    Past the limit: 413, whether the length was announced or the body came chunked (where
    werkzeug would stop reading at the limit and hand over a truncated body)."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    req = request._get_current_object()  # type: ignore[attr-defined]
    length = req.content_length
    if length == 0:
        return b""
    if not limit:
        return req.get_data()
    try:
        spool = request_body.receive(req.environ, length, limit)
    except request_body.BodyTooLarge:
        raise RequestEntityTooLarge() from None
    with spool:
        size = spool.seek(0, 2)
        spool.seek(0)
        _take_large_body_slot(size)
        return spool.read()


def _nesting_exceeds(value: Any, limit: int) -> bool:
    """Deeper than `limit` levels of lists/objects? Iterative: no recursion to exhaust."""
    pending = [(value, 1)]
    while pending:
        current, depth = pending.pop()
        children = current.values() if isinstance(current, dict) else current if isinstance(current, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                pending.append((child, depth + 1))
    return False


def install_request_guards(app: Flask, config: Settings, large_bodies: LargeBodies) -> None:
    app.extensions["bloom.large_bodies"] = large_bodies
    keep_large_buffers_out_of_the_heap()

    @app.after_request
    def _hand_memory_back_once_sent(response):
        if g.get("large_body") is not None:
            response.call_on_close(LargeBodies.hand_memory_back)
        return response

    @app.teardown_request
    def _give_back_large_body_slot(_error):
        gate = g.pop("large_body", None)
        if gate is not None:
            gate.give_back()

    @app.before_request
    def _https_redirect():
        if config.production and request.headers.get("X-Forwarded-Proto") == "http":
            return redirect(request.url.replace("http://", "https://", 1), code=301)
        return None

    @app.before_request
    def _storable_path_and_query():
        req = request._get_current_object()
        texts = (req.path, *req.args.keys(), *req.args.values()) if req.query_string else (req.path,)
        for text in texts:
            reason = unstorable_reason(text)
            if reason:
                raise BadRequest(reason)
        return None

    @app.after_request
    def _headers_that_mean_what_they_say(response):
        # Flask-Limiter sends Retry-After on every answer; it means something only on a
        # 429, a 503, or a long poll told to come back later.
        status = response.status_code
        retry_after = g.get("retry_after")
        if retry_after is not None:
            response.headers["Retry-After"] = retry_after
        elif status not in (429, 503):
            response.headers.pop("Retry-After", None)
        # No body, no type (Flask gives 204s and automatic OPTIONS answers text/html).
        if status == 204 or (request.method == "OPTIONS" and not response.get_data()):
            response.headers.pop("Content-Type", None)
        return response


def worker_route(view: Callable) -> Callable:
    """Mark a route a worker or agent calls: register, claim, heartbeat, complete (and an
    agent's fenced delivery callbacks). With an operator key set, the runtime key opens
    these routes only; every other route (creating and reading tasks, config, removing
    workers, Membridge) is the operator's."""
    view.worker_route = True  # type: ignore[attr-defined]
    return view


def _is_worker_route() -> bool:
    return getattr(current_app.view_functions.get(request.endpoint or ""), "worker_route", False)


OPERATOR, WORKER = "operator", "worker"


def caller_is_operator() -> bool:
    """Whether this request carries the operator's credential (or no split is configured)."""
    return g.get("caller_role", OPERATOR) == OPERATOR


def install_api_key_check(app: Flask, config: Settings) -> None:
    """Call after init_limiter (bloom/web/rate_limits.py): a request with a wrong key still
    counts against its client's limit, so a key cannot be guessed at line speed.

    One key (RUNTIME_API_KEY) opens everything, as the Express service did. With
    BLOOM_OPERATOR_KEY set as well, that key opens the operator's routes, and the runtime
    key only the workers' (@worker_route): a worker's or agent's key cannot read other
    callers' prompts, change the config, or point an existing worker somewhere else."""
    worker_key = config.runtime_api_key
    operator_key = config.operator_key

    @app.before_request
    def _api_key():
        if not worker_key and not operator_key:
            return None
        path = request.path
        if path in OPEN_PATHS or not path.startswith(PROTECTED_PREFIXES):
            return None
        given = request.headers.get("X-Runtime-API-Key", "").encode()
        if operator_key and hmac.compare_digest(given, operator_key.encode()):
            g.caller_role = OPERATOR
        elif worker_key and hmac.compare_digest(given, worker_key.encode()):
            g.caller_role = WORKER if operator_key else OPERATOR
        else:  # with only an operator key set, it opens every route, the workers' too
            log.warning("unauthorized request from %s: %s %s (%s)", request.remote_addr, request.method,
                        printable(request.path), "no key" if not given else "wrong key")
            return jsonify(error_body("Unauthorized")), 401
        if g.caller_role == WORKER and not _is_worker_route():
            log.warning("worker key refused on an operator route from %s: %s %s", request.remote_addr,
                        request.method, printable(request.path))
            return jsonify(error_body("Forbidden: this route needs the operator key")), 403
        return None


def printable(text: str, limit: int = 300) -> str:
    """Text for a log line: control and other unprintable characters escaped (a %0A in a
    path cannot forge a second line), and bounded."""
    escaped = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."
