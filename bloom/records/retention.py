"""Retention: finished tasks and old audit entries are deleted after a while.

Run by the scheduler once per deployment every BLOOM_PRUNE_INTERVAL_S. Completed tasks go
after BLOOM_RETENTION_COMPLETED_S, failed, dead and cancelled ones after
BLOOM_RETENTION_FAILED_S, each with its leases, results and artifacts (and the artifacts'
objects in the store); audit entries after BLOOM_RETENTION_AUDIT_S. 0 keeps for ever.
Each statement deletes one small batch (oldest first, skipping rows another transaction
holds), so the queue is never locked and no transaction grows with the backlog; a run
stops after its time budget and the next run goes on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..artifacts import MinioArtifactStore
from ..db import Database
from ..stamps import now_ms

log = logging.getLogger(__name__)

BATCH = 500
RUN_BUDGET_S = 20.0
# A task created with an Idempotency-Key is kept at least this long, whatever its
# retention: a retried request within the window answers with it instead of making a
# second task.
IDEMPOTENCY_WINDOW_S = 24 * 3600


@dataclass(frozen=True)
class RetentionPolicy:
    completed_s: int
    failed_s: int
    audit_s: int


@dataclass(frozen=True)
class PruneOutcome:
    tasks: int
    audit_entries: int
    objects: int


def _cutoff(now: int, seconds: int) -> int | None:
    return now - seconds * 1000 if seconds > 0 else None


def prune(database: Database, store: MinioArtifactStore | None, policy: RetentionPolicy,
          *, budget_s: float = RUN_BUDGET_S, batch: int = BATCH) -> PruneOutcome:
    deadline = time.monotonic() + budget_s
    now = now_ms()
    completed_before, failed_before = _cutoff(now, policy.completed_s), _cutoff(now, policy.failed_s)
    audit_before = _cutoff(now, policy.audit_s)
    tasks = audit_entries = objects = 0
    while (completed_before or failed_before) and time.monotonic() < deadline:
        with database.autocommit() as tx:
            row = tx.one("prune_finished_tasks", completed_before=completed_before, failed_before=failed_before,
                         keyed_before=now - IDEMPOTENCY_WINDOW_S * 1000, batch=batch)
        tasks += int(row["tasks"])
        # After the rows are gone: a failure leaves an orphan object, never a row pointing nowhere.
        for url in row["object_urls"] or []:
            if store is not None:
                store.remove(url)
                objects += 1
        if row["tasks"] < batch:
            break
    while audit_before and time.monotonic() < deadline:
        with database.autocommit() as tx:
            deleted = int(tx.one("prune_audit", before=audit_before, batch=batch)["deleted"])
        audit_entries += deleted
        if deleted < batch:
            break
    outcome = PruneOutcome(tasks, audit_entries, objects)
    if tasks or audit_entries:
        log.info("retention: %d finished task(s), %d audit entries, %d object(s) deleted",
                 tasks, audit_entries, objects)
    return outcome
