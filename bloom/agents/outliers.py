"""Outlier ejection: a push agent whose runs keep failing is sent no task for a while.

An agent that fails every run at once (a broken CLI, a full disk, junk answers) is always
idle, so the least-loaded choice would send it every delivery and spend every task's
attempts there. After EJECT_AFTER failed runs in a row it is left out of the dispatch
for FIRST_EJECTION_S, doubling with each further failure up to LONGEST_EJECTION_S; its
next good run clears the count. A run counts as failed when the agent's answer says so
(or is not a run's answer at all), and when the agent took the task and never said the
run started (no heartbeat within START_HEARTBEAT_S: the real agent sends one as each run
starts). A retry also goes to another agent when one is free (lease_task in
bloom/leases/queries.sql). The counts live on the worker rows, shared by every process,
and count per agent: all names of one agent url share them.
"""
from __future__ import annotations

import logging
import threading

from ..db import Database
from ..stamps import now_ms

log = logging.getLogger(__name__)

EJECT_AFTER = 3
FIRST_EJECTION_S = 15.0
LONGEST_EJECTION_S = 600.0
START_HEARTBEAT_S = 10.0


class RunOutcomes:
    """Notes how each delivered run ended. A good run costs a statement only when this
    process saw the agent fail before (the common case writes nothing)."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def note(self, worker_id: str, *, failed: bool, why: str = "") -> None:
        with self._lock:
            if not failed and worker_id not in self._failing:
                return
            (self._failing.add if failed else self._failing.discard)(worker_id)
        now = now_ms()
        with self._db.autocommit() as tx:
            row = tx.one_or_none(
                "note_agent_run", worker_id=worker_id, failed=failed, eject_after=EJECT_AFTER,
                first_ejection_ms=int(FIRST_EJECTION_S * 1000), longest_ejection_ms=int(LONGEST_EJECTION_S * 1000),
                now=now,
            )
        if failed and row is not None and (row["failed_runs"] or 0) >= EJECT_AFTER:
            log.warning("worker %s: %d runs failed in a row (last: %s); no task for it for %.0f s",
                        worker_id, row["failed_runs"], why, (row["ejected_until"] - now) / 1000)
