"""Fair shares across notebooks (README, "Fair shares"): the queue takes one fairness key
after another within a priority, a key may be capped, and /stats shows the keys.

The in-process tests read the order claims take; the served ones measure what a user
sees: with one pull worker (or one stand-in agent) of capacity 4 and runs of 0.5 s, a
notebook's 10 tasks created behind another's 400 are done within seconds, not after
the 400 (about 50 s in queue order). Caps are raced by threads against gunicorn."""
from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .helpers import DONE, TASK, api, create_task, register_worker
from .support import GunicornServer, wait_until
from .test_worker_client import WorkerProcess

HALF_SECOND_RUN = ["python3", "-c", "import time; time.sleep(0.5); print('done', end='')"]


def claim(client, worker: str, **body) -> list[dict]:
    response = client.post(f"/api/runtime/workers/{worker}/claim", json={"max_tasks": 32, **body})
    assert response.status_code in (201, 204), response.get_json()
    return response.get_json()["tasks"] if response.status_code == 201 else []


def batch(client, tasks: list[dict]) -> list[dict]:
    response = client.post("/api/runtime/llm-tasks/batch", json={"tasks": tasks})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["tasks"]


def complete(client, task: dict) -> None:
    response = client.post(f"/api/runtime/llm-tasks/{task['id']}/complete", json={**DONE, "lease_id": task["lease_id"]})
    assert response.status_code == 200, response.get_json()


# The field ---------------------------------------------------------------------------


def test_a_task_answers_its_concurrency_key_and_defaults_to_its_context_id(client):
    given = create_task(client, context_id="nb-1", concurrency_key="tenant 7 / nb-1")
    assert given["concurrency_key"] == "tenant 7 / nb-1"
    assert create_task(client, context_id="nb-2")["concurrency_key"] == "nb-2"
    assert create_task(client, context_id="nb-3", concurrency_key=None)["concurrency_key"] == "nb-3"
    read = client.get(f"/api/runtime/llm-tasks/{given['id']}").get_json()
    assert read["concurrency_key"] == "tenant 7 / nb-1"
    created = batch(client, [{**TASK, "concurrency_key": "k-1"}, {**TASK, "context_id": "nb-4"}])
    assert [task["concurrency_key"] for task in created] == ["k-1", "nb-4"]
    capped = create_task(client, policy={"timeout_sec": 60, "max_running_per_key": 2})
    assert capped["policy"] == {"timeout_sec": 60, "budget": 0, "max_running_per_key": 2}


@pytest.mark.parametrize("key", ["", "k" * 129, "a\nb", "a\u200bb", "tab\there", 7, ["k"]])
def test_a_concurrency_key_that_is_not_1_to_128_printable_characters_is_400_and_creates_nothing(client, key):
    before = client.get("/api/runtime/stats").get_json()["tasks"]["total"]
    response = client.post("/api/runtime/llm-tasks", json={**TASK, "concurrency_key": key})
    assert response.status_code == 400
    assert "concurrency_key" in response.get_json()["error"]["fieldErrors"]
    in_batch = client.post("/api/runtime/llm-tasks/batch", json={"tasks": [TASK, {**TASK, "concurrency_key": key}]})
    assert in_batch.status_code == 400
    assert client.get("/api/runtime/stats").get_json()["tasks"]["total"] == before


@pytest.mark.parametrize("cap", [0, -1, 1_000_001, 2.5, "2", True])
def test_a_cap_that_is_not_a_positive_integer_is_400(client, cap):
    response = client.post("/api/runtime/llm-tasks", json={**TASK, "policy": {"max_running_per_key": cap}})
    assert response.status_code == 400


# The order ---------------------------------------------------------------------------


def test_a_key_that_comes_late_takes_turns_with_the_key_that_came_first(client):
    register_worker(client, "w", max_concurrency=32)
    first = batch(client, [{**TASK, "context_id": "notebook-a"}] * 40)
    claimed = claim(client, "w", max_tasks=4)  # the head of the queue moves on
    assert [task["id"] for task in claimed] == [task["id"] for task in first[:4]]
    batch(client, [{**TASK, "context_id": "notebook-b"}] * 5)
    order = "".join(task["context_id"][-1] for task in claim(client, "w", max_tasks=14))
    assert order == "a" + "ab" * 5 + "aaa"  # from the turn after the head on, one of each


