"""Domain errors carry their HTTP status; one place turns every error into JSON (docs/API.md, Conventions)."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status = 400


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class Unprocessable(ApiError):
    status = 422


class Forbidden(ApiError):
    status = 403


class Unavailable(ApiError):
    status = 503


class BadGateway(ApiError):
    status = 502


class ValidationFailed(ApiError):
    """A request body or query string that does not match its schema."""

    status = 400

    def __init__(self, form_errors: list[str], field_errors: dict[str, list[str]]) -> None:
        super().__init__("validation failed")
        self.form_errors = form_errors
        self.field_errors = field_errors


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
        return jsonify(error_body(error.message)), error.status

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
        if _is_timeout(error):
            log.warning("database statement timed out: %s", type(error.orig).__name__)
            return jsonify(error_body("Database busy, try again")), 503
        if error.connection_invalidated or _is_connection_failure(error):
            log.warning("database unavailable: %s", type(error.orig).__name__)
            return jsonify(error_body("Database unavailable")), 503
        log.exception("database error")
        return jsonify(error_body("Internal Server Error")), 500

    @app.errorhandler(PoolTimeoutError)
    def _pool_timeout(error: PoolTimeoutError):
        log.warning("no database connection free in time")
        return jsonify(error_body("Database unavailable")), 503

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("unhandled error")
        return jsonify(error_body("Internal Server Error")), 500


def _is_connection_failure(error: DBAPIError) -> bool:
    import psycopg2

    orig = error.orig
    if isinstance(orig, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return True
    # admin_shutdown / crash_shutdown / cannot_connect_now while PostgreSQL restarts
    return getattr(orig, "pgcode", None) in {"57P01", "57P02", "57P03"}


def is_transient(error: DBAPIError) -> bool:
    """The database is away or busy (not the data): the same call may succeed later."""
    if is_data_error(error):
        return False
    return _is_timeout(error) or error.connection_invalidated or _is_connection_failure(error)


def is_data_error(error: DBAPIError) -> bool:
    """A value PostgreSQL refuses to hold (class 22, data exception) or cannot index
    (class 54, program limit exceeded: an index row too large). psycopg2 files the
    latter under OperationalError, yet the database is fine: it is the data."""
    code = getattr(error.orig, "pgcode", None) or ""
    return code.startswith(("22", "54"))


def _is_timeout(error: DBAPIError) -> bool:
    # query_canceled (statement_timeout), lock_not_available (lock_timeout)
    return getattr(error.orig, "pgcode", None) in {"57014", "55P03"}
