"""gunicorn's own error answers as JSON (every error is JSON, never HTML).

gunicorn answers some requests before the application sees them (a request line over
`limit_request_line`: 414; malformed request lines or headers: 400; too many headers:
431) with an HTML page written by `gunicorn.util.write_error`. `install()` replaces that
one function, in each gunicorn process, by one that writes `{"error": ...}`.
"""
from __future__ import annotations

import json

from gunicorn import util


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    body = json.dumps({"error": reason}).encode("utf-8")
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


def install() -> None:
    util.write_error = write_json_error
