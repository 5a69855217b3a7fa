"""The old service's races, fixed, under real concurrency: many threads against gunicorn with
several processes and one PostgreSQL."""
from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

TASK = {"context_id": "ctx", "agent_slug": "agent", "prompt": "p"}
DONE = {"status": "success", "output": "out", "metrics": {"duration_ms": 1}}


def post(server, path, body=None):
    return requests.post(server.url(path), json=body if body is not None else {}, timeout=30)


def at_once(count, action):
    """Run `action(i)` in `count` threads released by one barrier; return the results."""
    barrier = threading.Barrier(count)

    def run(index):
        barrier.wait()
        return action(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def new_worker(server, max_concurrency):
    name = f"w-{uuid.uuid4().hex[:8]}"
    response = post(server, "/api/runtime/workers", {"name": name, "capabilities": {"max_concurrency": max_concurrency}})
    assert response.status_code == 201
    return name


def new_task(server, context_id="ctx"):
    response = post(server, "/api/runtime/llm-tasks", {**TASK, "context_id": context_id})
    assert response.status_code == 201
    return response.json()["id"]


def active_leases_of_task(server, task_id):
    leases = requests.get(server.url("/api/runtime/leases?status=active&limit=1000"), timeout=10).json()
    return [lease for lease in leases if lease["task_id"] == task_id]


def test_sixteen_clients_leasing_one_task_get_exactly_one_lease(server):
    worker = new_worker(server, 32)
    for _ in range(20):
        task_id = new_task(server)
        statuses = at_once(16, lambda _: post(server, f"/api/runtime/llm-tasks/{task_id}/lease").status_code)
        assert sorted(statuses) == [201] + [409] * 15
        assert len(active_leases_of_task(server, task_id)) == 1
        task = requests.get(server.url(f"/api/runtime/llm-tasks/{task_id}"), timeout=10).json()
        assert (task["status"], task["attempts"], task["worker_id"]) == ("leased", 1, worker)
        assert post(server, f"/api/runtime/llm-tasks/{task_id}/complete", DONE).status_code == 200


def test_a_worker_never_holds_more_leases_than_its_max_concurrency(server):
    worker = new_worker(server, 3)
    task_ids = [new_task(server, context_id=f"c{i}") for i in range(12)]
    statuses = at_once(
        12, lambda i: post(server, f"/api/runtime/llm-tasks/{task_ids[i]}/lease", {"worker_id": worker}).status_code
    )
    assert sorted(statuses) == [201] * 3 + [409] * 9
    detail = requests.get(server.url(f"/api/runtime/workers/{worker}"), timeout=10).json()
    assert detail["active_leases"] == 3 and len(detail["leases"]) == 3


def test_auto_picked_leases_fill_every_worker_exactly_to_capacity(server):
    workers = [new_worker(server, 2) for _ in range(3)]
    for name in workers:  # nothing else of other tests may be picked
        assert requests.get(server.url(f"/api/runtime/workers/{name}"), timeout=10).json()["active_leases"] == 0
    others = requests.get(server.url("/api/runtime/workers"), timeout=10).json()
    spare = sum(w["capabilities"]["max_concurrency"] - w["active_leases"] for w in others if w["status"] == "online")
    task_ids = [new_task(server, context_id=f"auto{i}") for i in range(spare + 6)]
    statuses = at_once(len(task_ids), lambda i: post(server, f"/api/runtime/llm-tasks/{task_ids[i]}/lease").status_code)
    assert statuses.count(201) == spare
    assert statuses.count(503) == 6
    for w in requests.get(server.url("/api/runtime/workers"), timeout=10).json():
        assert w["active_leases"] <= w["capabilities"]["max_concurrency"]


def test_racing_completions_give_one_result(server):
    new_worker(server, 32)
    for _ in range(10):
        task_id = new_task(server)
        assert post(server, f"/api/runtime/llm-tasks/{task_id}/lease").status_code == 201
        statuses = at_once(8, lambda i: post(server, f"/api/runtime/llm-tasks/{task_id}/complete", {**DONE, "output": f"answer {i}"}).status_code)
        assert sorted(statuses) == [200] + [409] * 7
        artifacts = requests.get(server.url(f"/api/runtime/artifacts?task_id={task_id}"), timeout=10).json()
        assert len(artifacts) == 1


def test_heartbeats_racing_a_completion_never_reopen_the_task(server):
    new_worker(server, 32)
    for _ in range(20):
        task_id = new_task(server)
        assert post(server, f"/api/runtime/llm-tasks/{task_id}/lease").status_code == 201

        def act(index):
            path = "complete" if index == 0 else "heartbeat"
            return post(server, f"/api/runtime/llm-tasks/{task_id}/{path}", DONE if index == 0 else {}).status_code

        statuses = at_once(6, act)
        assert statuses[0] == 200
        assert set(statuses[1:]) <= {200, 404}
        task = requests.get(server.url(f"/api/runtime/llm-tasks/{task_id}"), timeout=10).json()
        assert task["status"] == "completed"
        assert post(server, f"/api/runtime/llm-tasks/{task_id}/complete", DONE).status_code == 409
