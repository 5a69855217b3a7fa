"""Races around cancel and batches, under real concurrency: threads against gunicorn with
several workers on PostgreSQL."""
from __future__ import annotations

import threading
import uuid
from collections import Counter

import requests

from .helpers import TASK, api


def _race(*calls):
    """Start every call at once (a barrier), return their answers in order."""
    barrier = threading.Barrier(len(calls))
    answers: list = [None] * len(calls)

    def run(index, call):
        session = requests.Session()
        barrier.wait()
        answers[index] = call(session)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return answers


def _register(server, name: str, capacity: int = 32) -> None:
    body = {"name": name, "capabilities": {"max_concurrency": capacity}}
    assert requests.post(api(server, "/workers"), json=body, timeout=10).status_code in (200, 201)


def _new_task(server, slug: str) -> str:
    response = requests.post(api(server, "/llm-tasks"), json={**TASK, "agent_slug": slug}, timeout=10)
    return response.json()["id"]


def _active_leases_of(server, task_id: str) -> list[dict]:
    leases = requests.get(api(server, "/leases?status=active&limit=1000"), timeout=10).json()
    return [lease for lease in leases if lease["task_id"] == task_id]


def test_a_cancelled_task_never_keeps_an_active_lease_when_racing_claims_and_leases(server):
    worker = f"racer-{uuid.uuid4().hex[:6]}"
    _register(server, worker)
    outcomes = Counter()
    for round_ in range(60):
        slug = f"cancel-race-{uuid.uuid4().hex[:8]}"
        task_id = _new_task(server, slug)
        grab = (
            (lambda s: s.post(api(server, f"/workers/{worker}/claim"), json={"agent_slugs": [slug]}, timeout=30))
            if round_ % 2 else
            (lambda s: s.post(api(server, f"/llm-tasks/{task_id}/lease"), json={"worker_id": worker}, timeout=30))
        )
        cancel, granted = _race(lambda s: s.post(api(server, f"/llm-tasks/{task_id}/cancel"), timeout=30), grab)
        assert cancel.status_code in (200, 409), cancel.text
        assert granted.status_code in (201, 204, 409), granted.text
        status = requests.get(api(server, f"/llm-tasks/{task_id}"), timeout=10).json()["status"]
        outcomes[(cancel.status_code, granted.status_code, status)] += 1
        if status == "cancelled":
            assert _active_leases_of(server, task_id) == [], (round_, cancel.text, granted.text)
    # Still renewed by the worker's heartbeat? Never: every lease it holds is of a live task.
    beat = requests.post(api(server, f"/workers/{worker}/heartbeat"), json={}, timeout=10).json()
    for renewed in beat["renewed"]:
        assert requests.get(api(server, f"/llm-tasks/{renewed['task_id']}"), timeout=10).json()["status"] != "cancelled"
    assert any(key[2] == "cancelled" for key in outcomes), outcomes


def test_cancel_never_deadlocks_with_heartbeat_complete_and_worker_heartbeat(server):
    worker = f"busy-{uuid.uuid4().hex[:6]}"
    _register(server, worker)
    statuses = Counter()
    for _ in range(40):
        task_id = _new_task(server, f"deadlock-{uuid.uuid4().hex[:8]}")
        lease = requests.post(api(server, f"/llm-tasks/{task_id}/lease"), json={"worker_id": worker},
                              timeout=10).json()["lease"]
        fence = {"lease_id": lease["id"], "worker_id": worker}
        answers = _race(
            lambda s: s.post(api(server, f"/llm-tasks/{task_id}/cancel"), timeout=30),
            lambda s: s.post(api(server, f"/llm-tasks/{task_id}/heartbeat"), json=fence, timeout=30),
            lambda s: s.post(api(server, f"/llm-tasks/{task_id}/complete"), timeout=30,
                             json={**fence, "status": "success", "output": "x", "metrics": {"duration_ms": 1}}),
            lambda s: s.post(api(server, f"/workers/{worker}/heartbeat"), json={"lease_ids": [lease["id"]]},
                             timeout=30),
        )
        statuses.update(answer.status_code for answer in answers)
        assert all(answer.status_code < 500 for answer in answers), [(a.status_code, a.text) for a in answers]
        final = requests.get(api(server, f"/llm-tasks/{task_id}"), timeout=10).json()["status"]
        assert final in ("cancelled", "completed")
        assert _active_leases_of(server, task_id) == []


def test_racing_batches_that_share_keys_with_other_content_one_wins_the_other_gets_422(server):
    for _ in range(5):
        keys = [f"k-{uuid.uuid4().hex}" for _ in range(5)]
        names = {"first": f"first-{uuid.uuid4().hex}", "second": f"second-{uuid.uuid4().hex}"}

        def batch(prompt):
            items = [{**TASK, "prompt": f"{prompt} {n}", "idempotency_key": key} for n, key in enumerate(keys)]
            items.append({**TASK, "prompt": f"{prompt} without a key"})
            return lambda s: s.post(api(server, "/llm-tasks/batch"), json={"tasks": items}, timeout=30)

        first, second = _race(batch(names["first"]), batch(names["second"]))
        assert sorted([first.status_code, second.status_code]) == [201, 422], (first.text, second.text)
        loser = names["second"] if first.status_code == 201 else names["first"]
        tasks = requests.get(api(server, "/llm-tasks?limit=1000"), timeout=10).json()
        assert not [t for t in tasks if t["prompt"].startswith(loser)]  # all or nothing: none of its tasks


def test_batches_sharing_keys_in_different_orders_never_deadlock(server):
    """Two batches with the same keys, one in the reverse order of the other: 15 of 40
    answers were 503 "Database unavailable" (a deadlock on the keys' index entries). Now
    every answer is 201 or 200 (the same tasks, by key), none 503."""
    for _ in range(20):
        items = [{**TASK, "prompt": f"item {n}", "idempotency_key": f"k-{uuid.uuid4().hex}"} for n in range(30)]

        def batch(ordered):
            return lambda s: s.post(api(server, "/llm-tasks/batch"), json={"tasks": ordered}, timeout=30)

        forward, backward = _race(batch(items), batch(items[::-1]))
        assert sorted([forward.status_code, backward.status_code]) in ([200, 201], [201, 201]), \
            (forward.status_code, backward.text[:200])
        by_key = {item["idempotency_key"]: task["id"] for item, task in zip(items, forward.json()["tasks"], strict=True)}
        assert {item["idempotency_key"]: task["id"] for item, task in zip(items[::-1], backward.json()["tasks"], strict=True)} \
            == by_key
