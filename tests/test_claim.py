"""Pull-based workers: claim the next task, priorities, long poll, idempotent creation."""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from .helpers import TASK, create_task, register_worker


def claim(client, worker, **body):
    return client.post(f"/api/runtime/workers/{worker}/claim", json=body)


def test_claim_leases_the_next_queued_task(client):
    register_worker(client, "w1")
    task = create_task(client)
    response = claim(client, "w1", ttl_seconds=60)
    assert response.status_code == 201
    body = response.get_json()
    assert body["task"]["id"] == task["id"]
    assert (body["task"]["status"], body["task"]["attempts"], body["task"]["worker_id"]) == ("leased", 1, "w1")
    assert body["lease"]["task_id"] == task["id"] and body["lease"]["ttl_seconds"] == 60
    assert body["task"]["lease_id"] == body["lease"]["id"]
    assert client.get("/api/runtime/audit").get_json()[0]["action"] == "task_leased"


def test_claim_with_nothing_queued_is_204_with_an_empty_body(client):
    register_worker(client, "w1")
    response = claim(client, "w1")
    assert response.status_code == 204
    assert response.data == b""


def test_claim_refusals(client):
    assert claim(client, "ghost").status_code == 404
    register_worker(client, "off", status="offline")
    assert claim(client, "off").status_code == 409
    client.post("/api/runtime/workers", json={"name": "nocli", "capabilities": {"claude_cli": False}})
    assert claim(client, "nocli").status_code == 409
    register_worker(client, "w1", max_concurrency=1)
    create_task(client)
    create_task(client)
    assert claim(client, "w1").status_code == 201
    full = claim(client, "w1")
    assert full.status_code == 409 and "capacity" in full.get_json()["error"]
    for body in ({"ttl_seconds": 0}, {"ttl_seconds": "60"}, {"wait_seconds": 31}, {"wait_seconds": -1},
                 {"agent_slugs": "summarizer"}):
        assert claim(client, "w1", **body).status_code == 400, body


def test_a_worker_gives_back_a_lease_and_its_task_is_queued_without_spending_an_attempt(client):
    register_worker(client, "w1")
    register_worker(client, "w2")
    task = create_task(client)
    lease_id = claim(client, "w1").get_json()["lease"]["id"]
    release = "/api/runtime/workers/{}/release"
    # Only the holder gives a lease back; an unknown one is left alone.
    assert client.post(release.format("w2"), json={"lease_ids": [lease_id]}).get_json() == {"released": []}
    assert client.post(release.format("w1"), json={"lease_ids": ["nope"]}).get_json() == {"released": []}
    answer = client.post(release.format("w1"), json={"lease_ids": [lease_id]})
    assert answer.status_code == 200 and answer.get_json() == {"released": [lease_id]}
    again = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
    assert (again["status"], again["attempts"], again["lease_id"]) == ("queued", 0, None)
    assert client.get("/api/runtime/audit").get_json()[0]["action"] == "lease_given_back"
    assert client.post(release.format("w1"), json={"lease_ids": [lease_id]}).get_json() == {"released": []}
    # The next claim takes it, as the first attempt.
    assert claim(client, "w2").get_json()["task"]["attempts"] == 1
    assert client.post(release.format("ghost"), json={"lease_ids": [lease_id]}).status_code == 404
    for body in ({}, {"lease_ids": []}, {"lease_ids": "x"}, {"lease_ids": [""]}):
        assert client.post(release.format("w1"), json=body).status_code == 400, body


def test_claim_order_is_priority_then_age(client):
    register_worker(client, "w1", max_concurrency=8)
    low = create_task(client)
    high_first = create_task(client, priority=5)
    medium = create_task(client, priority=1)
    high_second = create_task(client, priority=5)
    negative = create_task(client, priority=-3)
    order = [claim(client, "w1").get_json()["task"]["id"] for _ in range(5)]
    assert order == [high_first["id"], high_second["id"], medium["id"], low["id"], negative["id"]]
    assert high_first["priority"] == 5 and low["priority"] == 0