def test_keys_take_turns_within_a_priority_and_a_higher_priority_still_comes_first(client):
    register_worker(client, "w", max_concurrency=32)
    batch(client, [{**TASK, "concurrency_key": "a"}] * 6)
    time.sleep(0.002)  # within a turn, older first: one batch's tasks are of one age
    batch(client, [{**TASK, "concurrency_key": "b"}] * 2)
    time.sleep(0.002)
    create_task(client, concurrency_key="c")
    urgent = create_task(client, concurrency_key="a", priority=5)
    claimed = claim(client, "w", max_tasks=10)
    assert claimed[0]["id"] == urgent["id"]
    assert "".join(task["concurrency_key"] for task in claimed[1:]) == "a" + "abc" + "ab" + "aaa"
    assert claim(client, "w", max_tasks=1) == []


def test_a_key_with_nothing_queued_does_not_jump_ahead_of_the_keys_waiting(client):
    """A key served up (its queue empty) comes back at the head of the queue, not before
    it: a stream of newcomers cannot keep a big key waiting for ever."""
    register_worker(client, "w", max_concurrency=32)
    batch(client, [{**TASK, "concurrency_key": "big"}] * 20)
    taken = []
    for _ in range(6):  # a new small key arrives before each task taken
        create_task(client, concurrency_key=f"small-{uuid.uuid4().hex[:6]}")
        taken += [task["concurrency_key"] for task in claim(client, "w", max_tasks=1)]
    assert Counter(key == "big" for key in taken) == {True: 3, False: 3}


def test_a_task_back_in_the_queue_after_a_failure_waits_behind_its_keys_tasks(client):
    """One key's failures go to the back of its own line, not ahead of the other keys."""
    register_worker(client, "w", max_concurrency=32)
    failing = batch(client, [{**TASK, "concurrency_key": "a", "max_attempts": 1}] * 4)
    time.sleep(0.002)
    batch(client, [{**TASK, "concurrency_key": "b"}] * 4)
    first = claim(client, "w", max_tasks=1)[0]
    assert first["id"] == failing[0]["id"]
    failed = client.post(f"/api/runtime/llm-tasks/{first['id']}/complete",
                         json={**DONE, "status": "error", "lease_id": first["lease_id"]})
    assert failed.get_json()["task"]["status"] == "failed"
    assert client.post(f"/api/runtime/llm-tasks/{first['id']}/requeue").status_code == 200
    order = [task["id"] if task["id"] == first["id"] else task["concurrency_key"]
             for task in claim(client, "w", max_tasks=8)]
    assert order == ["a", "b", "a", "b", "a", "b", first["id"], "b"]


# Caps ---------------------------------------------------------------------------------


def test_a_key_at_its_cap_waits_while_the_worker_takes_other_keys(client):
    register_worker(client, "w", max_concurrency=32)
    capped = batch(client, [{**TASK, "concurrency_key": "k", "policy": {"max_running_per_key": 2}}] * 5)
    batch(client, [{**TASK, "concurrency_key": "other"}] * 3)
    first = claim(client, "w", max_tasks=32)
    assert Counter(task["concurrency_key"] for task in first) == {"k": 2, "other": 3}
    assert claim(client, "w") == []  # nothing else may run
    waiting = next(task for task in capped if task["id"] not in {t["id"] for t in first})
    refused = client.post(f"/api/runtime/llm-tasks/{waiting['id']}/lease", json={"worker_id": "w"})
    assert refused.status_code == 409 and "max_running_per_key 2" in refused.get_json()["error"]
    complete(client, next(task for task in first if task["concurrency_key"] == "k"))
    assert [task["concurrency_key"] for task in claim(client, "w")] == ["k"]


def test_the_deployment_wide_cap_applies_to_tasks_that_name_none(database_url):
    from bloom.app import create_app
    from bloom.services import services

    from .conftest import make_settings

    app = create_app(make_settings(database_url, BLOOM_MAX_RUNNING_PER_KEY="1"))
    try:
        client = app.test_client()
        register_worker(client, "w", max_concurrency=32)
        batch(client, [{**TASK, "context_id": "nb"}] * 3 + [{**TASK, "context_id": "own", "policy":
                                                              {"max_running_per_key": 2}}] * 3)
        assert Counter(task["context_id"] for task in claim(client, "w")) == {"nb": 1, "own": 2}
    finally:
        services(app).database.dispose()


