"""Workers: the registry (list, show, register, remove), and what a worker does itself
(claim, worker heartbeat)."""
from __future__ import annotations

import functools
import random
import time

from flask import Blueprint, Response, g, jsonify

from .. import metrics, task_bodies
from ..errors import ValidationFailed
from ..schemas import ClaimSchema, PageQuery, RegisterWorkerSchema, WorkerHeartbeatSchema, WorkerReleaseSchema
from ..services import services
from ..web.guards import caller_is_operator, load_body, worker_route
from ..web.openapi import documented
from . import query

bp = Blueprint("workers", __name__, url_prefix="/api/runtime/workers")


@bp.get("")
@documented("Workers, each with its live active_leases", query=PageQuery, responses={200: "WorkerNode[]"})
def list_workers():
    page = query(PageQuery)
    return jsonify(services().workers.list_workers(limit=page["limit"], offset=page["offset"]))


@bp.get("/<worker_id:worker_id>")
@documented("A worker and its active leases", responses={200: "WorkerDetail", 404: "Error"})
def get_worker(worker_id: str):
    return jsonify(services().workers.get_worker(worker_id))


@bp.post("")
@documented("Register (201) or re-register (200) a worker", body=RegisterWorkerSchema, responses={200: "WorkerNode", 201: "WorkerNode", 403: "Error"})
@worker_route
def register_worker():
    body = load_body(RegisterWorkerSchema)
    if body["url"] is not None and services().agents.networks.literal_outside(body["url"]):
        raise ValidationFailed([], {"url": ["Must point inside BLOOM_AGENT_NETWORKS (where agents may live)."]})
    worker, created = services().workers.register_worker(body, by_operator=caller_is_operator())
    return jsonify(worker), 201 if created else 200


@bp.post("/<worker_id:worker_id>/approve")
@documented("Vouch for a worker: a push worker that registered itself with the workers' key is sent "
            "nothing until an operator approves it (or Membridge lists it)",
            responses={200: "WorkerNode", 404: "Error"})
def approve_worker(worker_id: str):
    return jsonify(services().workers.approve_worker(worker_id))


@bp.delete("/<worker_id:worker_id>")
@documented("Remove a worker", responses={200: "Removed", 404: "Error"})
def remove_worker(worker_id: str):
    return jsonify(services().workers.remove_worker(worker_id))


@bp.post("/<worker_id:worker_id>/heartbeat")
@documented(
    "Renew the leases this worker names (every one when it names none) in one call; says which are lost",
    body=WorkerHeartbeatSchema,
    responses={200: "WorkerHeartbeatReply", 404: "Error"},
)
@worker_route
def heartbeat_worker(worker_id: str):
    body = load_body(WorkerHeartbeatSchema, fast=task_bodies.worker_heartbeat)
    return jsonify(services().leases.heartbeat_worker(worker_id, lease_ids=body["lease_ids"]))


@bp.post("/<worker_id:worker_id>/release")
@documented(
    "Give back leases this worker will not run to the end: their tasks are queued again at once, "
    "without spending an attempt",
    body=WorkerReleaseSchema,
    responses={200: "WorkerReleaseReply", 404: "Error"},
)
@worker_route
def release_leases(worker_id: str):
    body = load_body(WorkerReleaseSchema)
    return jsonify(services().leases.release_worker_leases(worker_id, body["lease_ids"]))


@bp.post("/<worker_id:worker_id>/claim")
@documented(
    "Lease the next queued task to this worker (long poll with wait_seconds); with max_tasks, "
    "up to that many (within its free capacity), answered as {tasks, leases}",
    body=ClaimSchema,
    responses={201: "Claimed", 204: None, 404: "Error", 409: "Error"},
)
@worker_route
def claim(worker_id: str):
    """Lease the next task to this worker; with wait_seconds, long-poll until one comes.

    A poll that finds nothing waits only if this process has room for another waiting
    poll (WaitingRoom); otherwise it answers 204 at once with Retry-After (1 to 3 s), so
    short requests always find a free thread. A waiting poll is woken only by a task its
    agent filter takes (queue_events.py).

    Without max_tasks the answer is one task, {task, lease}, as the Express service gave
    it; with max_tasks (1 to 32) it is {tasks, leases}, in queue order, from one statement."""
    body = load_body(ClaimSchema, fast=task_bodies.claim)
    claim_now = functools.partial(
        services().leases.claim_tasks, worker_id, ttl_seconds=body["ttl_seconds"], agent_slugs=body["agent_slugs"],
        max_tasks=body["max_tasks"] or 1,
    )
    if body["wait_seconds"] <= 0:
        claimed = claim_now()
    else:
        events = services().queue_events
        deadline = time.monotonic() + body["wait_seconds"]
        ticket = events.enter_line(body["agent_slugs"])  # before looking: no wake-up is missed
        try:
            claimed = claim_now() or _wait_for_a_task(claim_now, events, ticket, deadline)
        finally:
            events.leave_line(ticket)
        if claimed is _NO_ROOM:
            g.retry_after = str(random.randint(1, 3))  # spread the returns
            return Response(status=204)
    if claimed is None:
        return Response(status=204)
    if body["max_tasks"] is None:
        return jsonify({"task": claimed["tasks"][0], "lease": claimed["leases"][0]}), 201
    return jsonify(claimed), 201


_NO_ROOM = object()


def _wait_for_a_task(claim_now, events, ticket, deadline: float):
    """Wait in this process's waiting room until a task comes or the deadline passes:
    the claimed task, None, or _NO_ROOM when the room is full."""
    room = services().waiting_room
    if not room.enter():
        return _NO_ROOM
    waited_from = time.monotonic()
    metrics.LONG_POLLS_WAITING.inc()
    claimed = None
    try:
        while claimed is None and (remaining := deadline - time.monotonic()) > 0:
            woken = events.wait_in_line(ticket, remaining)
            if not woken and time.monotonic() >= deadline:
                break  # time is up and nothing came: no last look, which a burst of polls would all take at once
            claimed = claim_now()
        return claimed
    finally:
        room.leave()
        metrics.LONG_POLLS_WAITING.dec()
        outcome = "claimed" if claimed is not None else "nothing"
        metrics.CLAIM_WAIT.labels(outcome).observe(time.monotonic() - waited_from)