def test_claim_filters_by_agent_slug(client):
    register_worker(client, "w1", max_concurrency=4)
    create_task(client, agent_slug="summarizer")
    wanted = create_task(client, agent_slug="translator")
    body = claim(client, "w1", agent_slugs=["translator"]).get_json()
    assert body["task"]["id"] == wanted["id"]
    assert claim(client, "w1", agent_slugs=["translator"]).status_code == 204


def test_long_poll_waits_then_answers_204(client):
    register_worker(client, "w1")
    started = time.monotonic()
    response = claim(client, "w1", wait_seconds=1)
    assert response.status_code == 204
    assert time.monotonic() - started >= 1.0


def test_idempotency_key_returns_the_earlier_task(client):
    headers = {"Idempotency-Key": "create-7f3a"}
    first = client.post("/api/runtime/llm-tasks", json=TASK, headers=headers)
    again = client.post("/api/runtime/llm-tasks", json=TASK, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json() == first.get_json()
    other = client.post("/api/runtime/llm-tasks", json=TASK, headers={"Idempotency-Key": "create-other"})
    assert other.status_code == 201 and other.get_json()["id"] != first.get_json()["id"]
    assert len(client.get("/api/runtime/llm-tasks").get_json()) == 2
    assert client.post("/api/runtime/llm-tasks", json=TASK, headers={"Idempotency-Key": "x" * 256}).status_code == 400


# Against gunicorn with several workers --------------------------------------------


def test_idempotent_creation_under_a_race(server):
    key = f"race-{uuid.uuid4()}"
    barrier = threading.Barrier(12)

    def create(_):
        barrier.wait()
        return requests.post(server.url("/api/runtime/llm-tasks"), json=TASK, headers={"Idempotency-Key": key}, timeout=30)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(create, range(12)))
    assert sorted(r.status_code for r in responses) == [200] * 11 + [201]
    assert len({r.json()["id"] for r in responses}) == 1


def test_long_poll_wakes_up_when_a_task_arrives(server):
    worker = f"poller-{uuid.uuid4().hex[:6]}"
    requests.post(server.url("/api/runtime/workers"), json={"name": worker}, timeout=10)
    outcome = {}

    def poll():
        started = time.monotonic()
        response = requests.post(server.url(f"/api/runtime/workers/{worker}/claim"),
                                 json={"wait_seconds": 25, "agent_slugs": [f"only-{worker}"]}, timeout=60)
        outcome.update(status=response.status_code, waited=time.monotonic() - started, body=response.json())

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(1.0)
    task = requests.post(server.url("/api/runtime/llm-tasks"), json={**TASK, "agent_slug": f"only-{worker}"}, timeout=10).json()
    poller.join(timeout=30)
    assert outcome["status"] == 201
    assert outcome["body"]["task"]["id"] == task["id"]
    assert 1.0 <= outcome["waited"] < 20  # woken by the new task, not by the end of the wait


