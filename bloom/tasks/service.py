"""Tasks: create (one, or a batch in one statement), read, requeue, cancel.

Every operation is one unit of work, and every state change one statement whose
precondition is in its WHERE clause (bloom/tasks/queries.sql), so concurrent requests and
several processes cannot leave a task half updated. Knows nothing of Flask.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..db import Database
from ..errors import Conflict, NotFound, Unavailable, Unprocessable, ValidationFailed
from ..shapes import task_json
from ..stamps import API_ACTOR, new_id, now_ms

DEFAULT_PAGE = 100
# The overview a list without limit answers (list_tasks_overview): bounded in every part.
OVERVIEW_IN_FLIGHT_ROWS = 5000
OVERVIEW_FAILED_ROWS = 500
OVERVIEW_RECENT_ROWS = 100
# A cancel racing grants locks the task's newest lease and tries again (cancel_task).
CANCEL_ATTEMPTS = 5


def _fingerprint(body: dict[str, Any]) -> str:
    """The validated request (defaults filled in), canonically encoded and hashed."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def task_status(tx, task_id: str) -> str | None:
    row = tx.one_or_none("get_task", task_id=task_id)
    return row["status"] if row else None


class TaskService:
    def __init__(self, database: Database, announce: Callable[[Counter[str]], None]) -> None:
        """`announce` tells waiting claims and the dispatcher of committed tasks, by
        agent_slug (QueueEvents.announce)."""
        self.db = database
        self._announce = announce

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
                concurrency_key=body.get("concurrency_key"),
                idempotency_key=idempotency_key,
                idempotency_fingerprint=fingerprint,
                now=now_ms(),
                audit_id=new_id(),
                actor=API_ACTOR,
            )
            if row is None:
                earlier = tx.one("get_task_by_idempotency_key", idempotency_key=idempotency_key)
        if row is not None:
            self._announce(Counter([body["agent_slug"]]))
            return task_json(row["task"]), True
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
                "idempotency_key": item["idempotency_key"], "concurrency_key": item.get("concurrency_key"),
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
        if outcome["created"]:
            self._announce(Counter(row["agent_slug"] for row in outcome["created"]))
        return answered, bool(outcome["created"])

    def list_tasks(self, *, status: str | None, limit: int | None, offset: int) -> list[dict[str, Any]]:
        """A page, newest first; with no limit (nor status, offset) the overview: every
        task in flight, the newest failed and dead ones, the newest others."""
        with self.db.autocommit() as tx:
            if limit is None and status is None and offset == 0:
                rows = tx.all("list_tasks_overview", in_flight_rows=OVERVIEW_IN_FLIGHT_ROWS,
                              failed_rows=OVERVIEW_FAILED_ROWS, recent_rows=OVERVIEW_RECENT_ROWS)
            else:
                rows = tx.all("list_tasks", status=status, limit=limit or DEFAULT_PAGE, offset=offset)
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
                current = task_status(tx, task_id)
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
