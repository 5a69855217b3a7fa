"""The JSON shape of every object the API answers with, in one place (docs/API.md, Objects).

Each shape is a marshmallow schema. The OpenAPI document describes answers with it
(openapi.py), and the serializers below are built from it: every *required* field of
an object's schema is written, read from the row by the field's `from_row` (or taken as
the column of its name). An optional field (an artifact's `download_url`, the stats'
`estimated`) is added by the code that knows it. So a field added, renamed or dropped in
a schema changes the document and every answer together, and a test checks the routes'
answers against the document (tests/test_documented_answers.py).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import Schema, fields

from . import bounds, schemas

DEFAULT_CAPABILITIES = {"claude_cli": True, "max_concurrency": 1, "labels": []}
CLONE_STATUSES = ("pending", "cloning", "cloned", "failed", "propagating", "synced")
DEFAULT_POLICY = {"timeout_sec": bounds.DEFAULT_TIMEOUT_SEC, "budget": 0}


def capabilities_json(stored: Any) -> dict[str, Any]:
    stored = stored if isinstance(stored, dict) else {}
    return {
        "claude_cli": stored.get("claude_cli", True),
        "max_concurrency": stored.get("max_concurrency", 1),
        "labels": stored.get("labels", []),
    }


def _or(name: str, default: Any) -> Callable[[Mapping[str, Any]], Any]:
    """Read column `name`, or (a copy of) `default` when it is null or missing."""
    if isinstance(default, (dict, list)):
        return lambda row: row.get(name) or default.copy()
    return lambda row: row.get(name) or default


# Objects ---------------------------------------------------------------------------


class WorkerCapabilities(Schema):
    claude_cli = fields.Boolean(required=True)
    max_concurrency = fields.Integer(required=True)
    labels = fields.List(fields.String(), required=True)


class WorkerNode(Schema):
    id = fields.String(required=True)
    node_id = fields.String(allow_none=True, required=True)
    url = fields.String(allow_none=True, required=True)
    status = fields.String(required=True, metadata={"enum": list(bounds.WORKER_STATUSES)})
    capabilities = fields.Nested(WorkerCapabilities, required=True,
                                 metadata={"from_row": lambda row: capabilities_json(row.get("capabilities"))})
    last_heartbeat = fields.Integer(allow_none=True, required=True)
    ip_addrs = fields.List(fields.String(), required=True, metadata={"from_row": _or("ip_addrs", [])})
    obs_count = fields.Integer(required=True, metadata={"from_row": _or("obs_count", 0)})
    db_sha = fields.String(allow_none=True, required=True)
    registered_at = fields.Integer(allow_none=True, required=True)
    active_leases = fields.Integer(required=True, metadata={"from_row": lambda row: int(row.get("active_leases") or 0)})
    agent_version = fields.String(allow_none=True, required=True)
    os_info = fields.Raw(
        allow_none=True, required=True, metadata={"description": "a string or an object, as the agent sent it"}
    )
    install_method = fields.String(allow_none=True, required=True)
    approved = fields.Boolean(required=True, metadata={
        "description": "vouched for by an operator or Membridge; a push worker that is not gets nothing pushed",
        "from_row": lambda row: bool(row.get("approved", True))})


class TaskPolicy(Schema):
    timeout_sec = fields.Integer()
    budget = fields.Float()
    max_running_per_key = fields.Integer(metadata={"description": "present when the task was created with it"})


class LLMTask(Schema):
    id = fields.String(required=True)
    context_id = fields.String(required=True)
    agent_slug = fields.String(required=True)
    prompt = fields.String(required=True)
    context_hints = fields.List(fields.String(), required=True, metadata={"from_row": _or("context_hints", [])})
    policy = fields.Nested(TaskPolicy, required=True, metadata={"from_row": _or("policy", DEFAULT_POLICY)})
    desired_format = fields.String(required=True, metadata={"enum": ["json", "text"]})
    status = fields.String(required=True, metadata={"enum": list(schemas.TASK_STATUSES)})
    created_at = fields.Integer(required=True)
    updated_at = fields.Integer(required=True)
    lease_id = fields.String(allow_none=True, required=True)
    worker_id = fields.String(allow_none=True, required=True)
    attempts = fields.Integer(required=True)
    max_attempts = fields.Integer(required=True)
    priority = fields.Integer(required=True, metadata={"from_row": _or("priority", 0)})
    run_at = fields.Integer(allow_none=True, required=True, metadata={"description": "not claimed before (epoch ms)"})
    retry_at = fields.Integer(allow_none=True, required=True,
                              metadata={"description": "after a failed run: not claimed again before (epoch ms)"})
    concurrency_key = fields.String(required=True, metadata={
        "description": "the key it shares the queue under: the one it was created with, else its context_id",
        "from_row": lambda row: row.get("fairness_key") or row.get("context_id")})


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
    finalized = fields.Boolean(required=True, metadata={"from_row": lambda row: bool(row.get("finalized"))})
    url = fields.String(allow_none=True, required=True)
    entity_refs = fields.List(fields.Raw(), required=True, metadata={"from_row": _or("entity_refs", [])})
    tags = fields.List(fields.String(), required=True, metadata={"from_row": _or("tags", [])})
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
    metrics = fields.Nested(ResultMetrics, required=True, metadata={"from_row": _or("metrics", {})})
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


class WorkerReleaseReply(Schema):
    released = fields.List(fields.String(), required=True,
                           metadata={"description": "the leases given back (their tasks queued again)"})


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


class StatsKey(Schema):
    key = fields.String(required=True)
    queued = fields.Integer(required=True)
    running = fields.Integer(required=True, metadata={"description": "leased or running"})


class StatsKeys(Schema):
    with_queued = fields.Integer(required=True, metadata={"description": "fairness keys with queued tasks"})
    busiest = fields.List(fields.Nested(StatsKey), required=True,
                          metadata={"description": "the 10 keys with the most tasks queued and running"})


class Stats(Schema):
    tasks = fields.Nested(StatsTasks, required=True)
    leases = fields.Nested(StatsLeases, required=True)
    workers = fields.Nested(StatsWorkers, required=True)
    concurrency_keys = fields.Nested(StatsKeys, required=True)
    estimated = fields.Boolean(metadata={
        "description": "present (true) past 200,000 tasks: finished counts and the lease total are "
                       "PostgreSQL's estimates (as of its last ANALYZE); live counts stay exact"})


class AgentHealth(Schema):
    """What the agent's /health said, as it said it, with `reachable`."""

    class Meta:
        unknown = "include"

    reachable = fields.Boolean(required=True)
    error = fields.String(metadata={"description": "why not, when not reachable"})
    version = fields.String(metadata={"description": "the agent's version, as it says"})


