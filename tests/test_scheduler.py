"""Background jobs run once per deployment, whatever the number of processes."""
from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
import requests

from bloom.db import Database
from bloom.scheduler import Job, run_once_per_deployment

from .support import GunicornServer, shortest_gap, wait_until


def test_concurrent_ticks_run_a_job_once(database_url):
    runs = []
    job = Job("probe", interval_s=60, run=lambda: (runs.append(threading.get_ident()), time.sleep(0.3)))
    databases = [Database(database_url) for _ in range(6)]  # as six processes would
    barrier = threading.Barrier(len(databases))
    outcomes = []

    def tick(database):
        barrier.wait()
        outcomes.append(run_once_per_deployment(database, job))

    threads = [threading.Thread(target=tick, args=(database,)) for database in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False] * 5 + [True]
    assert len(runs) == 1
    # The interval has not passed: a later tick does not run it again either.
    assert run_once_per_deployment(databases[0], job) is False
    for database in databases:
        database.dispose()


def test_a_failing_job_is_logged_and_does_not_raise(database_url, caplog):
    def broken():
        raise RuntimeError("upstream exploded")

    database = Database(database_url)
    assert run_once_per_deployment(database, Job("broken", 0.01, broken)) is False
    assert "background job broken failed" in caplog.text
    time.sleep(0.02)
    assert run_once_per_deployment(database, Job("broken", 0.01, lambda: None)) is True
    database.dispose()


@pytest.mark.slow  # starts processes of its own
def test_gunicorn_workers_share_one_sweep_per_interval(database_url):
    served = GunicornServer(
        {"DATABASE_URL": database_url, "LEASE_SWEEP_INTERVAL_S": "1", "BLOOM_LOG_LEVEL": "DEBUG"}, workers=4
    )
    try:
        api = served.url
        requests.post(api("/api/runtime/workers"), json={"name": "w1"}, timeout=10)
        task = requests.post(api("/api/runtime/llm-tasks"), json={"context_id": "c", "agent_slug": "a", "prompt": "p"}, timeout=10).json()
        requests.post(api(f"/api/runtime/llm-tasks/{task['id']}/lease"), json={"ttl_seconds": 1}, timeout=10)
        requests.post(api(f"/api/runtime/llm-tasks/{task['id']}/heartbeat"), timeout=10)
        # The worker "dies" after its heartbeat: the sweep in the service requeues the running task.
        wait_until(
            lambda: requests.get(api(f"/api/runtime/llm-tasks/{task['id']}"), timeout=10).json()["status"] == "queued",
            timeout=5, interval=0.1, what="the sweep to requeue the task",
        )
        started = served.log().count("job lease-sweep running")
        wait_until(lambda: served.log().count("job lease-sweep running") - started >= 4, timeout=30,
                   what="four more sweeps")
        runs = _run_times(served.log(), "job lease-sweep running")[started:]
    finally:
        served.stop()
    # Four processes tick every second: once per interval for the deployment puts a second
    # between two sweeps; once per process would put four in every second.
    assert shortest_gap(runs) >= 0.5, served.log()


def _run_times(log: str, marker: str) -> list[float]:
    """When each line with `marker` was logged (the log's own timestamps, in seconds)."""
    times = []
    for line in log.splitlines():
        if marker in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


def test_an_outage_is_said_once_when_it_starts_and_once_when_it_ends(database_url, caplog):
    """A 20 s outage wrote 1,495 lines: every job of every process, at every tick, with a
    chained traceback. Now one line when a job starts failing, one when it runs again."""
    from bloom.errors import Unavailable

    def away():
        raise Unavailable("Database unreachable, try again")

    database = Database(database_url)
    try:
        with caplog.at_level("INFO", logger="bloom.scheduler"):
            for _ in range(5):
                assert run_once_per_deployment(database, Job("flaky", 0.01, away)) is False
                time.sleep(0.02)
            assert run_once_per_deployment(database, Job("flaky", 0.01, lambda: None)) is True
        said = [record for record in caplog.records if "flaky" in record.getMessage()]
        assert [record.getMessage() for record in said] == [
            "background job flaky failed (Unavailable); said again when it runs",
            "background job flaky runs again, after 5 failed tick(s)",
        ]
        assert said[0].exc_info is None  # no traceback for an outage
    finally:
        database.dispose()
