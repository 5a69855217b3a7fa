"""Domain errors carry their HTTP status; the web layer turns every error into JSON in one
place (bloom/web/error_handlers.py, docs/API.md Conventions)."""
from __future__ import annotations

from sqlalchemy.exc import DBAPIError


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


class RequestTimeout(ApiError):
    status = 408


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


def is_connection_failure(error: DBAPIError) -> bool:
    import psycopg2

    orig = error.orig
    if is_concurrency_conflict(error):  # an OperationalError to psycopg2, yet the database is fine
        return False
    if isinstance(orig, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return True
    # admin_shutdown / crash_shutdown / cannot_connect_now while PostgreSQL restarts
    return getattr(orig, "pgcode", None) in {"57P01", "57P02", "57P03"}


def exhausted_resource(error: DBAPIError) -> str | None:
    """What PostgreSQL ran out of (class 53, insufficient resources: a full disk above
    all), or None. psycopg2 files these under OperationalError, yet the server answers:
    said as what it is, not as the database being away."""
    code = getattr(error.orig, "pgcode", None) or ""
    if not code.startswith("53"):
        return None
    return {"53100": "disk space", "53200": "memory", "53300": "connections"}.get(code, "resources")


def is_concurrency_conflict(error: DBAPIError) -> bool:
    """A deadlock or a serialization failure: a concurrent request won; the same call may
    succeed at once."""
    return getattr(error.orig, "pgcode", None) in {"40P01", "40001"}


def is_transient(error: DBAPIError) -> bool:
    """The database is away or busy (not the data): the same call may succeed later."""
    if is_data_error(error):
        return False
    return (is_timeout(error) or is_concurrency_conflict(error) or error.connection_invalidated
            or is_connection_failure(error))


def is_data_error(error: DBAPIError) -> bool:
    """A value PostgreSQL refuses to hold (class 22, data exception) or cannot index
    (class 54, program limit exceeded: an index row too large). psycopg2 files the
    latter under OperationalError, yet the database is fine: it is the data."""
    code = getattr(error.orig, "pgcode", None) or ""
    return code.startswith(("22", "54"))


def is_timeout(error: DBAPIError) -> bool:
    # query_canceled (statement_timeout), lock_not_available (lock_timeout)
    return getattr(error.orig, "pgcode", None) in {"57014", "55P03"}


def is_outage(error: BaseException) -> bool:
    """The database or a peer being away, as a background job meets it: said once, without
    a traceback (it tells nothing), not at every tick."""
    if isinstance(error, Unavailable | BadGateway | ConnectionError | TimeoutError):
        return True
    return isinstance(error, DBAPIError) and is_transient(error)
