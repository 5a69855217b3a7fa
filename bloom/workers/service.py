"""The worker registry: list, show, register (or register again), remove.

Knows nothing of Flask. The Membridge sync (sync.py) and the runtime's own liveness
evidence (liveness.py) write the same rows; every statement is in
bloom/workers/queries.sql.
"""
from __future__ import annotations

import json
from typing import Any

from ..db import Database
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..shapes import DEFAULT_CAPABILITIES, lease_json, worker_json
from ..stamps import API_ACTOR, new_id, now_ms


def agent_url_of(database: Database, worker_id: str) -> str:
    """The url of a worker's agent, for a call to it: 404 for an unknown worker, 400 for one
    without a url. The connection goes back to the pool before the call is made."""
    with database.autocommit() as tx:
        row = tx.one_or_none("get_worker", worker_id=worker_id)
    if row is None:
        raise NotFound("Worker not found")
    if not row["url"]:
        raise BadRequest("Worker has no URL configured")
    if not row["approved"]:
        raise Conflict(f"Worker '{worker_id}' waits for an operator's approval: approve it before calling its agent")
    return row["url"]


class WorkerService:
    def __init__(self, database: Database) -> None:
        self.db = database

    def list_workers(self, *, limit: int, offset: int) -> list[dict[str, Any]]:
        with self.db.autocommit() as tx:
            return [worker_json(row) for row in tx.all("list_workers", limit=limit, offset=offset)]

    def get_worker(self, worker_id: str) -> dict[str, Any]:
        with self.db.autocommit() as tx:
            row = tx.one_or_none("get_worker", worker_id=worker_id)
            if row is None:
                raise NotFound("Worker not found")
            leases = tx.all("list_active_leases_of_worker", worker_id=worker_id)
        return {**worker_json(row), "leases": [lease_json(lease) for lease in leases]}

    def register_worker(self, body: dict[str, Any], *, by_operator: bool = True) -> tuple[dict[str, Any], bool]:
        """Create or re-register a worker; returns (worker, created). Not `by_operator`
        (the workers' key), an existing worker's url cannot change, nor a push worker's
        status and capacity (queries.sql, register_worker)."""
        capabilities = body.get("capabilities")
        ip_addrs = body.get("ip_addrs")
        os_info = body.get("os_info")
        with self.db.autocommit() as tx:
            row = tx.one_or_none(
                "register_worker",
                worker_id=body["name"],
                url=body.get("url"),
                status=body["status"],
                capabilities=json.dumps(capabilities) if capabilities is not None else None,
                default_capabilities=json.dumps(DEFAULT_CAPABILITIES),
                ip_addrs=json.dumps(ip_addrs) if ip_addrs is not None else None,
                agent_version=body.get("agent_version"),
                os_info=json.dumps(os_info) if os_info is not None else None,
                install_method=body.get("install_method"),
                now=now_ms(),
                audit_id=new_id(),
                actor=API_ACTOR,
                by_operator=by_operator,
            )
        if row is None:
            raise Forbidden(f"Only an operator may change the url of worker '{body['name']}'")
        return worker_json(row), bool(row["inserted"])

    def approve_worker(self, worker_id: str) -> dict[str, Any]:
        """An operator vouches for a worker: from now on it may be sent tasks, probes and
        the agent key."""
        with self.db.autocommit() as tx:
            row = tx.one_or_none("approve_worker", worker_id=worker_id, now=now_ms(), audit_id=new_id(),
                                 actor=API_ACTOR)
        if row is None:
            raise NotFound("Worker not found")
        return worker_json(row)

    def remove_worker(self, worker_id: str) -> dict[str, Any]:
        """Remove a worker; its leases end now and their tasks go back to the queue (a run
        that never started gets its attempt back), in the same transaction."""
        now = now_ms()
        with self.db.transaction() as tx:
            tx.one("take_workers_out", worker_ids=[worker_id], reason="removed by an operator", requeue_started=True,
                   claude_cli_missing=False, out_status="offline", audit_out=False, now=now, actor=API_ACTOR)
            row = tx.one_or_none("delete_worker", worker_id=worker_id, now=now, audit_id=new_id(), actor=API_ACTOR)
        if row is None:
            raise NotFound("Worker not found")
        return {"removed": True, "id": row["id"]}
