"""Every error becomes a JSON answer here, and only here: the domain's errors (bloom/errors.py)
with their status, werkzeug's HTTP errors, database failures (503 when it is away or busy,
400 for a value it cannot hold) and anything unexpected (500, logged with its traceback)."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from ..errors import (
    ApiError,
    ValidationFailed,
    exhausted_resource,
    is_concurrency_conflict,
    is_connection_failure,
    is_data_error,
    is_timeout,
)
from ..services import services

log = logging.getLogger(__name__)

RETRY_AFTER_S = "2"  # seconds: a database away or busy is seen again within a ping or two

_HTTP_MESSAGES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
    415: "Unsupported media type",
    429: "Too many requests, please try again later",
}


def error_body(message: Any) -> dict[str, Any]:
    return {"error": message}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ValidationFailed)
    def _validation(error: ValidationFailed):
        body = {"formErrors": error.form_errors, "fieldErrors": error.field_errors}
        return jsonify(error_body(body)), 400

    @app.errorhandler(ApiError)
    def _api(error: ApiError):
        response = jsonify(error_body(error.message))
        if error.status == 503:
            response.headers["Retry-After"] = RETRY_AFTER_S
        return response, error.status

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException):
        status = error.code or 500
        message = _HTTP_MESSAGES.get(status, error.name)
        response = error.get_response()
        response.set_data(jsonify(error_body(message)).get_data())
        response.mimetype = "application/json"
        return response, status

    @app.errorhandler(DBAPIError)
    def _database(error: DBAPIError):
        if is_data_error(error):
            # Input PostgreSQL cannot hold (out-of-range number, bad text) that got past validation.
            log.warning("input rejected by the database: %s", getattr(error.orig, "pgcode", None))
            return jsonify(error_body("Invalid input")), 400
        if is_timeout(error):
            log.warning("database statement timed out: %s", type(error.orig).__name__)
            return _unavailable("Database busy, try again")
        if is_concurrency_conflict(error):
            log.warning("statement lost to a concurrent one: %s", getattr(error.orig, "pgcode", None))
            return _unavailable("Conflict with a concurrent request, try again")
        exhausted = exhausted_resource(error)
        if exhausted is not None:
            # Writes fail while reads may still work: /ready says so too (bloom/api/health.py).
            services().database.note_exhausted(exhausted)
            log.warning("the database is out of %s: %s", exhausted, getattr(error.orig, "pgcode", None))
            return _unavailable(f"Database out of {exhausted}")
        if error.connection_invalidated or is_connection_failure(error):
            log.warning("database unavailable: %s", type(error.orig).__name__)
            return _unavailable("Database unavailable")
        log.exception("database error")
        return jsonify(error_body("Internal Server Error")), 500

    @app.errorhandler(PoolTimeoutError)
    def _pool_timeout(error: PoolTimeoutError):
        log.warning("no database connection free in time")
        return _unavailable("Database unavailable")

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unhandled error")
        return jsonify(error_body("Internal Server Error")), 500


def _unavailable(message: str):
    response = jsonify(error_body(message))
    response.headers["Retry-After"] = RETRY_AFTER_S
    return response, 503
