"""Lists as the web client reads them: without limit or status, with thousands of
finished tasks in the table, every lease in flight and every failed task (to requeue)
are still in the answer, which stays bounded."""
from __future__ import annotations

import time

import pytest
import requests
from sqlalchemy import text

from bloom.services import services

from .helpers import DONE, TASK, create_task, lease, register_worker
from .support import GunicornServer


def test_the_lists_without_limit_keep_what_the_client_acts_on(app, client):
    failed = create_task(client, max_attempts=1)  # the oldest of all
    register_worker(client, "w1", max_concurrency=3)
    granted = lease(client, failed["id"]).get_json()["lease"]
    client.post(f"/api/runtime/llm-tasks/{failed['id']}/complete",
                json={**DONE, "status": "error", "lease_id": granted["id"]})
    for _ in range(2):
        assert client.post("/api/runtime/llm-tasks/batch", json={"tasks": [TASK] * 1000}).status_code == 201
    with services(app).database.engine.begin() as connection:
        connection.execute(text("UPDATE llm_tasks SET status = 'completed' WHERE status = 'queued'"))
    in_flight = [create_task(client)["id"] for _ in range(3)]
    for task_id in in_flight:
        assert lease(client, task_id).status_code == 201
    with services(app).database.engine.begin() as connection:  # leased before everything else
        connection.execute(text("UPDATE llm_tasks SET created_at = 1 WHERE id = ANY(:ids)"), {"ids": in_flight})
        connection.execute(text("UPDATE leases SET started_at = 1 WHERE task_id = ANY(:ids)"), {"ids": in_flight})

    tasks = client.get("/api/runtime/llm-tasks").get_json()
    statuses = {task["id"]: task["status"] for task in tasks}
    assert statuses[failed["id"]] == "failed"
    assert all(statuses[task_id] == "leased" for task_id in in_flight)
    assert len(tasks) <= 3 + 500 + 100
    # What needs an operator first (the Runtime page shows 50 rows): in flight, then failed
    # and dead, then the rest; newest first within each. (The failed task, the oldest of
    # all, was past row 100 when the list was newest first.)
    need = {"leased": 0, "running": 0, "failed": 1, "dead": 1}
    order = [(need.get(task["status"], 2), -task["created_at"]) for task in tasks]
    assert order == sorted(order)
    assert {task["id"] for task in tasks[:3]} == set(in_flight) and tasks[3]["id"] == failed["id"]

    leases = client.get("/api/runtime/leases").get_json()
    assert {entry["task_id"] for entry in leases if entry["status"] == "active"} == set(in_flight)

    page = client.get("/api/runtime/llm-tasks?limit=100").get_json()  # an explicit page: as before
    assert len(page) == 100 and failed["id"] not in {task["id"] for task in page}


@pytest.mark.slow  # starts processes of its own
def test_config_right_after_a_connection_test_shows_it_whichever_process_answers(database_url):
    served = GunicornServer({"DATABASE_URL": database_url, "MEMBRIDGE_SERVER_URL": "http://127.0.0.1:9"},
                            workers=3)
    try:
        for _ in range(5):
            tested_from = int(time.time() * 1000)
            tested = requests.post(served.url("/api/runtime/test-connection"), timeout=20).json()
            assert tested["connected"] is False
            for _ in range(6):  # several processes answer; every one must show this very test
                config = requests.get(served.url("/api/runtime/config"), timeout=10).json()
                assert config["connected"] is False and config["last_test"] >= tested_from, config
            time.sleep(0.3)
    finally:
        served.stop()
