"""Background jobs in process (APScheduler), each run by one process of the deployment.

Every gunicorn process on every host runs a scheduler, so each tick must decide who
works: a PostgreSQL advisory lock makes runs of one job mutually exclusive, and a
last-run time in runtime_settings, moved forward by one conditional statement,
makes the job run once per interval for the whole deployment, not once per process.
"""
from __future__ import annotations

import atexit
import logging
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler

from .db import Database
from .stamps import now_ms

log = logging.getLogger(__name__)

# A process whose tick comes a little early still counts as on time.
_TICK_TOLERANCE = 0.9


@dataclass(frozen=True)
class Job:
    name: str
    interval_s: float
    run: Callable[[], object]


def run_once_per_deployment(database: Database, job: Job) -> bool:
    """Run `job` if no other process runs it now and nobody ran it this interval."""
    lock_name = f"bloom-runtime:job:{job.name}"
    try:
        with database.autocommit() as lock_session:
            if not lock_session.one("try_job_lock", lock_name=lock_name)["locked"]:
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
                job.run()
                return True
            finally:
                lock_session.one("release_job_lock", lock_name=lock_name)
    except Exception:
        # A failed run (database down, upstream down) must never stop the scheduler.
        log.exception("background job %s failed", job.name)
        return False


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
