"""Background jobs in process (APScheduler), each run by one process of the deployment.

Every gunicorn process on every host runs a scheduler, so each tick must decide who
works: the job's leadership (bloom/leadership.py: a row with an expiry, renewed while
the job runs) makes runs of one job mutually exclusive, and a last-run time in
runtime_settings, moved forward by one conditional statement, makes the job run once
per interval for the whole deployment, not once per process. A process that freezes or
is cut off mid-run stops renewing, and another takes the job over once the row expires
(about 10 s), not when PostgreSQL ends the frozen process's session (a session lock did
that: hours, for a host that vanished). Every job is a set of statements whose
preconditions sit in their WHERE clauses, so a frozen run that wakes and finishes after
another has taken over changes nothing twice.
"""
from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler

from .db import Database
from .errors import is_outage
from .leadership import RENEW_EVERY_S, Leadership, process_identity
from .stamps import now_ms

log = logging.getLogger(__name__)

# A process whose tick comes a little early still counts as on time.
_TICK_TOLERANCE = 0.9


@dataclass(frozen=True)
class Job:
    name: str
    interval_s: float
    run: Callable[[], object]


_IDENTITY = process_identity()
# Failures in a row of each job in this process: an outage is said once when it starts
# (with the traceback, when it is not the database or an upstream being away) and once
# when it ends, with the count, not at every tick of every job of every process.
_failures_in_a_row: dict[str, int] = {}


def run_once_per_deployment(database: Database, job: Job) -> bool:
    """Run `job` if no other process runs it now and nobody ran it this interval."""
    leadership = Leadership(database, f"job:{job.name}", _IDENTITY)
    try:
        if not leadership.take_or_renew():
            return False
        try:
            with database.autocommit() as tx:
                claimed = tx.one_or_none(
                    "claim_job_run",
                    setting_key=f"job:{job.name}:last_run_at",
                    now=now_ms(),
                    min_gap_ms=int(job.interval_s * 1000 * _TICK_TOLERANCE),
                )
            if claimed is None:
                return False
            log.debug("job %s running in this process", job.name)
            with _renewed(leadership):
                job.run()
        finally:
            leadership.release()
    except Exception as error:
        # A failed run (database down, upstream down) must never stop the scheduler.
        _failed(job.name, error)
        return False
    failed_before = _failures_in_a_row.pop(job.name, 0)
    if failed_before:
        log.warning("background job %s runs again, after %d failed tick(s)", job.name, failed_before)
    return True


def _failed(name: str, error: Exception) -> None:
    count = _failures_in_a_row[name] = _failures_in_a_row.get(name, 0) + 1
    if count > 1:
        return
    if is_outage(error):
        log.warning("background job %s failed (%s); said again when it runs", name, type(error).__name__)
    else:
        log.exception("background job %s failed; said again when it runs", name)


class _renewed:
    """Renew a leadership from a thread of its own while the block runs (a job's run may
    outlast the leadership's TTL)."""

    def __init__(self, leadership: Leadership) -> None:
        self._leadership = leadership
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"bloom-{leadership.name}-renewal", daemon=True)

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._done.wait(RENEW_EVERY_S):
            try:
                if not self._leadership.take_or_renew():
                    log.warning("job %s: leadership lost while running (another process took it over)",
                                self._leadership.name)
                    return
            except Exception as error:  # the database is away: the run will find out itself
                log.debug("job %s: leadership not renewed (%s)", self._leadership.name, type(error).__name__)


def start_scheduler(database: Database, jobs: list[Job]) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(daemon=True)
    for job in jobs:
        scheduler.add_job(
            run_once_per_deployment,
            "interval",
            seconds=job.interval_s,
            args=(database, job),
            id=job.name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(job.interval_s)),
        )
    scheduler.start()
    atexit.register(lambda: scheduler.shutdown(wait=False) if scheduler.running else None)
    log.debug("scheduler started: %s", ", ".join(f"{job.name} every {job.interval_s:g}s" for job in jobs))
    return scheduler
