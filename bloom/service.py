"""The runtime's operations on tasks, leases and workers. Knows nothing of Flask.

Every operation is one unit of work, and every state change one statement whose
precondition is in its WHERE clause (see queries.sql), so concurrent requests and
several processes cannot leave a task, lease or worker half updated.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.exc import DBAPIError

from . import metrics
from .artifacts import MinioArtifactStore
from .db import Database
from .errors import Conflict, Forbidden, NotFound, Unavailable, Unprocessable, ValidationFailed, is_data_error
from .schemas import TASK_STATUSES
from .serialize import (
    DEFAULT_CAPABILITIES,
    artifact_json,
    audit_json,
    capabilities_json,
    lease_json,
    result_json,
    task_json,
    worker_json,
)

log = logging.getLogger(__name__)

API_ACTOR = "api"
SWEEP_ACTOR = "lease-sweeper"
# A picked worker can fill up between the pick and its lock; picking again is cheap.
LEASE_PICK_ATTEMPTS = 5
# Past this many tasks, /stats estimates the finished counts instead of counting them.
STATS_EXACT_BELOW_ROWS = 200_000
# A cancel racing grants locks the task's newest lease and tries again (cancel_task).
CANCEL_ATTEMPTS = 5
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


def _fingerprint(body: dict[str, Any]) -> str:
    """The validated request (defaults filled in), canonically encoded and hashed."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _TrialGrant(Exception):
    """Rolls back a grant made only to see whether it would fail."""


def now_ms() -> int:
    return int(time.time() * 1000)


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_id() -> str:
    return str(uuid.uuid4())