class AgentOperation(Schema):
    """The agent's answer, as it said it, with `status`: updated, restarted, uninstalled."""

    class Meta:
        unknown = "include"

    status = fields.String(required=True, metadata={"enum": ["updated", "restarted", "uninstalled"]})


class ProjectNodeStatus(Schema):
    id = fields.String(required=True)
    project_id = fields.String(required=True)
    node_id = fields.String(required=True)
    clone_status = fields.String(required=True, metadata={"enum": list(CLONE_STATUSES)})
    last_sync_at = fields.Integer(allow_none=True, required=True)
    error_message = fields.String(allow_none=True, required=True)
    repo_path = fields.String(allow_none=True, required=True)


class ManagedProject(Schema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    repo_url = fields.String(required=True)
    canonical_id = fields.String(required=True, metadata={"description": "first 16 hex digits of sha256(name)"})
    target_path = fields.String(allow_none=True, required=True)
    clone_status = fields.String(required=True, metadata={"enum": list(CLONE_STATUSES)})
    primary_node_id = fields.String(allow_none=True, required=True)
    created_at = fields.Integer(required=True)
    updated_at = fields.Integer(required=True)
    error_message = fields.String(allow_none=True, required=True)


class ProjectDetail(ManagedProject):
    nodes = fields.List(fields.Nested(ProjectNodeStatus), required=True)


class ProjectCloned(Schema):
    status = fields.String(required=True, metadata={"enum": ["cloned"]})
    node = fields.Nested(ProjectNodeStatus, required=True)
    result = fields.Dict(required=True, metadata={"description": "the agent's answer"})


class PropagationResult(Schema):
    node_id = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": ["cloned", "failed"]})
    error = fields.String()


class Propagated(Schema):
    status = fields.String(required=True, metadata={"enum": ["synced", "partial", "nothing_to_propagate"]})
    results = fields.List(fields.Nested(PropagationResult))
    message = fields.String()


class MemorySynced(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok"]})
    direction = fields.String(required=True, metadata={"enum": ["push", "pull"]})
    node = fields.String(required=True)
    result = fields.Dict(required=True, metadata={"description": "the control plane's answer"})


class ConnectionTest(Schema):
    connected = fields.Boolean(required=True)
    health = fields.Dict()
    error = fields.String()


# Leaves before the objects that nest them: apispec names a nested schema when it first meets it.
RESPONSE_OBJECTS = [
    Lease, WorkerNode, WorkerDetail, LLMTask, TaskResult, TaskDetail, RuntimeArtifact, LLMResult, AuditLogEntry, RuntimeConfig, Health,
    Ready, LeaseGrant, HeartbeatReply, Completion, Claimed, Dispatched, Removed, Stats, ConnectionTest,
    RenewedLease, LostLease, WorkerHeartbeatReply, WorkerReleaseReply, TaskBatch, AgentHealth, AgentOperation,
    ProjectNodeStatus, ManagedProject, ProjectDetail, ProjectCloned, PropagationResult, Propagated, MemorySynced,
]


def row_serializer(shape: type[Schema]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """row -> the object's JSON: every required field of `shape`, in its order."""
    plan = tuple(
        (name, field.metadata.get("from_row") or (lambda row, column=name: row.get(column)))
        for name, field in shape._declared_fields.items() if field.required
    )

    def to_json(row: Mapping[str, Any]) -> dict[str, Any]:
        return {name: read(row) for name, read in plan}

    to_json.__name__ = f"{shape.__name__}_json"
    return to_json


worker_json = row_serializer(WorkerNode)
task_json = row_serializer(LLMTask)
lease_json = row_serializer(Lease)
artifact_json = row_serializer(RuntimeArtifact)
result_json = row_serializer(LLMResult)
audit_json = row_serializer(AuditLogEntry)
project_json = row_serializer(ManagedProject)
node_status_json = row_serializer(ProjectNodeStatus)
