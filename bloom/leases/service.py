"""Leases and claims: a task granted to one worker at a time, renewed while it runs,
completed once, expired when its worker goes silent.

Every grant, renewal and completion is one statement (or one statement list sent as one
query) whose preconditions (status, lease, worker, capacity) are in its WHERE clause
(bloom/leases/queries.sql): under any concurrency a task has at most one active lease and
an agent never holds more than its capacity. Knows nothing of Flask.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy.exc import DBAPIError

from .. import metrics
from ..artifacts import MinioArtifactStore
from ..bounds import DEFAULT_TIMEOUT_SEC
from ..db import Database
from ..errors import Conflict, NotFound, Unavailable, is_data_error
from ..shapes import artifact_json, capabilities_json, lease_json, result_json, task_json, worker_json
from ..stamps import API_ACTOR, iso, new_id, now_ms
from ..tasks.service import task_status

log = logging.getLogger(__name__)

SWEEP_ACTOR = "lease-sweeper"
DEFAULT_PAGE = 100
# The overview a list without limit answers (list_leases_overview).
OVERVIEW_ACTIVE_ROWS = 5000
OVERVIEW_RECENT_ROWS = 100
# A picked worker can fill up between the pick and its lock; picking again is cheap.
LEASE_PICK_ATTEMPTS = 5
# Tasks a claim may set aside (see set_task_aside) before it gives up for this call.
POISONED_SKIPS_PER_CLAIM = 5


def _is_json(output: str | None) -> bool:
    if output is None:
        return False
    try:
        json.loads(output)
    except (ValueError, RecursionError):
        return False
    return True


class _TrialGrant(Exception):
    """Rolls back a grant made only to see whether it would fail."""


class LeaseService:
    def __init__(self, database: Database, artifacts: MinioArtifactStore | None = None, *,
                 max_running_per_key: int | None = None) -> None:
        self.db = database
        self.artifacts = artifacts
        # BLOOM_MAX_RUNNING_PER_KEY: the cap of a key whose tasks name none (None: no cap).
        self.max_running_per_key = max_running_per_key

    def lease_task(self, task_id: str, *, worker_id: str | None, ttl_seconds: int) -> dict[str, Any]:
        granted = self.grant_lease(task_id, worker_id=worker_id, ttl_seconds=ttl_seconds, push_only=False)
        return {"lease": granted["lease"], "worker": granted["worker"]}

    def grant_lease(
        self, task_id: str, *, worker_id: str | None, ttl_seconds: int | None, push_only: bool,
        actor: str = API_ACTOR, full_addresses: list[str] | None = None,
        leader: tuple[str, int] | None = None,
    ) -> dict[str, Any]:
        """Lease a queued, due task to a worker (the one asked for, or the best eligible
        one); returns {lease, worker, task, address}. With push_only (a dispatch) only
        workers with a url qualify, and without ttl_seconds the lease lasts
        policy.timeout_sec + 60 s; agents at full_addresses get nothing (they hold their
        share of the dispatching process's delivery slots: bloom/agents/delivery_slots.py).
        `leader` (holder, epoch): the dispatcher's leadership, checked in the grant."""
        for _ in range(LEASE_PICK_ATTEMPTS):
            try:
                outcome = self._grant(ttl_seconds, task_id=task_id, worker_id=worker_id, push_only=push_only,
                                      actor=actor, full_addresses=full_addresses or [],
                                      leader=leader[0] if leader else None, leader_epoch=leader[1] if leader else None)
            except DBAPIError as error:
                if not is_data_error(error):
                    raise
                self._set_aside(task_id, error)
                raise Conflict(
                    "Task cannot be leased (a stored value is unusable); it was set aside as 'dead'"
                ) from None
            if outcome["lease"] is not None:
                metrics.LEASES_GRANTED.labels("dispatch" if push_only else "lease").inc()
                worker = {**outcome["worker"], "active_leases": outcome["active_leases"]}
                return {
                    "lease": lease_json(outcome["lease"]),
                    "worker": worker_json(worker),
                    "task": task_json(outcome["task"]),
                    "address": outcome["worker"]["address"],
                }
            task_status = outcome["task_status"]
            if task_status is None:
                raise NotFound("Task not found")
            if task_status != "queued":
                raise Conflict(f"Task status is '{task_status}', expected 'queued'")
            if outcome["not_before"] > now_ms():
                raise Conflict(f"Task is not due until {iso(outcome['not_before'])} "
                               f"({outcome['not_before']} ms, its run_at or retry_at)")
            key_load = outcome["key_load"]
            if key_load and key_load["cap"] is not None and key_load["running"] >= key_load["cap"]:
                raise Conflict(f"Task's concurrency key has {key_load['running']} tasks running, its cap "
                               f"(max_running_per_key {key_load['cap']}); it waits for one of them to end")
            if worker_id is not None:
                self._check_worker_fit(worker_id, outcome["worker"])
                if push_only and not outcome["worker"]["url"]:
                    raise Conflict(f"Worker '{worker_id}' has no url to dispatch to")
                if outcome["worker_full"]:
                    raise Unavailable(f"Worker '{worker_id}' holds its share of this process's deliveries "
                                      "in flight; try again later")
                raise Conflict(f"Worker '{worker_id}' has no free capacity")
            if not outcome["worker_picked"]:
                break
            # The picked worker filled up or went away between the pick and its lock: pick again.
        raise Unavailable("No available worker with free capacity")

    def _grant(self, ttl_seconds: int | None, **params: Any) -> dict[str, Any]:
        """Run the lease statement list with a new lease id, the id of its audit entry and
        the time; its one row says what was granted, or why not. (A claim names its ids
        itself, one per task it may take: claim_tasks.)"""
        return self.db.script(
            "lease_task", lease_id=new_id(), ttl_seconds=ttl_seconds, default_timeout_sec=DEFAULT_TIMEOUT_SEC, now=now_ms(),
            audit_id=new_id(), max_running_per_key=self.max_running_per_key, **params,
        )

    @staticmethod
    def _check_worker_fit(worker_id: str, worker: dict[str, Any] | None) -> dict[str, Any]:
        """Refuse a worker that cannot take work; else return its capabilities. The row
        is read back after a lease or claim that granted nothing, to say why."""
        if worker is None:
            raise NotFound("Worker not found")
        capabilities = capabilities_json(worker["capabilities"])
        if not worker["approved"]:
            raise Conflict(f"Worker '{worker_id}' waits for an operator's approval (or for Membridge to list it)")
        if worker["status"] != "online":
            raise Conflict(f"Worker '{worker_id}' is {worker['status']}, not online")
        if not capabilities["claude_cli"]:
            raise Conflict(f"Worker '{worker_id}' does not have claude_cli")
        return capabilities

    def claim_tasks(
        self, worker_id: str, *, ttl_seconds: int, agent_slugs: list[str] | None, max_tasks: int = 1
    ) -> dict[str, list[dict[str, Any]]] | None:
        """Lease the next queued tasks (priority, then turn: one fairness key after another)
        to this worker, up to max_tasks and its free capacity, passing over keys at their
        cap: {tasks, leases} in queue order, or None if none. A task that cannot be granted
        for a data reason is set aside, and the claim goes on."""
        for _ in range(POISONED_SKIPS_PER_CLAIM + 1):
            try:
                claimed = self.db.script(
                    "claim_task", worker_id=worker_id, agent_slugs=agent_slugs, ttl_seconds=ttl_seconds,
                    max_tasks=max_tasks, lease_ids=[new_id() for _ in range(max_tasks)],
                    audit_ids=[new_id() for _ in range(max_tasks)], now=now_ms(), actor=API_ACTOR,
                    max_running_per_key=self.max_running_per_key,
                )
            except DBAPIError as error:
                if not is_data_error(error) or not self._set_aside_unclaimable(worker_id, agent_slugs, ttl_seconds):
                    raise
                continue
            if claimed["tasks"]:
                metrics.LEASES_GRANTED.labels("claim").inc(len(claimed["tasks"]))
                return {
                    "tasks": [task_json(task) for task in claimed["tasks"]],
                    "leases": [lease_json(lease) for lease in claimed["leases"]],
                }
            self._check_worker_fit(worker_id, claimed["worker"])
            if claimed["address_active_leases"] >= (claimed["address_capacity"] or 0):
                raise Conflict(f"Worker '{worker_id}' has no free capacity")
            return None
        raise Unavailable("The queue holds several tasks that cannot be granted; they are being set aside")

    def _set_aside_unclaimable(self, worker_id: str, agent_slugs: list[str] | None, ttl_seconds: int) -> bool:
        """Find, among the next tasks a claim would take, the one whose grant fails for a
        data reason (each tried in a transaction that is rolled back), and set it aside."""
        with self.db.autocommit() as tx:
            rows = tx.all("claim_candidates", agent_slugs=agent_slugs, limit=10, now=now_ms())
        candidates = [row["id"] for row in rows]
        for task_id in candidates:
            try:
                with self.db.transaction() as tx:
                    tx.one("lease_task", lease_id=new_id(), ttl_seconds=ttl_seconds, default_timeout_sec=DEFAULT_TIMEOUT_SEC,
                           now=now_ms(),
                           audit_id=new_id(), actor=API_ACTOR, task_id=task_id, worker_id=worker_id, push_only=False,
                           full_addresses=[], leader=None, leader_epoch=None,
                           max_running_per_key=self.max_running_per_key)
                    raise _TrialGrant()
            except _TrialGrant:
                continue
            except DBAPIError as error:
                if is_data_error(error):
                    self._set_aside(task_id, error)
                    return True
                raise
        return False

    def _set_aside(self, task_id: str, error: DBAPIError) -> None:
        reason = f"cannot be leased: PostgreSQL refused a stored value ({type(error.orig).__name__})"
        with self.db.autocommit() as tx:
            tx.one("set_task_aside", task_id=task_id, reason=reason, result_id=new_id(), now=now_ms(),
                   audit_id=new_id(), actor=API_ACTOR)
        log.error("task %s set aside as dead: %s", task_id, reason)

    def heartbeat(self, task_id: str, *, lease_id: str | None, worker_id: str | None) -> dict[str, Any]:
        now = now_ms()
        with self.db.autocommit() as tx:
            row = tx.one_or_none(
                "heartbeat_lease", task_id=task_id, lease_id=lease_id, worker_id=worker_id, now=now
            )
        if row is not None and row["lease"] is not None:
            lease = lease_json(row["lease"])
            return {"lease": lease, "expires_at": lease["expires_at"]}
        if row is not None and row["task_status"] == "cancelled":
            raise Conflict("Task cancelled")
        if row is None or row["lease_id"] is None or row["lease_status"] is None:
            raise NotFound("Task or lease not found")
        self._check_fencing(row, lease_id, worker_id)
        if row["lease_status"] != "active":
            raise NotFound("Lease not found or already expired")
        if row["expires_at"] < now:
            raise Conflict("Lease expired")
        # The snapshot showed a live lease, yet it was not renewed: a completion or the
        # sweep ended it while we waited for its row.
        raise NotFound("Lease not found or already expired")

    def heartbeat_worker(self, worker_id: str, *, lease_ids: list[str] | None) -> dict[str, Any]:
        """Renew the named active leases of the worker (none when lease_ids is None: a
        sign of life only) in one statement; say which of the named leases it has lost
        (expired, released by a completion or a cancel, failed, unknown)."""
        with self.db.autocommit() as tx:
            row = tx.one("heartbeat_worker", worker_id=worker_id, lease_ids=lease_ids, now=now_ms())
        if not row["known"]:
            raise NotFound("Worker not found")
        return {"renewed": row["renewed"], "lost": row["lost"]}

    def release_worker_leases(self, worker_id: str, lease_ids: list[str], *, actor: str | None = None) -> dict[str, Any]:
        """Give back the named active leases of the worker: their tasks are queued again
        at once, their attempts given back. Says which were given back; a lease already
        ended (completed, cancelled, expired) or not the worker's is left as it is."""
        with self.db.autocommit() as tx:
            row = tx.one("release_worker_leases", worker_id=worker_id, lease_ids=lease_ids, now=now_ms(),
                         actor=actor or worker_id)
        if not row["known"]:
            raise NotFound("Worker not found")
        metrics.LEASES_RELEASED.inc(len(row["released"]))
        return {"released": row["released"]}

    @staticmethod
    def _check_fencing(row: dict[str, Any], lease_id: str | None, worker_id: str | None) -> None:
        if lease_id is None and row["fenced"]:
            raise Conflict("The task's lease was given out with its id: send lease_id")
        if lease_id is not None and lease_id != row["lease_id"]:
            raise Conflict(f"Lease '{lease_id}' is not the task's current lease")
        if worker_id is not None and worker_id != row["worker_id"]:
            raise Conflict(f"Task is not leased to worker '{worker_id}'")

    def complete_task(self, task_id: str, body: dict[str, Any], *, actor: str = API_ACTOR) -> dict[str, Any]:
        output: Any = body.get("output")
        expected = "expected 'leased' or 'running'"
        now = now_ms()
        upload_to = self.artifacts if output is not None else None
        # With an upload, the lease stays locked from before the upload to the commit.
        with (self.db.transaction() if upload_to is not None else self.db.autocommit()) as tx:
            object_url = None
            if upload_to is not None:
                current = tx.one_or_none("lock_current_lease", task_id=task_id)
                if current is None:
                    raise NotFound("Task not found")
                if current["task_status"] not in ("leased", "running"):
                    raise Conflict(f"Task status is '{current['task_status']}', {expected}")
                content_type = "application/json" if current["desired_format"] == "json" else "text/plain; charset=utf-8"
                object_url = upload_to.put(task_id, output, completed_at_ms=now, content_type=content_type)
            try:
                row = tx.one_or_none(
                    "complete_task",
                    task_id=task_id,
                    lease_id=body.get("lease_id"),
                    worker_id=body.get("worker_id"),
                    result_status=body["status"],
                    output=output,
                    output_is_json=_is_json(output),
                    error_message=body.get("error_message"),
                    metrics=json.dumps(body["metrics"]),
                    artifact_id=new_id(),
                    artifact_type=body["artifact_type"] or "LLM_RESULT",
                    artifact_tags=json.dumps(body["artifact_tags"] or []),
                    artifact_url=object_url,
                    artifact_content=None if object_url is not None else output,
                    result_id=new_id(),
                    now=now,
                    audit_id=new_id(),
                    actor=actor,
                )
                if row is None:
                    raise NotFound("Task not found")
                if row["task"] is None:
                    self._explain_refused_completion(tx, row, body)
            except BaseException:
                # Not committed: the object would be an orphan nothing points to.
                if upload_to is not None and object_url is not None:
                    upload_to.remove(object_url)
                raise
        metrics.LEASES_RELEASED.inc()
        metrics.COMPLETIONS.labels(row["result"]["status"]).inc()
        return {
            "task": task_json(row["task"]),
            "artifact": artifact_json(row["artifact"]),
            "result": result_json(row["result"]),
        }

    def _explain_refused_completion(self, tx, row: dict[str, Any], body: dict[str, Any]) -> None:
        expected = "expected 'leased' or 'running'"
        if row["task_status"] not in ("leased", "running"):
            raise Conflict(f"Task status is '{row['task_status']}', {expected}")
        self._check_fencing(row, body.get("lease_id"), body.get("worker_id"))
        # A racing completion or the sweep got there first.
        raise Conflict(f"Task status is '{task_status(tx, row['task_id'])}', {expected}")

    def sweep_expired_leases(self) -> dict[str, int]:
        with self.db.autocommit() as tx:
            counts = tx.one("sweep_expired_leases", now=now_ms(), actor=SWEEP_ACTOR)
        counts = {key: int(counts[key]) for key in ("expired", "requeued", "dead")}
        metrics.LEASES_EXPIRED.inc(counts["expired"])
        if counts["expired"]:
            log.info("lease sweep: %(expired)d expired, %(requeued)d requeued, %(dead)d dead", counts)
        return counts

    def list_leases(self, *, status: str | None, limit: int | None, offset: int) -> list[dict[str, Any]]:
        """A page, newest first; with no limit (nor status, offset) the overview: every
        active lease, and the newest others."""
        with self.db.autocommit() as tx:
            if limit is None and status is None and offset == 0:
                rows = tx.all("list_leases_overview", active_rows=OVERVIEW_ACTIVE_ROWS,
                              recent_rows=OVERVIEW_RECENT_ROWS)
            else:
                rows = tx.all("list_leases", status=status, limit=limit or DEFAULT_PAGE, offset=offset)
        return [lease_json(row) for row in rows]
