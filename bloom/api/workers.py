"""Worker registry: list, show, register, remove."""
from __future__ import annotations

import random
import time

from flask import Blueprint, Response, current_app, g, jsonify

from .. import metrics
from ..http import json_body
from ..schemas import ClaimSchema, PageQuery, RegisterWorkerSchema, load
from ..openapi import documented
from . import query, service

bp = Blueprint("workers", __name__, url_prefix="/api/runtime/workers")


@bp.get("")
@documented("Workers, each with its live active_leases", query=PageQuery, responses={200: "WorkerNode[]"})
def list_workers():
    page = query(PageQuery)
    return jsonify(service().list_workers(limit=page["limit"], offset=page["offset"]))


@bp.get("/<worker_id:worker_id>")
@documented("A worker and its active leases", responses={200: "WorkerDetail", 404: "Error"})
def get_worker(worker_id: str):
    return jsonify(service().get_worker(worker_id))


@bp.post("")
@documented("Register (201) or re-register (200) a worker", body=RegisterWorkerSchema, responses={200: "WorkerNode", 201: "WorkerNode"})
def register_worker():
    body = load(RegisterWorkerSchema, json_body())
    worker, created = service().register_worker(body)
    return jsonify(worker), 201 if created else 200


@bp.delete("/<worker_id:worker_id>")
@documented("Remove a worker", responses={200: "Removed", 404: "Error"})
def remove_worker(worker_id: str):
    return jsonify(service().remove_worker(worker_id))


@bp.post("/<worker_id:worker_id>/claim")
@documented(
    "Lease the next queued task to this worker (long poll with wait_seconds)",
    body=ClaimSchema,
    responses={201: "Claimed", 204: None, 404: "Error", 409: "Error"},
)
def claim(worker_id: str):
    """Lease the next task to this worker; with wait_seconds, long-poll until one comes.

    A poll that finds nothing waits only if this process has room for another waiting
    poll (WaitingRoom); otherwise it answers 204 at once with Retry-After (1 to 3 s), so
    short requests always find a free thread. A waiting poll is woken only by a task its
    agent filter takes (queue_events.py)."""
    body = load(ClaimSchema, json_body())
    events = current_app.extensions["bloom.queue_events"]
    deadline = time.monotonic() + body["wait_seconds"]
    ticket = events.enter_line(body["agent_slugs"]) if body["wait_seconds"] > 0 else None
    try:
        claimed = service().claim_task(worker_id, ttl_seconds=body["ttl_seconds"], agent_slugs=body["agent_slugs"])
        if claimed is not None:
            return jsonify(claimed), 201
        if ticket is None:
            return Response(status=204)
        room = current_app.extensions["bloom.waiting_room"]
        if not room.enter():
            g.retry_after = str(random.randint(1, 3))  # spread the returns
            return Response(status=204)
        waited_from = time.monotonic()
        metrics.LONG_POLLS_WAITING.inc()
        outcome = "nothing"
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                events.wait_in_line(ticket, remaining)
                claimed = service().claim_task(
                    worker_id, ttl_seconds=body["ttl_seconds"], agent_slugs=body["agent_slugs"]
                )
                if claimed is not None:
                    outcome = "claimed"
                    return jsonify(claimed), 201
            return Response(status=204)
        finally:
            room.leave()
            metrics.LONG_POLLS_WAITING.dec()
            metrics.CLAIM_WAIT.labels(outcome).observe(time.monotonic() - waited_from)
    finally:
        if ticket is not None:
            events.leave_line(ticket)
