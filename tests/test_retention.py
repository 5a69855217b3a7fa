"""Retention: finished tasks (with their leases, results, artifacts and objects) and old
audit entries go after their time; live tasks and recent ones stay; 0 keeps for ever."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from bloom.records.retention import RetentionPolicy, prune
from bloom.services import services

from .helpers import DONE, TASK, create_task, lease, register_worker
from .test_artifacts import objects_of

DAY_MS = 86_400_000


def age(database_url: str, task_id: str, days: float) -> None:
    """Make a task (and its audit entries) look finished `days` ago."""
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE llm_tasks SET updated_at = updated_at - :shift WHERE id = :id"),
                           {"shift": int(days * DAY_MS), "id": task_id})
        connection.execute(text("UPDATE audit_logs SET timestamp = timestamp - :shift WHERE entity_id = :id"),
                           {"shift": int(days * DAY_MS), "id": task_id})
    engine.dispose()


def finished(client, status="success", **fields) -> dict:
    task = create_task(client, max_attempts=1, **fields)
    granted = lease(client, task["id"]).get_json()["lease"]
    body = {**DONE, "status": status, "lease_id": granted["id"]}
    assert client.post(f"/api/runtime/llm-tasks/{task['id']}/complete", json=body).status_code == 200
    return task


@pytest.fixture
def app(s3_app):
    return s3_app


def test_finished_tasks_go_after_their_retention_with_everything_they_own(app, client, database_url, s3, bucket):
    register_worker(client, "w1", max_concurrency=10)
    old_done = finished(client)
    old_failed = finished(client, status="error")
    recent_done = finished(client)
    month_old_failed = finished(client, status="error")
    still_queued = create_task(client)
    age(database_url, old_done["id"], 8)  # past 7 days
    age(database_url, old_failed["id"], 8)  # failed: kept 30 days
    age(database_url, month_old_failed["id"], 31)
    age(database_url, still_queued["id"], 400)  # never finished: never pruned
    assert objects_of(s3, bucket, old_done["id"])

    outcome = prune(services(app).database, services(app).records.artifacts,
                    RetentionPolicy(completed_s=7 * 86400, failed_s=30 * 86400, audit_s=30 * 86400), batch=1)

    assert (outcome.tasks, outcome.objects) == (2, 2)
    gone, kept = {old_done["id"], month_old_failed["id"]}, {old_failed["id"], recent_done["id"], still_queued["id"]}
    for task_id in gone:
        assert client.get(f"/api/runtime/llm-tasks/{task_id}").status_code == 404
        assert client.get(f"/api/runtime/artifacts?task_id={task_id}").get_json() == []
        assert objects_of(s3, bucket, task_id) == []
    for task_id in kept:
        assert client.get(f"/api/runtime/llm-tasks/{task_id}").status_code == 200
    lease_tasks = {lease["task_id"] for lease in client.get("/api/runtime/leases").get_json()}
    assert not lease_tasks & gone and {old_failed["id"], recent_done["id"]} <= lease_tasks
    audited = {entry["entity_id"] for entry in client.get("/api/runtime/audit?limit=1000").get_json()}
    assert month_old_failed["id"] not in audited and still_queued["id"] not in audited  # past 30 days
    assert old_done["id"] in audited  # 8 days: the audit keeps 30


def test_zero_keeps_for_ever(app, client, database_url):
    register_worker(client, "w1")
    task = finished(client)
    age(database_url, task["id"], 3650)
    outcome = prune(services(app).database, None, RetentionPolicy(0, 0, 0))
    assert (outcome.tasks, outcome.audit_entries) == (0, 0)
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").status_code == 200


@pytest.mark.slow  # starts processes of its own
def test_the_retention_job_runs_under_gunicorn(database_url):
    import requests

    from .support import GunicornServer, wait_until

    served = GunicornServer({"DATABASE_URL": database_url, "BLOOM_PRUNE_INTERVAL_S": "1"}, workers=2)
    try:
        api = served.url("/api/runtime")
        requests.post(f"{api}/workers", json={"name": "w1"}, timeout=10)
        task = requests.post(f"{api}/llm-tasks", json={"context_id": "c", "agent_slug": "a", "prompt": "p"},
                             timeout=10).json()
        granted = requests.post(f"{api}/llm-tasks/{task['id']}/lease", json={}, timeout=10).json()["lease"]
        requests.post(f"{api}/llm-tasks/{task['id']}/complete", json={**DONE, "lease_id": granted["id"]}, timeout=10)
        assert requests.get(f"{api}/llm-tasks/{task['id']}", timeout=10).status_code == 200
        age(database_url, task["id"], 8)
        wait_until(lambda: requests.get(f"{api}/llm-tasks/{task['id']}", timeout=10).status_code == 404,
                   timeout=15, interval=0.5, what="the retention job to prune the task")
        assert requests.get(f"{api}/artifacts?task_id={task['id']}", timeout=10).json() == []
    finally:
        served.stop()


def test_an_idempotency_key_outlives_a_short_retention_for_its_window(app, client, database_url):
    register_worker(client, "w1")
    keyed = client.post("/api/runtime/llm-tasks", json={**TASK, "prompt": "once"},
                        headers={"Idempotency-Key": "order-42"}).get_json()
    granted = lease(client, keyed["id"]).get_json()["lease"]
    client.post(f"/api/runtime/llm-tasks/{keyed['id']}/complete", json={**DONE, "lease_id": granted["id"]})
    plain = finished(client)
    age(database_url, keyed["id"], days=2)
    age(database_url, plain["id"], days=2)
    prune(services(app).database, None, RetentionPolicy(completed_s=86_400, failed_s=86_400, audit_s=0))
    assert client.get(f"/api/runtime/llm-tasks/{plain['id']}").status_code == 404  # gone after its retention
    # Created less than a day ago: the key's task stays, so a retry of the request finds it.
    retried = client.post("/api/runtime/llm-tasks", json={**TASK, "prompt": "once"},
                          headers={"Idempotency-Key": "order-42"})
    assert retried.status_code == 200 and retried.get_json()["id"] == keyed["id"]
    engine = create_engine(database_url)
    with engine.begin() as connection:  # a day and more since it was created
        connection.execute(text("UPDATE llm_tasks SET created_at = created_at - :day WHERE id = :id"),
                           {"day": 2 * DAY_MS, "id": keyed["id"]})
    engine.dispose()
    prune(services(app).database, None, RetentionPolicy(completed_s=86_400, failed_s=86_400, audit_s=0))
    assert client.get(f"/api/runtime/llm-tasks/{keyed['id']}").status_code == 404