class RuntimeService:
    def __init__(self, database: Database, artifacts: MinioArtifactStore | None = None) -> None:
        self.db = database
        self.artifacts = artifacts

    # Workers ---------------------------------------------------------------

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

    def register_worker(self, body: dict[str, Any], *, may_move: bool = True) -> tuple[dict[str, Any], bool]:
        """Create or re-register a worker; returns (worker, created). Without `may_move`
        (not an operator), an existing worker's url cannot change."""
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
                may_move=may_move,
            )
        if row is None:
            raise Forbidden(f"Only an operator may change the url of worker '{body['name']}'")
        return worker_json(row), bool(row["inserted"])

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

    # Tasks -----------------------------------------------------------------

    def create_task(self, body: dict[str, Any], *, idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """Create a task; returns (task, created). A reused Idempotency-Key returns the
        task created with it earlier, also when two such requests race; reused with
        another request, it is refused (422), as payment APIs do."""
        fingerprint = _fingerprint(body) if idempotency_key is not None else None
        with self.db.autocommit() as tx:
            row = tx.one_or_none(
                "create_task",
                task_id=new_id(),
                context_id=body["context_id"],
                agent_slug=body["agent_slug"],
                prompt=body["prompt"],
                context_hints=json.dumps(body["context_hints"]),
                policy=json.dumps(body["policy"]),
                desired_format=body["desired_format"],
                max_attempts=body["max_attempts"],
                priority=body["priority"],
                run_at=body["run_at"],
                idempotency_key=idempotency_key,
                idempotency_fingerprint=fingerprint,
                now=now_ms(),
                audit_id=new_id(),
                actor=API_ACTOR,
            )
            if row is not None:
                return task_json(row["task"]), True
            earlier = tx.one("get_task_by_idempotency_key", idempotency_key=idempotency_key)
        if earlier["idempotency_fingerprint"] not in (None, fingerprint):
            raise Unprocessable("Idempotency-Key reused with a different request")
        return task_json(earlier), False

    def create_tasks(self, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
        """Create up to 1,000 tasks in one statement, all or nothing; returns (tasks in the
        order given, whether any was created). An item whose idempotency key was used
        before is answered by the earlier task; one used with another request fails all."""
        keys = [item["idempotency_key"] for item in items if item["idempotency_key"] is not None]
        if len(keys) != len(set(keys)):
            raise ValidationFailed(["idempotency_key appears twice in the batch"], {})
        rows = [
            {
                "position": position, "id": new_id(), "context_id": item["context_id"],
                "agent_slug": item["agent_slug"], "prompt": item["prompt"], "context_hints": item["context_hints"],
                "policy": item["policy"], "desired_format": item["desired_format"],
                "max_attempts": item["max_attempts"], "priority": item["priority"], "run_at": item["run_at"],
                "idempotency_key": item["idempotency_key"],
                "idempotency_fingerprint": (
                    _fingerprint({k: v for k, v in item.items() if k != "idempotency_key"})
                    if item["idempotency_key"] is not None else None
                ),
            }
            for position, item in enumerate(items)
        ]
        # With keys, one transaction: a key that a racing request took meanwhile is read back
        # in a new snapshot, and if that request was another one, nothing of this batch
        # stays. Without keys nothing can race: one statement in autocommit, one round trip.
        with self.db.transaction() if keys else self.db.autocommit() as tx:
            outcome = tx.one("create_tasks", tasks=json.dumps(rows), now=now_ms(), actor=API_ACTOR)
            if outcome["mismatched"]:
                raise Unprocessable("Idempotency-Key reused with a different request")
            by_key = {row["idempotency_key"]: row for row in [*outcome["created"], *outcome["earlier"]]
                      if row["idempotency_key"] is not None}
            by_id = {row["id"]: row for row in outcome["created"]}
            answered = []
            for row in rows:
                task = by_key.get(row["idempotency_key"]) if row["idempotency_key"] else by_id.get(row["id"])
                if task is None:  # its key was taken by a request racing this one
                    task = tx.one("get_task_by_idempotency_key", idempotency_key=row["idempotency_key"])
                    if task["idempotency_fingerprint"] != row["idempotency_fingerprint"]:
                        raise Unprocessable("Idempotency-Key reused with a different request")
                answered.append(task_json(task))
        return answered, bool(outcome["created"])

    def list_tasks(self, *, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        with self.db.autocommit() as tx:
            rows = tx.all("list_tasks", status=status, limit=limit, offset=offset)
        return [task_json(row) for row in rows]

    def get_task(self, task_id: str) -> dict[str, Any]:
        """The task, with its latest result (or null): a failure's reason stays readable."""
        with self.db.autocommit() as tx:
            row = tx.one_or_none("get_task_with_result", task_id=task_id)
        if row is None:
            raise NotFound("Task not found")
        return {**task_json(row), "result": row["result"]}

    def requeue_task(self, task_id: str) -> dict[str, Any]:
        with self.db.autocommit() as tx:
            row = tx.one_or_none(
                "requeue_task", task_id=task_id, now=now_ms(), audit_id=new_id(), actor=API_ACTOR
            )
            if row is None:
                current = self._task_status(tx, task_id)
                if current is None:
                    raise NotFound("Task not found")
                raise Conflict(f"Cannot requeue task with status '{current}'")
        return task_json(row)

    def cancel_task(self, task_id: str) -> dict[str, Any]:
        """Cancel a queued, leased or running task; its lease ends. Cancelling a cancelled
        task again answers it as it is."""
        for _ in range(CANCEL_ATTEMPTS):
            row = self.db.script("cancel_task", task_id=task_id, now=now_ms(), audit_id=new_id(), actor=API_ACTOR)
            if not row["retry"]:
                break
        else:
            raise Unavailable("The task kept changing hands; try the cancel again")
        if row["task"] is not None:
            return task_json(row["task"])
        if row["status"] is None:
            raise NotFound("Task not found")
        if row["status"] == "cancelled":
            with self.db.autocommit() as tx:
                return task_json(tx.one("get_task", task_id=task_id))
        raise Conflict(f"Cannot cancel task with status '{row['status']}'")

    # Leases ----------------------------------------------------------------

    def lease_task(self, task_id: str, *, worker_id: str | None, ttl_seconds: int) -> dict[str, Any]:
        granted = self.grant_lease(task_id, worker_id=worker_id, ttl_seconds=ttl_seconds, push_only=False)
        return {"lease": granted["lease"], "worker": granted["worker"]}

    def grant_lease(
        self, task_id: str, *, worker_id: str | None, ttl_seconds: int | None, push_only: bool,
        actor: str = API_ACTOR,
    ) -> dict[str, Any]:
        """Lease a queued, due task to a worker (the one asked for, or the best eligible
        one); returns {lease, worker, task}. With push_only (a dispatch) only workers with
        a url qualify, and without ttl_seconds the lease lasts policy.timeout_sec + 60 s."""
        for _ in range(LEASE_PICK_ATTEMPTS):
            try:
                outcome = self._grant(ttl_seconds, task_id=task_id, worker_id=worker_id, push_only=push_only,
                                      actor=actor)
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
                }
            task_status = outcome["task_status"]
            if task_status is None:
                raise NotFound("Task not found")
            if task_status != "queued":
                raise Conflict(f"Task status is '{task_status}', expected 'queued'")
            if outcome["not_before"] > now_ms():
                raise Conflict(f"Task is not due until {_iso(outcome['not_before'])} "
                               f"({outcome['not_before']} ms, its run_at or retry_at)")
            if worker_id is not None:
                self._check_worker_fit(worker_id, outcome["worker"])
                if push_only and not outcome["worker"]["url"]:
                    raise Conflict(f"Worker '{worker_id}' has no url to dispatch to")
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
            "lease_task", lease_id=new_id(), ttl_seconds=ttl_seconds, now=now_ms(), audit_id=new_id(), **params,
        )

    @staticmethod
    def _check_worker_fit(worker_id: str, worker: dict[str, Any] | None) -> dict[str, Any]:
        """Refuse a worker that cannot take work; else return its capabilities. The row
        is read back after a lease or claim that granted nothing, to say why."""
        if worker is None:
            raise NotFound("Worker not found")
        capabilities = capabilities_json(worker["capabilities"])
        if worker["status"] != "online":
            raise Conflict(f"Worker '{worker_id}' is {worker['status']}, not online")
        if not capabilities["claude_cli"]:
            raise Conflict(f"Worker '{worker_id}' does not have claude_cli")
        return capabilities

    def claim_tasks(
        self, worker_id: str, *, ttl_seconds: int, agent_slugs: list[str] | None, max_tasks: int = 1
    ) -> dict[str, list[dict[str, Any]]] | None:
        """Lease the next queued tasks (priority, then age) to this worker, up to max_tasks
        and its free capacity: {tasks, leases} in queue order, or None if none. A task that
        cannot be granted for a data reason is set aside, and the claim goes on."""
        for _ in range(POISONED_SKIPS_PER_CLAIM + 1):
            try:
                claimed = self.db.script(
                    "claim_task", worker_id=worker_id, agent_slugs=agent_slugs, ttl_seconds=ttl_seconds,
                    max_tasks=max_tasks, lease_ids=[new_id() for _ in range(max_tasks)],
                    audit_ids=[new_id() for _ in range(max_tasks)], now=now_ms(), actor=API_ACTOR,
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
                    tx.one("lease_task", lease_id=new_id(), ttl_seconds=ttl_seconds, now=now_ms(),
                           audit_id=new_id(), actor=API_ACTOR, task_id=task_id, worker_id=worker_id, push_only=False)
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

    def heartbeat_worker(self, worker_id: str, *, lease_ids: list[str]) -> dict[str, Any]:
        """Renew every active lease of the worker in one statement; say which of the
        named leases it has lost (expired, released by a completion or a cancel, failed,
        unknown)."""
        with self.db.autocommit() as tx:
            row = tx.one("heartbeat_worker", worker_id=worker_id, lease_ids=lease_ids, now=now_ms())
        if not row["known"]:
            raise NotFound("Worker not found")
        return {"renewed": row["renewed"], "lost": row["lost"]}

    @staticmethod
    def _check_fencing(row: dict[str, Any], lease_id: str | None, worker_id: str | None) -> None:
        if lease_id is not None and lease_id != row["lease_id"]:
            raise Conflict(f"Lease '{lease_id}' is not the task's current lease")
        if worker_id is not None and worker_id != row["worker_id"]:
            raise Conflict(f"Task is not leased to worker '{worker_id}'")

    def complete_task(self, task_id: str, body: dict[str, Any], *, actor: str = API_ACTOR) -> dict[str, Any]:
        output = body.get("output")
        expected = "expected 'leased' or 'running'"
        now = now_ms()
        uploads = self.artifacts is not None and output is not None
        # With an upload, the lease stays locked from before the upload to the commit.
        with (self.db.transaction() if uploads else self.db.autocommit()) as tx:
            object_url = None
            if uploads:
                current = tx.one_or_none("lock_current_lease", task_id=task_id)
                if current is None:
                    raise NotFound("Task not found")
                if current["task_status"] not in ("leased", "running"):
                    raise Conflict(f"Task status is '{current['task_status']}', {expected}")
                content_type = "application/json" if current["desired_format"] == "json" else "text/plain; charset=utf-8"
                object_url = self.artifacts.put(task_id, output, completed_at_ms=now, content_type=content_type)
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
                if object_url is not None:
                    self.artifacts.remove(object_url)
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
        raise Conflict(f"Task status is '{self._task_status(tx, row['task_id'])}', {expected}")

    def sweep_expired_leases(self) -> dict[str, int]:
        with self.db.autocommit() as tx:
            counts = tx.one("sweep_expired_leases", now=now_ms(), actor=SWEEP_ACTOR)
        counts = {key: int(counts[key]) for key in ("expired", "requeued", "dead")}
        metrics.LEASES_EXPIRED.inc(counts["expired"])
        if counts["expired"]:
            log.info("lease sweep: %(expired)d expired, %(requeued)d requeued, %(dead)d dead", counts)
        return counts

    @staticmethod
    def _task_status(tx, task_id: str) -> str | None:
        row = tx.one_or_none("get_task", task_id=task_id)
        return row["status"] if row else None

    # Listings --------------------------------------------------------------

    def list_leases(self, *, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        with self.db.autocommit() as tx:
            rows = tx.all("list_leases", status=status, limit=limit, offset=offset)
        return [lease_json(row) for row in rows]

    def get_artifact(self, artifact_id: str) -> dict[str, Any]:
        """The artifact row plus its task's desired_format; NotFound if unknown."""
        with self.db.autocommit() as tx:
            row = tx.one_or_none("get_artifact", artifact_id=artifact_id)
        if row is None:
            raise NotFound("Artifact not found")
        return row

    def list_artifacts(self, *, task_id: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        with self.db.autocommit() as tx:
            rows = tx.all("list_artifacts", task_id=task_id, limit=limit, offset=offset)
        return [artifact_json(row) for row in rows]

    def list_audit(self, *, limit: int, offset: int) -> list[dict[str, Any]]:
        with self.db.autocommit() as tx:
            rows = tx.all("list_audit", limit=limit, offset=offset)
        return [audit_json(row) for row in rows]

    def record_audit(
        self, action: str, entity_type: str, entity_id: str, detail: dict[str, Any], *, actor: str = API_ACTOR
    ) -> None:
        with self.db.autocommit() as tx:
            tx.execute(
                "insert_audit", audit_id=new_id(), now=now_ms(), action=action, entity_type=entity_type,
                entity_id=entity_id, actor=actor, detail=json.dumps(detail),
            )

    def queue_state(self) -> dict[str, Any]:
        with self.db.autocommit() as tx:
            return tx.one("queue_state", now=now_ms())

    def stats(self) -> dict[str, Any]:
        with self.db.autocommit() as tx:
            row = tx.one("stats", estimate_above=STATS_EXACT_BELOW_ROWS)
        by_status = {status: 0 for status in TASK_STATUSES}
        by_status.update({status: int(count) for status, count in row["tasks_by_status"].items()})
        stats = {
            "tasks": {"total": sum(by_status.values()), "by_status": by_status},
            "leases": {"total": int(row["leases_total"]), "active": int(row["leases_active"])},
            "workers": {"total": int(row["workers_total"]), "online": int(row["workers_online"])},
        }
        if row["estimated"]:
            stats["estimated"] = True  # finished counts and the lease total from PostgreSQL's statistics
        return stats
