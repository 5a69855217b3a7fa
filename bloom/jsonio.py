"""JSON in and out of the service: orjson, with the standard library where orjson
would change a value.

orjson parses and writes JSON several times faster than the `json` module (it was a
measurable part of every request, docs/PERFORMANCE.md). Two places where it differs
matter here and are kept as the `json` module has them:
- an integer of 19 or more digits: orjson reads one past 64 bits as a float (rounded,
  silently); such a body is parsed by `json` instead, so the client's number is kept.
- a value orjson cannot write (an integer past 64 bits read that way): written by `json`.
Everything else orjson refuses (NaN, a lone surrogate, nesting past 1,024 levels) is not
JSON, and the caller answers 400.
"""
from __future__ import annotations

import json
import re
from typing import Any

import orjson
from flask.json.provider import JSONProvider

_LONG_INTEGER = re.compile(r"\d{19}")
_LONG_INTEGER_BYTES = re.compile(rb"\d{19}")
_OPTIONS = orjson.OPT_NON_STR_KEYS

DecodeError = (ValueError, UnicodeDecodeError, RecursionError)  # what a malformed body raises


def loads(raw: bytes | str) -> Any:
    long_integer = _LONG_INTEGER if isinstance(raw, str) else _LONG_INTEGER_BYTES
    if long_integer.search(raw):
        return json.loads(raw)
    return orjson.loads(raw)


def dumps_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def is_too_deep(error: Exception) -> bool:
    """Did the parser give up on nesting (rather than on malformed text)?"""
    return isinstance(error, RecursionError) or "depth limit" in str(error) or "recursion" in str(error)


class OrjsonProvider(JSONProvider):
    """Flask's JSON provider on orjson: `jsonify` and `request.get_json` use it. Keys keep
    their order (as `sort_keys = False` did), and a response ends with a newline as
    Flask's own provider's do."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps_bytes(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s)

    def response(self, *args: Any, **kwargs: Any):
        body = dumps_bytes(self._prepare_response_obj(args, kwargs)) + b"\n"
        return self._app.response_class(body, mimetype="application/json")