def test_many_workers_claiming_at_once_run_each_task_exactly_once(server):
    slug = f"drain-{uuid.uuid4().hex[:6]}"
    workers = [f"{slug}-w{i}" for i in range(6)]
    for name in workers:
        requests.post(server.url("/api/runtime/workers"), json={"name": name, "capabilities": {"max_concurrency": 2}}, timeout=10)
    task_ids = {
        requests.post(server.url("/api/runtime/llm-tasks"), json={**TASK, "agent_slug": slug}, timeout=10).json()["id"]
        for _ in range(60)
    }
    completed: list[str] = []
    lock = threading.Lock()
    # Leases each worker holds as its threads count them: counted after the claim answers
    # and uncounted before the completion is sent, so never more than the server holds.
    held = {name: 0 for name in workers}
    most_held = {name: 0 for name in workers}

    def drain(name):
        while True:
            response = requests.post(server.url(f"/api/runtime/workers/{name}/claim"),
                                     json={"agent_slugs": [slug]}, timeout=30)
            if response.status_code == 204:
                return
            if response.status_code == 409:  # full: its other threads hold two tasks
                continue
            assert response.status_code == 201, response.text
            task_id = response.json()["task"]["id"]
            with lock:
                held[name] += 1
                most_held[name] = max(most_held[name], held[name])
            time.sleep(0.02)  # the work
            with lock:
                held[name] -= 1
            done = requests.post(server.url(f"/api/runtime/llm-tasks/{task_id}/complete"), json={
                "status": "success", "output": name, "metrics": {"duration_ms": 1},
                "lease_id": response.json()["lease"]["id"], "worker_id": name,
            }, timeout=30)
            assert done.status_code == 200, done.text
            with lock:
                completed.append(task_id)

    threads = [threading.Thread(target=drain, args=(name,)) for name in workers for _ in range(3)]  # 3 threads each
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(completed) == sorted(task_ids)  # every task, each exactly once
    assert max(most_held.values()) == 2  # reached max_concurrency, never more
    for name in workers:
        detail = requests.get(server.url(f"/api/runtime/workers/{name}"), timeout=10).json()
        assert detail["active_leases"] == 0


# Several tasks in one claim (max_tasks) ---------------------------------------------------


def test_a_claim_with_max_tasks_takes_up_to_the_free_capacity_in_queue_order(client):
    register_worker(client, "w1", max_concurrency=5)
    create_task(client, priority=9)
    held = claim(client, "w1").get_json()  # one lease already held: room for 4
    ids = [create_task(client, priority=priority)["id"] for priority in (1, 5, 3, 5, 2, 4)]
    response = claim(client, "w1", max_tasks=8, ttl_seconds=120)
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"tasks", "leases"}
    # priority, then age: the two 5s in creation order, then 4 and 3
    assert [task["id"] for task in body["tasks"]] == [ids[1], ids[3], ids[5], ids[2]]
    for task, granted in zip(body["tasks"], body["leases"], strict=True):
        assert granted["task_id"] == task["id"] and task["lease_id"] == granted["id"]
        assert task["status"] == "leased" and task["worker_id"] == "w1" and task["attempts"] == 1
        assert granted["status"] == "active" and granted["ttl_seconds"] == 120
        stored = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
        assert stored["status"] == "leased" and stored["lease_id"] == granted["id"]
    assert len({granted["id"] for granted in body["leases"]} | {held["lease"]["id"]}) == 5
    assert client.get("/api/runtime/workers/w1").get_json()["active_leases"] == 5
    assert claim(client, "w1", max_tasks=2).status_code == 409  # full
    leased_actions = [entry for entry in client.get("/api/runtime/audit").get_json() if entry["action"] == "task_leased"]
    assert len(leased_actions) == 5


def test_a_claim_with_max_tasks_answers_the_list_shape_even_for_one_and_204_for_none(client):
    register_worker(client, "w1", max_concurrency=4)
    assert claim(client, "w1", max_tasks=3).status_code == 204
    only = create_task(client)
    body = claim(client, "w1", max_tasks=3).get_json()
    assert [task["id"] for task in body["tasks"]] == [only["id"]] and len(body["leases"]) == 1
    create_task(client)
    assert set(claim(client, "w1").get_json()) == {"task", "lease"}  # without max_tasks: as before


def test_max_tasks_is_bounded_and_a_refusal_changes_nothing(client):
    register_worker(client, "w1", max_concurrency=4)
    create_task(client)
    for bad in (0, 33, "2", 1.5, -1):
        response = claim(client, "w1", max_tasks=bad)
        assert response.status_code == 400, bad
        assert "max_tasks" in response.get_json()["error"]["fieldErrors"]
    assert client.get("/api/runtime/workers/w1").get_json()["active_leases"] == 0


