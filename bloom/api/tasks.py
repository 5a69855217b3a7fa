"""LLM tasks: create (one or a batch), list, read, lease, dispatch, heartbeat, complete,
cancel, requeue, and an agent's fenced delivery callbacks."""
from __future__ import annotations

from flask import Blueprint, jsonify, request

from .. import task_bodies
from ..errors import Conflict, ValidationFailed
from ..schemas import (
    CompleteTaskSchema,
    CreateTaskSchema,
    CreateTasksSchema,
    DispatchTaskSchema,
    FencingSchema,
    LeaseTaskSchema,
    TaskListQuery,
)
from ..services import services
from ..web.guards import load_body, worker_route
from ..web.openapi import documented
from . import query

bp = Blueprint("tasks", __name__, url_prefix="/api/runtime")

RUNS_SHOWN = 50


IDEMPOTENCY_KEY_MAX = 255


@bp.post("/llm-tasks")
@documented(
    "Create a task (an Idempotency-Key header returns the earlier task, 200)",
    body=CreateTaskSchema,
    responses={200: "LLMTask", 201: "LLMTask", 422: "Error"},
)
def create_task():
    body = load_body(CreateTaskSchema, fast=task_bodies.single_task)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
        raise ValidationFailed([f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters"], {})
    task, created = services().tasks.create_task(body, idempotency_key=key)
    return jsonify(task), 201 if created else 200


@bp.post("/llm-tasks/batch")
@documented(
    "Create up to 1,000 tasks in one statement, all or nothing (each item may carry its idempotency_key)",
    body=CreateTasksSchema,
    responses={200: "TaskBatch", 201: "TaskBatch", 422: "Error"},
)
def create_tasks():
    body = load_body(CreateTasksSchema, fast=task_bodies.task_batch)
    tasks, created = services().tasks.create_tasks(body["tasks"])
    return jsonify({"tasks": tasks}), 201 if created else 200


@bp.get("/llm-tasks")
@documented("Tasks, newest first", query=TaskListQuery, responses={200: "LLMTask[]"})
def list_tasks():
    params = query(TaskListQuery)
    return jsonify(services().tasks.list_tasks(status=params["status"], limit=params["limit"], offset=params["offset"]))


@bp.get("/llm-tasks/<task_id>")
@documented("One task, with its latest result", responses={200: "TaskDetail", 404: "Error"})
def get_task(task_id: str):
    return jsonify(services().tasks.get_task(task_id))


@bp.post("/llm-tasks/<task_id>/lease")
@documented(
    "Lease a queued task to a worker",
    body=LeaseTaskSchema,
    responses={201: "LeaseGrant", 404: "Error", 409: "Error"},
)
def lease_task(task_id: str):
    body = load_body(LeaseTaskSchema, fast=task_bodies.lease)
    granted = services().leases.lease_task(task_id, worker_id=body["worker_id"], ttl_seconds=body["ttl_seconds"])
    return jsonify(granted), 201


@bp.post("/llm-tasks/<task_id>/dispatch")
@documented(
    "Lease a queued task to a push worker (one with a url) and deliver it to the agent",
    body=DispatchTaskSchema,
    responses={202: "Dispatched", 404: "Error", 409: "Error", 502: "Dispatched", 503: "Error"},
)
def dispatch_task(task_id: str):
    body = load_body(DispatchTaskSchema)
    outcome = services().dispatcher.dispatch(
        task_id, worker_id=body["worker_id"], ttl_seconds=body["ttl_seconds"]
    )
    return jsonify(outcome.json()), 202 if outcome.dispatched else 502


@bp.post("/llm-tasks/<task_id>/heartbeat")
@documented(
    "Renew the task's lease; the task becomes running",
    body=FencingSchema,
    responses={200: "HeartbeatReply", 404: "Error", 409: "Error"},
)
@worker_route
def heartbeat(task_id: str):
    body = load_body(FencingSchema, fast=task_bodies.fencing)
    return jsonify(services().leases.heartbeat(task_id, lease_id=body["lease_id"], worker_id=body["worker_id"]))


@bp.post("/llm-tasks/<task_id>/complete")
@documented(
    "Complete a leased or running task with its result",
    body=CompleteTaskSchema,
    responses={200: "Completion", 404: "Error", 409: "Error"},
)
@worker_route
def complete_task(task_id: str):
    body = load_body(CompleteTaskSchema, fast=task_bodies.completion)
    return jsonify(services().leases.complete_task(task_id, body))


@bp.post("/llm-tasks/<task_id>/cancel")
@documented(
    "Cancel a queued, leased or running task (its worker's next heartbeat gets 409 'Task cancelled')",
    responses={200: "LLMTask", 404: "Error", 409: "Error"},
)
def cancel_task(task_id: str):
    return jsonify(services().tasks.cancel_task(task_id))


@bp.post("/llm-tasks/<task_id>/requeue")
@documented("Queue a failed or dead task again", responses={200: "LLMTask", 404: "Error", 409: "Error"})
def requeue_task(task_id: str):
    return jsonify(services().tasks.requeue_task(task_id))


@bp.get("/runs")
@documented("The 50 newest tasks", responses={200: "LLMTask[]"})
def runs():
    return jsonify(services().tasks.list_tasks(status=None, limit=RUNS_SHOWN, offset=0))


# Callbacks of one delivery to a Membridge agent. The agent calls
# `{runtime_url}/api/runtime/llm-tasks/<id>/heartbeat|complete`, and the runtime_url it was
# given names the lease of that delivery (dispatch.delivery_callback_url): the lease
# fences the callback, as a body's lease_id does, so an agent that froze, was taken out
# and woke up late cannot touch the task another worker now holds.

@bp.post("/deliveries/<lease_id>/api/runtime/llm-tasks/<task_id>/heartbeat")
@documented(
    "An agent's task heartbeat, fenced by the lease of the delivery that sent it the task",
    body=FencingSchema,
    responses={200: "HeartbeatReply", 404: "Error", 409: "Error"},
)
@worker_route
def delivery_heartbeat(lease_id: str, task_id: str):
    body = load_body(FencingSchema, fast=task_bodies.fencing)
    _check_same_lease(lease_id, body.get("lease_id"))
    return jsonify(services().leases.heartbeat(task_id, lease_id=lease_id, worker_id=body["worker_id"]))


@bp.post("/deliveries/<lease_id>/api/runtime/llm-tasks/<task_id>/complete")
@documented(
    "An agent's completion, fenced by the lease of the delivery that sent it the task",
    body=CompleteTaskSchema,
    responses={200: "Completion", 404: "Error", 409: "Error"},
)
@worker_route
def delivery_complete(lease_id: str, task_id: str):
    body = load_body(CompleteTaskSchema, fast=task_bodies.completion)
    _check_same_lease(lease_id, body.get("lease_id"))
    return jsonify(services().leases.complete_task(task_id, {**body, "lease_id": lease_id}))


def _check_same_lease(in_path: str, in_body: str | None) -> None:
    if in_body is not None and in_body != in_path:
        raise Conflict(f"Lease '{in_body}' is not the lease of this delivery")
