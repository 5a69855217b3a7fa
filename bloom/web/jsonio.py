"""JSON out of the service through orjson; JSON in through the standard library.

Writing a response with orjson takes a few microseconds where the `json` module took
tens (docs/PERFORMANCE.md). Reading stays with `json`: orjson reads an integer past 64
bits as a float, silently rounded, and telling such a body apart first costs more than
orjson saves on the small bodies this API takes. A value orjson cannot write (an
integer past 64 bits, which `json` read exactly) is written by `json`.
"""
from __future__ import annotations

import json
from typing import Any

import orjson
from flask.json.provider import JSONProvider

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps_bytes(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


class OrjsonProvider(JSONProvider):
    """Flask's JSON provider: `jsonify` writes with orjson, `request.get_json` reads with
    `json`. Keys keep their order (as `sort_keys = False` did), and a response ends with
    a newline as Flask's own provider's do."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps_bytes(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return json.loads(s)

    def response(self, *args: Any, **kwargs: Any):
        body = dumps_bytes(self._prepare_response_obj(args, kwargs)) + b"\n"
        return self._app.response_class(body, mimetype="application/json")  # type: ignore[arg-type]