# Stats --------------------------------------------------------------------------------


def test_stats_count_the_keys_with_queued_tasks_and_list_the_busiest(client):
    register_worker(client, "w", max_concurrency=32)
    batch(client, [{**TASK, "concurrency_key": "busy"}] * 5 + [{**TASK, "concurrency_key": "calm"}] * 2)
    batch(client, [{**TASK, "concurrency_key": f"single-{n}"} for n in range(12)])
    claim(client, "w", max_tasks=2)  # the first turn: busy's and calm's first
    keys = client.get("/api/runtime/stats").get_json()["concurrency_keys"]
    assert keys["with_queued"] == 14  # busy, calm and 12 singles
    assert keys["busiest"][:2] == [{"key": "busy", "queued": 4, "running": 1},
                                   {"key": "calm", "queued": 1, "running": 1}]
    assert len(keys["busiest"]) == 10
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "busy" not in metrics  # no label per key


# As a user sees it: real gunicorn, a real pull worker or stand-in agent -----------------


def _slowest_wait_ms(server: GunicornServer, task_ids: list[str]) -> int:
    """Creation to completion, by the runtime's own clock, of the slowest of the tasks."""
    tasks = [requests.get(api(server, f"/llm-tasks/{task_id}"), timeout=10).json() for task_id in task_ids]
    assert all(task["status"] == "completed" for task in tasks), [task["status"] for task in tasks]
    return max(task["updated_at"] - task["created_at"] for task in tasks)


def _create_batch(server: GunicornServer, tasks: list[dict]) -> list[str]:
    response = requests.post(api(server, "/llm-tasks/batch"), json={"tasks": tasks}, timeout=30)
    assert response.status_code == 201, response.text
    return [task["id"] for task in response.json()["tasks"]]


def _all_completed(server: GunicornServer, task_ids: list[str]) -> bool:
    return all(requests.get(api(server, f"/llm-tasks/{task_id}"), timeout=10).json()["status"] == "completed"
               for task_id in task_ids)


def _queued(server: GunicornServer) -> int:
    return requests.get(api(server, "/stats"), timeout=10).json()["tasks"]["by_status"]["queued"]


@pytest.mark.slow
def test_a_notebooks_10_tasks_behind_anothers_400_are_done_within_seconds_by_a_pull_worker(server):
    slug = f"fair-{uuid.uuid4().hex[:6]}"
    notebook_a = _create_batch(server, [{**TASK, "agent_slug": slug, "context_id": "notebook-a"}] * 400)
    worker = WorkerProcess(server, f"{slug}-worker", HALF_SECOND_RUN, slug=slug, concurrency=4, wait=1)
    try:
        wait_until(lambda: _queued(server) <= 392, timeout=20, what="the worker to start on notebook A")
        notebook_b = _create_batch(server, [{**TASK, "agent_slug": slug, "context_id": "notebook-b"}] * 10)
        wait_until(lambda: _all_completed(server, notebook_b), timeout=60, interval=0.25,
                   what="notebook B's tasks to complete")
        # In queue order they would wait for the 390-odd tasks ahead: 50 s at 8 a second.
        assert _slowest_wait_ms(server, notebook_b) < 8000
        assert _queued(server) > 300  # notebook A is far from done: B did not wait for it
    finally:
        worker.kill()
    for task_id in notebook_a:  # leave nothing of A for the other tests of the module
        requests.post(api(server, f"/llm-tasks/{task_id}/cancel"), timeout=10)


@pytest.mark.slow
def test_a_notebooks_10_tasks_behind_anothers_400_are_done_within_seconds_by_push_dispatch(fleet_server, agents):
    served = fleet_server(WORKER_SYNC_INTERVAL_S="600")
    agent = agents("agent-1", run_seconds=0.5, max_concurrency=4)
    assert agent.register(served.base_url).status_code == 201
    _create_batch(served, [{**TASK, "context_id": "notebook-a"}] * 400)
    wait_until(lambda: len(agent.state.runs) >= 8, timeout=20, what="the agent to start on notebook A")
    notebook_b = _create_batch(served, [{**TASK, "context_id": "notebook-b"}] * 10)
    wait_until(lambda: _all_completed(served, notebook_b), timeout=60, interval=0.25,
               what="notebook B's tasks to complete")
    assert _slowest_wait_ms(served, notebook_b) < 8000
    assert _queued(served) > 300
    assert agent.state.most_running <= 4