def test_batch_claims_from_many_workers_at_once_grant_each_task_once_within_capacity(server):
    """Real gunicorn processes and PostgreSQL: 8 processes, 2 threads each, claiming up to 8
    tasks at a time with capacity 6, until 200 tasks are done."""
    slug = f"batch-{uuid.uuid4().hex[:6]}"
    workers = [f"{slug}-w{i}" for i in range(8)]
    for name in workers:
        requests.post(server.url("/api/runtime/workers"), json={"name": name, "capabilities": {"max_concurrency": 6}}, timeout=10)
    created = requests.post(server.url("/api/runtime/llm-tasks/batch"),
                            json={"tasks": [{**TASK, "agent_slug": slug}] * 200}, timeout=30)
    task_ids = {task["id"] for task in created.json()["tasks"]}
    completed: list[str] = []
    most_in_one_answer = [0]
    lock = threading.Lock()

    def drain(name):
        session = requests.Session()
        while True:
            response = session.post(server.url(f"/api/runtime/workers/{name}/claim"),
                                    json={"agent_slugs": [slug], "max_tasks": 8}, timeout=30)
            if response.status_code == 204:
                return
            if response.status_code == 409:  # its other thread holds the rest of the room
                time.sleep(0.01)
                continue
            assert response.status_code == 201, response.text
            body = response.json()
            with lock:
                most_in_one_answer[0] = max(most_in_one_answer[0], len(body["tasks"]))
            for task, granted in zip(body["tasks"], body["leases"], strict=True):
                done = session.post(server.url(f"/api/runtime/llm-tasks/{task['id']}/complete"), json={
                    "status": "success", "output": name, "metrics": {"duration_ms": 1},
                    "lease_id": granted["id"], "worker_id": name,
                }, timeout=30)
                assert done.status_code == 200, done.text
                with lock:
                    completed.append(task["id"])

    with ThreadPoolExecutor(max_workers=16) as pool:
        for future in [pool.submit(drain, name) for name in workers for _ in range(2)]:
            future.result(timeout=120)
    assert sorted(completed) == sorted(task_ids)  # every task, each exactly once
    assert 1 < most_in_one_answer[0] <= 6  # several at once, never past the capacity
    for name in workers:
        assert requests.get(server.url(f"/api/runtime/workers/{name}"), timeout=10).json()["active_leases"] == 0


def test_a_claim_whose_answer_was_lost_is_not_kept_alive_by_the_workers_heartbeats(client):
    """The serving process died after the claim committed: the worker never saw that lease.
    Its heartbeats name the leases it runs; the lost one is not renewed, runs out at its
    TTL, and its task goes back to the queue instead of being held for ever."""
    register_worker(client, "w1", max_concurrency=2)
    lost_task, known_task = create_task(client), create_task(client)
    lost = claim(client, "w1", ttl_seconds=60).get_json()["lease"]  # the answer that never arrived
    known = claim(client, "w1", ttl_seconds=60).get_json()["lease"]
    time.sleep(0.01)
    beat = client.post("/api/runtime/workers/w1/heartbeat", json={"lease_ids": [known["id"]]}).get_json()
    assert [renewed["lease_id"] for renewed in beat["renewed"]] == [known["id"]] and beat["lost"] == []
    leases = {lease["id"]: lease for lease in client.get("/api/runtime/leases").get_json()}
    assert leases[lost["id"]]["expires_at"] == lost["expires_at"]  # not renewed
    assert leases[known["id"]]["expires_at"] > known["expires_at"]
    assert {lost["task_id"], known["task_id"]} == {lost_task["id"], known_task["id"]}
    # A heartbeat that names nothing is a sign of life only: it renews none of them
    # (anyone could otherwise keep a dead worker's leases alive in its name).
    beat = client.post("/api/runtime/workers/w1/heartbeat", json={}).get_json()
    assert beat == {"renewed": [], "lost": []}
