"""The OpenAPI 3 document of the API, generated from the marshmallow schemas (apispec).

Request bodies and query strings are the very schemas the views validate with; each
view declares them with @documented, and the paths come from Flask's URL map, so the
document cannot drift from the routes. Response objects are described by the schemas
below; the schemathesis run in the test suite checks every response against them.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema, fields

from . import schemas

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
        view.__openapi__ = {"summary": summary, "body": body, "query": query, "responses": responses}
        return view

    return attach


# Response objects (SPEC §3) --------------------------------------------------------


class WorkerCapabilities(Schema):
    claude_cli = fields.Boolean(required=True)
    max_concurrency = fields.Integer(required=True)
    labels = fields.List(fields.String(), required=True)


class WorkerNode(Schema):
    id = fields.String(required=True)
    node_id = fields.String(allow_none=True, required=True)
    url = fields.String(allow_none=True, required=True)
    status = fields.String(required=True, metadata={"enum": list(schemas.WORKER_STATUSES)})
    capabilities = fields.Nested(WorkerCapabilities, required=True)
    last_heartbeat = fields.Integer(allow_none=True, required=True)
    ip_addrs = fields.List(fields.String(), required=True)
    obs_count = fields.Integer(required=True)
    db_sha = fields.String(allow_none=True, required=True)
    registered_at = fields.Integer(allow_none=True, required=True)
    active_leases = fields.Integer(required=True)
    agent_version = fields.String(allow_none=True, required=True)
    os_info = fields.Raw(
        allow_none=True, required=True, metadata={"description": "a string or an object, as the agent sent it"}
    )
    install_method = fields.String(allow_none=True, required=True)


class TaskPolicy(Schema):
    timeout_sec = fields.Integer()
    budget = fields.Float()


class LLMTask(Schema):
    id = fields.String(required=True)
    context_id = fields.String(required=True)
    agent_slug = fields.String(required=True)
    prompt = fields.String(required=True)
    context_hints = fields.List(fields.String(), required=True)
    policy = fields.Nested(TaskPolicy, required=True)
    desired_format = fields.String(required=True, metadata={"enum": ["json", "text"]})
    status = fields.String(required=True, metadata={"enum": list(schemas.TASK_STATUSES)})
    created_at = fields.Integer(required=True)
    updated_at = fields.Integer(required=True)
    lease_id = fields.String(allow_none=True, required=True)
    worker_id = fields.String(allow_none=True, required=True)
    attempts = fields.Integer(required=True)
    max_attempts = fields.Integer(required=True)
    priority = fields.Integer(required=True)
    run_at = fields.Integer(allow_none=True, required=True, metadata={"description": "not claimed before (epoch ms)"})
    retry_at = fields.Integer(allow_none=True, required=True,
                              metadata={"description": "after a failed run: not claimed again before (epoch ms)"})


class TaskResult(Schema):
    status = fields.String(required=True, metadata={"enum": ["success", "error"]})
    output = fields.String(allow_none=True, required=True)
    error_message = fields.String(allow_none=True, required=True)
    metrics = fields.Dict(required=True)
    completed_at = fields.Integer(required=True)


class TaskDetail(LLMTask):
    result = fields.Nested(TaskResult, allow_none=True, required=True, metadata={"description": "the latest result"})


class Lease(Schema):
    id = fields.String(required=True)
    task_id = fields.String(required=True)
    worker_id = fields.String(required=True)
    started_at = fields.Integer(required=True)
    expires_at = fields.Integer(required=True)
    ttl_seconds = fields.Integer(required=True)
    status = fields.String(required=True, metadata={"enum": list(schemas.LEASE_STATUSES)})
    last_heartbeat = fields.Integer(required=True)
    context_id = fields.String(allow_none=True, required=True)


class WorkerDetail(WorkerNode):
    leases = fields.List(fields.Nested(Lease), required=True)


class RuntimeArtifact(Schema):
    id = fields.String(required=True)
    task_id = fields.String(required=True)
    job_id = fields.String(allow_none=True, required=True)
    type = fields.String(required=True)
    created_at = fields.Integer(required=True)
    finalized = fields.Boolean(required=True)
    url = fields.String(allow_none=True, required=True)
    entity_refs = fields.List(fields.Raw(), required=True)
    tags = fields.List(fields.String(), required=True)
    content = fields.String(allow_none=True, required=True)
    download_url = fields.String(metadata={"description": "presigned, valid 1 hour; object-stored outputs only"})


class ResultMetrics(Schema):
    duration_ms = fields.Integer(required=True)
    tokens_used = fields.Integer(allow_none=True)


class LLMResult(Schema):
    id = fields.String(required=True)
    task_id = fields.String(required=True)
    worker_id = fields.String(allow_none=True, required=True)
    artifact_id = fields.String(allow_none=True, required=True)
    status = fields.String(required=True, metadata={"enum": ["success", "error"]})
    output = fields.String(allow_none=True, required=True)
    error_message = fields.String(allow_none=True, required=True)
    metrics = fields.Nested(ResultMetrics, required=True)
    completed_at = fields.Integer(required=True)


class AuditLogEntry(Schema):
    id = fields.String(required=True)
    timestamp = fields.Integer(required=True)
    action = fields.String(required=True)
    entity_type = fields.String(required=True)
    entity_id = fields.String(allow_none=True, required=True)
    actor = fields.String(allow_none=True, required=True)
    detail = fields.Dict(allow_none=True, required=True)


class RuntimeConfig(Schema):
    membridge_server_url = fields.String(required=True)
    admin_key_masked = fields.String(required=True)
    connected = fields.Boolean(required=True)
    last_test = fields.Integer(allow_none=True, required=True)


class MembridgeStatus(Schema):
    consecutiveFailures = fields.Integer(required=True)
    lastSuccess = fields.Integer(allow_none=True, required=True)
    lastError = fields.String(allow_none=True, required=True)
    connected = fields.Boolean(required=True)


class Health(Schema):
    status = fields.String(required=True)
    service = fields.String(required=True)
    uptime = fields.Float(required=True)
    storage = fields.String(required=True)
    membridge = fields.Nested(MembridgeStatus, required=True)


class Ready(Schema):
    status = fields.String(required=True)
    error = fields.String()


class LeaseGrant(Schema):
    lease = fields.Nested(Lease, required=True)
    worker = fields.Nested(WorkerNode, required=True)


class HeartbeatReply(Schema):
    lease = fields.Nested(Lease, required=True)
    expires_at = fields.Integer(required=True)


class Completion(Schema):
    task = fields.Nested(LLMTask, required=True)
    artifact = fields.Nested(RuntimeArtifact, required=True)
    result = fields.Nested(LLMResult, required=True)


class Claimed(Schema):
    """Without max_tasks: task and lease. With max_tasks: tasks and leases (the i-th lease
    is the i-th task's), one to max_tasks of them, in queue order."""

    task = fields.Nested(LLMTask, metadata={"description": "when max_tasks was not given"})
    lease = fields.Nested(Lease, metadata={"description": "when max_tasks was not given"})
    tasks = fields.List(fields.Nested(LLMTask), metadata={"description": "when max_tasks was given"})
    leases = fields.List(fields.Nested(Lease), metadata={"description": "when max_tasks was given"})


class RenewedLease(Schema):
    lease_id = fields.String(required=True)
    task_id = fields.String(required=True)
    expires_at = fields.Integer(required=True)


class LostLease(Schema):
    lease_id = fields.String(required=True)
    task_id = fields.String(allow_none=True, required=True)
    lease_status = fields.String(required=True, metadata={"enum": ["expired", "released", "failed", "unknown"]})
    task_status = fields.String(allow_none=True, required=True)


class WorkerHeartbeatReply(Schema):
    renewed = fields.List(fields.Nested(RenewedLease), required=True)
    lost = fields.List(fields.Nested(LostLease), required=True)


class TaskBatch(Schema):
    tasks = fields.List(fields.Nested(LLMTask), required=True)


class Dispatched(Schema):
    dispatched = fields.Boolean(required=True)
    task_id = fields.String(required=True)
    worker_id = fields.String(required=True)
    lease_id = fields.String(metadata={"description": "when dispatched"})
    error = fields.String(metadata={"description": "why the agent did not take it"})


class Removed(Schema):
    removed = fields.Boolean(required=True)
    id = fields.String(required=True)


class StatsTasks(Schema):
    total = fields.Integer(required=True)
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class StatsLeases(Schema):
    total = fields.Integer(required=True)
    active = fields.Integer(required=True)


class StatsWorkers(Schema):
    total = fields.Integer(required=True)
    online = fields.Integer(required=True)


class Stats(Schema):
    tasks = fields.Nested(StatsTasks, required=True)
    leases = fields.Nested(StatsLeases, required=True)
    workers = fields.Nested(StatsWorkers, required=True)
    estimated = fields.Boolean(metadata={
        "description": "present (true) past 200,000 tasks: finished counts and the lease total are "
                       "PostgreSQL's estimates (as of its last ANALYZE); live counts stay exact"})


class ConnectionTest(Schema):
    connected = fields.Boolean(required=True)
    health = fields.Dict()
    error = fields.String()


# Leaves before the objects that nest them: apispec names a nested schema when it first meets it.
_OBJECTS = [
    Lease, WorkerNode, WorkerDetail, LLMTask, TaskResult, TaskDetail, RuntimeArtifact, LLMResult, AuditLogEntry, RuntimeConfig, Health,
    Ready, LeaseGrant, HeartbeatReply, Completion, Claimed, Dispatched, Removed, Stats, ConnectionTest,
    RenewedLease, LostLease, WorkerHeartbeatReply, TaskBatch,
]

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
    for schema in _OBJECTS:
        spec.components.schema(schema.__name__, schema=schema)

    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions.get(rule.endpoint)
        meta = getattr(view, "__openapi__", None)
        if meta is None:
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
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
    if path not in _OPEN_ROUTES and path != "/api/runtime/test-connection":
        operation["security"] = [{"RuntimeApiKey": []}]
    return operation


def _describe(status: int) -> str:
    return {200: "OK", 201: "Created", 204: "Nothing to claim", 301: "Moved to https", 404: "Not found",
            409: "Conflict with the current state", 502: "Upstream unreachable or failing"}.get(status, "Error")