@pytest.mark.slow
def test_push_dispatch_keeps_a_key_within_its_cap(fleet_server, agents):
    served = fleet_server(WORKER_SYNC_INTERVAL_S="600")
    agent = agents("agent-1", run_seconds=0.3, max_concurrency=6)
    assert agent.register(served.base_url).status_code == 201
    capped = _create_batch(served, [{**TASK, "context_id": "capped", "policy": {"max_running_per_key": 2}}] * 8)
    free = _create_batch(served, [{**TASK, "context_id": "free"}] * 8)
    wait_until(lambda: _all_completed(served, capped + free), timeout=60, interval=0.25, what="all 16 tasks")
    runs = {task_id: (started, ended) for task_id, started, ended in agent.state.runs}
    most_at_once = max(sum(1 for other in capped if runs[other][0] <= runs[task_id][0] < runs[other][1])
                       for task_id in capped)
    assert most_at_once == 2  # the cap, and no more, at once
    assert agent.state.most_running > 2  # the free key's tasks ran beside them


@pytest.mark.slow
def test_racing_claims_and_leases_never_grant_a_key_past_its_cap(module_database_url):
    """50 rounds: 6 workers claim and 3 callers lease tasks of one key at once, across 3
    gunicorn processes; the deployment's cap is 2."""
    served = GunicornServer({"DATABASE_URL": module_database_url, "BLOOM_MAX_RUNNING_PER_KEY": "2"}, workers=3,
                            threads=8)
    http = requests.Session()
    try:
        workers = [f"racer-{n}" for n in range(9)]
        for name in workers:
            http.post(api(served, "/workers"), json={"name": name, "capabilities": {"max_concurrency": 4}}, timeout=10)
        over_cap = []
        for round_number in range(50):
            key = f"race-{round_number}"
            ids = _create_batch(served, [{**TASK, "concurrency_key": key}] * 6)
            start = threading.Barrier(9)

            def claim_some(name: str) -> list[str]:
                start.wait()
                answer = requests.post(api(served, f"/workers/{name}/claim"), json={"max_tasks": 4}, timeout=30)
                return [task["id"] for task in answer.json()["tasks"]] if answer.status_code == 201 else []

            def lease_one(name: str, task_id: str) -> list[str]:
                start.wait()
                answer = requests.post(api(served, f"/llm-tasks/{task_id}/lease"), json={"worker_id": name}, timeout=30)
                assert answer.status_code in (201, 409, 503), answer.text
                return [task_id] if answer.status_code == 201 else []

            with ThreadPoolExecutor(9) as pool:
                calls = [pool.submit(claim_some, name) for name in workers[:6]]
                calls += [pool.submit(lease_one, name, task_id) for name, task_id in zip(workers[6:], ids[3:], strict=True)]
                granted = [task_id for call in calls for task_id in call.result()]
            if len(set(granted) & set(ids)) != 2:
                over_cap.append((round_number, len(granted)))
            for task_id in granted:
                lease_id = http.get(api(served, f"/llm-tasks/{task_id}"), timeout=10).json()["lease_id"]
                http.post(api(served, f"/llm-tasks/{task_id}/complete"), json={**DONE, "lease_id": lease_id}, timeout=10)
            for task_id in ids:
                http.post(api(served, f"/llm-tasks/{task_id}/cancel"), timeout=10)
        assert over_cap == []  # every round granted exactly the cap
    finally:
        served.stop()


@pytest.mark.parametrize("cap", ['"x"', "99999999999", "2.5"])
def test_a_row_with_a_cap_postgresql_cannot_read_is_set_aside_and_claims_go_on(client, database_url, cap):
    """A task another service (or an older version) wrote with a cap that is not an
    integer: reading its cap fails in every claim and lease that reaches it."""
    from sqlalchemy import create_engine, text

    register_worker(client, "w", max_concurrency=8)
    healthy = [create_task(client)["id"] for _ in range(2)]
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, priority, policy) "
            f"VALUES ('odd-cap', 'c', 'a', 'p', 'queued', 1, 1, 10, '{{\"max_running_per_key\": {cap}}}')"))
    engine.dispose()
    claimed = [task["id"] for task in claim(client, "w")]
    assert sorted(claimed) == sorted(healthy)
    assert client.get("/api/runtime/llm-tasks/odd-cap").get_json()["status"] == "dead"
