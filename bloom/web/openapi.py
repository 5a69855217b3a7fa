"""The OpenAPI 3 document of the API, generated from the marshmallow schemas (apispec).

Request bodies and query strings are the very schemas the views validate with; each
view declares them with @documented, and the paths come from Flask's URL map, so the
document cannot drift from the routes. Response objects are the schemas of shapes.py,
which also write every answer (one source for each JSON shape); tests check the routes'
answers against this document (test_documented_answers.py, and the schemathesis run).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema

from ..shapes import RESPONSE_OBJECTS

_CONVERTER = re.compile(r"<(?:\w+:)?(\w+)>")


def documented(
    summary: str,
    *,
    body: type[Schema] | None = None,
    query: type[Schema] | None = None,
    responses: dict[int, str | None],
) -> Callable:
    """Attach what the OpenAPI document says of a view: body, query and responses.

    A response maps a status to a component name, or None for a body-less answer.
    """

    def attach(view: Callable) -> Callable:
        view.__openapi__ = {"summary": summary, "body": body, "query": query,  # type: ignore[attr-defined]
                            "responses": responses}
        return view

    return attach


_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "object",
                    "required": ["formErrors", "fieldErrors"],
                    "properties": {
                        "formErrors": {"type": "array", "items": {"type": "string"}},
                        "fieldErrors": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
                    },
                },
            ]
        }
    },
}

# Answers any route may give, whatever it does.
_COMMON_ERRORS = {
    400: "Malformed JSON or invalid input",
    401: "Missing or wrong X-Runtime-API-Key",
    413: "Request body too large",
    429: "Too many requests",
    500: "Internal Server Error",
    503: "Database unavailable",
}
_OPEN_ROUTES = {"/api/runtime/health", "/api/runtime/ready", "/api/runtime/openapi.json", "/metrics"}


def _response(target: str | None, description: str) -> dict[str, Any]:
    if target is None:
        return {"description": description}
    if target == "Any":
        return {"description": description, "content": {"application/json": {"schema": {}}}}
    if target == "Text":
        return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}},
                                                        "application/json": {"schema": {}}}}
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{target.rstrip('[]')}"}
    if target.endswith("[]"):
        schema = {"type": "array", "items": schema}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_openapi(app: Flask) -> dict[str, Any]:
    spec = APISpec(
        title="BLOOM Runtime",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": (
            "Lease-based task runtime for LLM work. Times are epoch milliseconds. "
            "Text (bodies, paths, query strings) must not contain NUL (\\u0000): PostgreSQL cannot store it."
        )},
    )
    spec.components.security_scheme("RuntimeApiKey", {"type": "apiKey", "in": "header", "name": "X-Runtime-API-Key"})
    spec.components.schema("Error", _ERROR)
    for schema in RESPONSE_OBJECTS:
        spec.components.schema(schema.__name__, schema=schema)

    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions.get(rule.endpoint)
        meta = getattr(view, "__openapi__", None)
        if meta is None:
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            spec.path(path=path, operations={method.lower(): _operation(rule, path, meta)})
    return spec.to_dict()


def _operation(rule, path: str, meta: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": meta["summary"], "operationId": rule.endpoint.replace(".", "_")}
    parameters: list[dict[str, Any]] = [
        {"in": "path", "name": name, "required": True, "schema": {"type": "string"}} for name in rule.arguments
    ]
    if meta["query"] is not None:
        parameters.append({"in": "query", "schema": meta["query"]})
    if parameters:
        operation["parameters"] = parameters
    body = meta["body"]
    if body is not None:
        needs_body = any(field.required for field in body().fields.values())
        operation["requestBody"] = {"required": needs_body, "content": {"application/json": {"schema": body}}}
    responses = {str(status): _response(target, _describe(status)) for status, target in meta["responses"].items()}
    # Answered by gunicorn before the app sees the request, as plain text.
    responses["414"] = _response(None, "Request line too long")
    for status, description in _COMMON_ERRORS.items():
        if path in _OPEN_ROUTES and status in (401, 429):
            continue
        responses.setdefault(str(status), _response("Error", description))
    operation["responses"] = responses
    if path not in _OPEN_ROUTES and path not in ("/api/runtime/test-connection", "/api/runtime/agent-install-script"):
        operation["security"] = [{"RuntimeApiKey": []}]
    return operation


def _describe(status: int) -> str:
    return {200: "OK", 201: "Created", 204: "Nothing to claim", 301: "Moved to https", 404: "Not found",
            409: "Conflict with the current state", 502: "Upstream unreachable or failing"}.get(status, "Error")
