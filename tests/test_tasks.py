"""Task lifecycle through the API: create, list, lease, heartbeat, complete, requeue."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from bloom.services import services

from .helpers import DONE, TASK, audit_actions, create_task, lease, register_worker


def heartbeat(client, task_id, **body):
    return client.post(f"/api/runtime/llm-tasks/{task_id}/heartbeat", json=body)


def complete(client, task_id, **body):
    return client.post(f"/api/runtime/llm-tasks/{task_id}/complete", json={**DONE, **body})


# Creating and listing ---------------------------------------------------------


def test_create_task_applies_the_documented_defaults(client):
    response = client.post("/api/runtime/llm-tasks", json=TASK)
    assert response.status_code == 201
    task = response.get_json()
    assert task["status"] == "queued"
    assert task["attempts"] == 0 and task["max_attempts"] == 3
    assert task["policy"] == {"timeout_sec": 120, "budget": 0}
    assert task["desired_format"] == "text"
    assert task["context_hints"] == []
    assert task["lease_id"] is None and task["worker_id"] is None
    assert task["created_at"] == task["updated_at"] > 1_600_000_000_000
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json() == {**task, "result": None}
    assert audit_actions(client) == ["task_created"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"context_id": None}, "context_id"),
        ({"agent_slug": 7}, "agent_slug"),
        ({"context_hints": "not a list"}, "context_hints"),
        ({"context_hints": [1, 2]}, "context_hints"),
        ({"policy": {"timeout_sec": 0}}, "policy"),
        ({"policy": {"timeout_sec": 3601}}, "policy"),
        ({"policy": {"timeout_sec": "300"}}, "policy"),
        ({"policy": {"timeout_sec": 2.5}}, "policy"),
        ({"policy": {"timeout_sec": True}}, "policy"),
        ({"policy": {"budget": -1}}, "policy"),
        ({"policy": {"budget": "5"}}, "policy"),
        ({"desired_format": "xml"}, "desired_format"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 11}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
    ],
)
def test_invalid_task_is_400_with_field_errors_and_nothing_created(client, change, field):
    response = client.post("/api/runtime/llm-tasks", json={**TASK, **change})
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["formErrors"] == []
    assert list(error["fieldErrors"]) == [field]
    assert client.get("/api/runtime/llm-tasks").get_json() == []


def test_missing_fields_are_each_reported(client):
    error = client.post("/api/runtime/llm-tasks", json={}).get_json()["error"]
    assert set(error["fieldErrors"]) == {"context_id", "agent_slug", "prompt"}


def test_tasks_list_in_flight_first_then_newest_with_status_filter_and_paging(client):
    register_worker(client, "w1")
    first = create_task(client)
    second = create_task(client)
    third = create_task(client)
    assert lease(client, second["id"]).status_code == 201
    listed = [t["id"] for t in client.get("/api/runtime/llm-tasks").get_json()]
    assert listed == [second["id"], third["id"], first["id"]]  # what needs an operator first
    queued = [t["id"] for t in client.get("/api/runtime/llm-tasks?status=queued").get_json()]
    assert queued == [third["id"], first["id"]]
    leased = client.get("/api/runtime/llm-tasks?status=leased").get_json()
    assert [t["id"] for t in leased] == [second["id"]]
    page = [t["id"] for t in client.get("/api/runtime/llm-tasks?limit=1&offset=1").get_json()]
    assert page == [second["id"]]
    assert client.get("/api/runtime/llm-tasks?status=bogus").status_code == 400
    assert [t["id"] for t in client.get("/api/runtime/runs").get_json()] == [third["id"], second["id"], first["id"]]


def test_unknown_task_is_404(client):
    response = client.get("/api/runtime/llm-tasks/no-such-task")
    assert response.status_code == 404
    assert response.get_json() == {"error": "Task not found"}
    assert lease(client, "no-such-task").status_code == 404


# Leasing ----------------------------------------------------------------------


def test_lease_picks_a_worker_and_moves_the_task(client):
    register_worker(client, "w1")
    task = create_task(client)
    response = lease(client, task["id"], ttl_seconds=60)
    assert response.status_code == 201
    granted = response.get_json()
    assert granted["worker"]["id"] == "w1"
    assert granted["worker"]["active_leases"] == 1
    lease_row = granted["lease"]
    assert lease_row["status"] == "active"
    assert lease_row["ttl_seconds"] == 60
    assert lease_row["expires_at"] == lease_row["started_at"] + 60_000
    assert lease_row["context_id"] == task["context_id"]
    leased = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
    assert leased["status"] == "leased"
    assert leased["lease_id"] == lease_row["id"] and leased["worker_id"] == "w1"
    assert leased["attempts"] == 1
    assert audit_actions(client)[0] == "task_leased"


def test_lease_without_a_free_worker_is_503(client):
    task = create_task(client)
    response = lease(client, task["id"])
    assert response.status_code == 503
    assert response.get_json() == {"error": "No available worker with free capacity"}
    register_worker(client, "w1")
    assert lease(client, create_task(client)["id"]).status_code == 201
    assert lease(client, task["id"]).status_code == 503  # w1 is full now
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "queued"


def test_lease_skips_offline_and_non_claude_workers(client):
    register_worker(client, "off", status="offline", max_concurrency=8)
    client.post("/api/runtime/workers", json={"name": "nocli", "capabilities": {"claude_cli": False, "max_concurrency": 8}})
    assert lease(client, create_task(client)["id"]).status_code == 503
    register_worker(client, "good")
    assert lease(client, create_task(client)["id"]).get_json()["worker"]["id"] == "good"


def test_lease_prefers_the_worker_holding_the_same_context_then_most_free_capacity(client):
    register_worker(client, "small", max_concurrency=2)
    register_worker(client, "big", max_concurrency=4)
    first = lease(client, create_task(client, context_id="notebook-A")["id"]).get_json()
    assert first["worker"]["id"] == "big"  # 4 free beats 2 free
    # big has 3 free now, small 2: a new context still goes to big...
    other = lease(client, create_task(client, context_id="notebook-B")["id"]).get_json()
    assert other["worker"]["id"] == "big"
    # ...and now both have 2 free; sticky context wins over the tie-break.
    assert lease(client, create_task(client, context_id="notebook-A")["id"]).get_json()["worker"]["id"] == "big"
    # big: 1 free, small: 2 free -> an unrelated context goes to small.
    assert lease(client, create_task(client, context_id="notebook-C")["id"]).get_json()["worker"]["id"] == "small"


def test_lease_to_a_named_worker(client):
    register_worker(client, "w1", max_concurrency=1)
    register_worker(client, "w2", status="offline")
    client.post("/api/runtime/workers", json={"name": "nocli", "capabilities": {"claude_cli": False}})
    task = create_task(client)
    unknown = lease(client, task["id"], worker_id="ghost")
    assert (unknown.status_code, unknown.get_json()) == (404, {"error": "Worker not found"})
    assert lease(client, task["id"], worker_id="w2").status_code == 409
    assert lease(client, task["id"], worker_id="nocli").status_code == 409
    assert lease(client, task["id"], worker_id="w1").status_code == 201
    full = lease(client, create_task(client)["id"], worker_id="w1")
    assert full.status_code == 409
    assert "capacity" in full.get_json()["error"]


def test_lease_of_a_task_that_is_not_queued_is_409(client):
    register_worker(client, "w1", max_concurrency=2)
    task = create_task(client)
    assert lease(client, task["id"]).status_code == 201
    again = lease(client, task["id"])
    assert again.status_code == 409
    assert again.get_json() == {"error": "Task status is 'leased', expected 'queued'"}


@pytest.mark.parametrize("ttl", ["abc", 2.5, -5, 0, 86401, "300", True, None])
def test_lease_ttl_must_be_an_integer_from_1_to_86400(client, ttl):
    register_worker(client, "w1")
    task = create_task(client)
    response = lease(client, task["id"], ttl_seconds=ttl)
    assert response.status_code == 400
    assert "ttl_seconds" in response.get_json()["error"]["fieldErrors"]
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "queued"
    assert client.get("/api/runtime/leases").get_json() == []


# Heartbeat --------------------------------------------------------------------


def test_heartbeat_renews_the_lease_and_marks_the_task_running(client):
    register_worker(client, "w1")
    task = create_task(client)
    granted = lease(client, task["id"], ttl_seconds=60).get_json()["lease"]
    time.sleep(0.01)
    response = heartbeat(client, task["id"])
    assert response.status_code == 200
    body = response.get_json()
    assert body["lease"]["id"] == granted["id"]
    assert body["expires_at"] == body["lease"]["expires_at"] > granted["expires_at"]
    assert body["expires_at"] == body["lease"]["last_heartbeat"] + 60_000
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "running"


def test_later_heartbeats_renew_the_lease_and_leave_the_running_task_as_it_is(client):
    register_worker(client, "w1")
    task = create_task(client)
    lease(client, task["id"], ttl_seconds=60)
    first = heartbeat(client, task["id"]).get_json()
    running = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
    time.sleep(0.01)
    second = heartbeat(client, task["id"]).get_json()
    assert second["expires_at"] > first["expires_at"]
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json() == running  # updated_at too


def test_heartbeat_without_a_lease_is_404(client):
    task = create_task(client)
    response = heartbeat(client, task["id"])
    assert (response.status_code, response.get_json()) == (404, {"error": "Task or lease not found"})
    assert heartbeat(client, "no-such-task").status_code == 404


def test_heartbeat_after_completion_is_404(client):
    register_worker(client, "w1")
    task = create_task(client)
    lease(client, task["id"])
    assert complete(client, task["id"]).status_code == 200
    response = heartbeat(client, task["id"])
    assert (response.status_code, response.get_json()) == (404, {"error": "Lease not found or already expired"})
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "completed"


def test_a_late_heartbeat_does_not_revive_an_expired_lease(client):
    register_worker(client, "w1")
    task = create_task(client)
    granted = lease(client, task["id"], ttl_seconds=1).get_json()["lease"]
    time.sleep(1.1)
    response = heartbeat(client, task["id"])
    assert (response.status_code, response.get_json()) == (409, {"error": "Lease expired"})
    stored = client.get("/api/runtime/leases").get_json()[0]
    assert stored["expires_at"] == granted["expires_at"]
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "leased"


def test_heartbeat_and_complete_are_fenced_by_lease_and_worker(client):
    register_worker(client, "w1")
    task = create_task(client)
    granted = lease(client, task["id"]).get_json()["lease"]
    wrong_lease = heartbeat(client, task["id"], lease_id="some-old-lease")
    assert wrong_lease.status_code == 409
    assert heartbeat(client, task["id"], worker_id="w2").status_code == 409
    assert complete(client, task["id"], lease_id="some-old-lease").status_code == 409
    assert complete(client, task["id"], worker_id="w2").status_code == 409
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "leased"
    assert heartbeat(client, task["id"], lease_id=granted["id"], worker_id="w1").status_code == 200
    assert complete(client, task["id"], lease_id=granted["id"], worker_id="w1").status_code == 200


# Completion -------------------------------------------------------------------


def test_complete_writes_artifact_result_and_releases_the_lease(client):
    register_worker(client, "w1")
    task = create_task(client)
    granted = lease(client, task["id"]).get_json()["lease"]
    response = complete(client, task["id"], artifact_tags=["summary"])
    assert response.status_code == 200
    body = response.get_json()
    assert body["task"]["status"] == "completed"
    artifact, result = body["artifact"], body["result"]
    assert artifact["task_id"] == task["id"] and artifact["type"] == "LLM_RESULT"
    assert artifact["content"] == "A summary." and artifact["url"] is None
    assert artifact["tags"] == ["summary"] and artifact["finalized"] is True
    assert result["artifact_id"] == artifact["id"] and result["worker_id"] == "w1"
    assert result["output"] == "A summary." and result["status"] == "success"
    assert result["metrics"] == {"duration_ms": 1200, "tokens_used": 321}
    leases = client.get("/api/runtime/leases").get_json()
    assert [(lease["id"], lease["status"]) for lease in leases] == [(granted["id"], "released")]
    assert client.get("/api/runtime/workers/w1").get_json()["active_leases"] == 0
    assert [a["id"] for a in client.get(f"/api/runtime/artifacts?task_id={task['id']}").get_json()] == [artifact["id"]]
    assert audit_actions(client)[0] == "task_completed"


def test_error_completion_of_the_last_attempt_fails_the_task(client):
    register_worker(client, "w1")
    task = create_task(client, max_attempts=1)
    lease(client, task["id"])
    body = complete(client, task["id"], status="error", output=None, error_message="model timeout").get_json()
    assert body["task"]["status"] == "failed" and body["task"]["retry_at"] is None
    assert body["result"]["error_message"] == "model timeout"


def _make_due(app, task_id: str) -> None:
    """Time passes: the task's retry_at is now behind it."""
    with services(app).database.engine.begin() as connection:
        connection.execute(text("UPDATE llm_tasks SET retry_at = 1 WHERE id = :id"), {"id": task_id})


def test_a_failed_run_is_retried_with_exponential_backoff_until_its_attempts_are_spent(app, client):
    register_worker(client, "w1")
    task = create_task(client, max_attempts=3)
    backoffs = []
    for attempt in (1, 2):
        assert lease(client, task["id"]).status_code == 201
        before = int(time.time() * 1000)
        body = complete(client, task["id"], status="error", output=None, error_message=f"crash {attempt}").get_json()
        assert (body["task"]["status"], body["task"]["attempts"], body["task"]["lease_id"]) == ("queued", attempt, None)
        assert body["result"]["status"] == "error"
        backoffs.append(body["task"]["retry_at"] - before)
        # Neither claimable nor leasable before retry_at.
        assert client.post("/api/runtime/workers/w1/claim", json={}).status_code == 204
        early = lease(client, task["id"])
        assert early.status_code == 409 and "not due until" in early.get_json()["error"]
        _make_due(app, task["id"])
    assert 7_500 <= backoffs[0] <= 12_600 and 15_000 <= backoffs[1] <= 25_100  # 10 s, then 20 s, ±25 %
    lease(client, task["id"])
    last = complete(client, task["id"], status="error", output=None, error_message="crash 3").get_json()
    assert (last["task"]["status"], last["task"]["retry_at"]) == ("failed", None)
    assert len(client.get(f"/api/runtime/artifacts?task_id={task['id']}").get_json()) == 3  # every result kept


def test_a_task_with_run_at_in_the_future_is_not_claimed_before(client):
    register_worker(client, "w1")
    later = create_task(client, run_at=int(time.time() * 1000) + 3_600_000)
    now = create_task(client, run_at=int(time.time() * 1000) - 1)
    assert later["run_at"] > now["run_at"]
    claimed = client.post("/api/runtime/workers/w1/claim", json={}).get_json()
    assert claimed["task"]["id"] == now["id"]
    assert client.post("/api/runtime/workers/w1/claim", json={}).status_code in (204, 409)
    early = client.post(f"/api/runtime/llm-tasks/{later['id']}/lease", json={"worker_id": "w1"})
    assert early.status_code == 409 and "not due until" in early.get_json()["error"]
    assert client.get(f"/api/runtime/llm-tasks/{later['id']}").get_json()["status"] == "queued"
    assert client.post("/api/runtime/llm-tasks", json={**TASK, "run_at": "soon"}).status_code == 400


def test_cancel_a_queued_task_and_a_running_one(client):
    register_worker(client, "w1", max_concurrency=2)
    queued = create_task(client)
    running = create_task(client)
    granted = lease(client, running["id"]).get_json()["lease"]
    client.post(f"/api/runtime/llm-tasks/{running['id']}/heartbeat", json={"lease_id": granted["id"]})
    for task in (queued, running):
        response = client.post(f"/api/runtime/llm-tasks/{task['id']}/cancel")
        assert (response.status_code, response.get_json()["status"]) == (200, "cancelled")
    beat = client.post(f"/api/runtime/llm-tasks/{running['id']}/heartbeat", json={"lease_id": granted["id"]})
    assert (beat.status_code, beat.get_json()) == (409, {"error": "Task cancelled"})
    late = complete(client, running["id"], lease_id=granted["id"])
    assert late.status_code == 409
    assert client.get(f"/api/runtime/artifacts?task_id={running['id']}").get_json() == []  # nothing stored
    assert client.get("/api/runtime/leases?status=active").get_json() == []
    assert client.get("/api/runtime/workers/w1").get_json()["active_leases"] == 0
    assert client.post(f"/api/runtime/llm-tasks/{queued['id']}/cancel").status_code == 200  # again: as it is
    assert client.get("/api/runtime/stats").get_json()["tasks"]["by_status"]["cancelled"] == 2
    assert "task_cancelled" in audit_actions(client)


def test_a_finished_task_cannot_be_cancelled(client):
    register_worker(client, "w1")
    task = create_task(client)
    lease(client, task["id"])
    complete(client, task["id"])
    response = client.post(f"/api/runtime/llm-tasks/{task['id']}/cancel")
    assert (response.status_code, response.get_json()) == (409, {"error": "Cannot cancel task with status 'completed'"})
    assert client.post("/api/runtime/llm-tasks/nope/cancel").status_code == 404


def test_second_completion_is_409_and_writes_no_second_result(client):
    register_worker(client, "w1")
    task = create_task(client)
    lease(client, task["id"])
    assert complete(client, task["id"]).status_code == 200
    second = complete(client, task["id"], output="another answer")
    assert second.status_code == 409
    assert second.get_json() == {"error": "Task status is 'completed', expected 'leased' or 'running'"}
    assert len(client.get("/api/runtime/artifacts").get_json()) == 1


def test_completing_a_queued_task_is_409(client):
    task = create_task(client)
    assert complete(client, task["id"]).status_code == 409
    assert complete(client, "no-such-task").status_code == 404


@pytest.mark.parametrize(
    "change, field",
    [
        ({"status": "done"}, "status"),
        ({"metrics": {"duration_ms": -1}}, "metrics"),
        ({"metrics": {"duration_ms": 1.5}}, "metrics"),
        ({"metrics": {}}, "metrics"),
        ({"metrics": None}, "metrics"),
        ({"output": 42}, "output"),
        ({"artifact_tags": "x"}, "artifact_tags"),
    ],
)
def test_invalid_completion_is_400_and_changes_nothing(client, change, field):
    register_worker(client, "w1")
    task = create_task(client)
    lease(client, task["id"])
    response = complete(client, task["id"], **change)
    assert response.status_code == 400
    assert field in response.get_json()["error"]["fieldErrors"]
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "leased"
    assert client.get("/api/runtime/artifacts").get_json() == []


# Requeue and sweep --------------------------------------------------------------


def test_requeue_only_from_failed_or_dead(client):
    register_worker(client, "w1")
    task = create_task(client, max_attempts=1)
    refused = client.post(f"/api/runtime/llm-tasks/{task['id']}/requeue")
    assert (refused.status_code, refused.get_json()) == (409, {"error": "Cannot requeue task with status 'queued'"})
    lease(client, task["id"])
    complete(client, task["id"], status="error", output=None, error_message="boom")
    response = client.post(f"/api/runtime/llm-tasks/{task['id']}/requeue")
    assert response.status_code == 200
    requeued = response.get_json()
    assert (requeued["status"], requeued["attempts"], requeued["lease_id"], requeued["worker_id"]) == ("queued", 0, None, None)
    assert audit_actions(client)[0] == "task_requeued"
    assert client.post("/api/runtime/llm-tasks/no-such-task/requeue").status_code == 404


def test_sweep_requeues_leased_and_running_tasks_whose_lease_expired(client, leases):
    register_worker(client, "w1", max_concurrency=3)
    leased_task = create_task(client)
    running_task = create_task(client)
    live_task = create_task(client)
    lease(client, leased_task["id"], ttl_seconds=1)
    lease(client, running_task["id"], ttl_seconds=1)
    heartbeat(client, running_task["id"])
    lease(client, live_task["id"], ttl_seconds=300)
    time.sleep(1.1)
    assert leases.sweep_expired_leases() == {"expired": 2, "requeued": 2, "dead": 0}
    for task in (leased_task, running_task):
        swept = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
        assert (swept["status"], swept["lease_id"], swept["worker_id"], swept["attempts"]) == ("queued", None, None, 1)
    assert client.get(f"/api/runtime/llm-tasks/{live_task['id']}").get_json()["status"] == "leased"
    assert client.get("/api/runtime/workers/w1").get_json()["active_leases"] == 1
    assert {lease["status"] for lease in client.get("/api/runtime/leases?status=expired").get_json()} == {"expired"}
    assert len(client.get("/api/runtime/leases?status=expired").get_json()) == 2
    # The swept task can be leased again.
    assert lease(client, running_task["id"]).status_code == 201


def test_sweep_kills_a_task_that_used_its_attempts(client, leases):
    register_worker(client, "w1")
    task = create_task(client, max_attempts=1)
    lease(client, task["id"], ttl_seconds=1)
    time.sleep(1.1)
    assert leases.sweep_expired_leases() == {"expired": 1, "requeued": 0, "dead": 1}
    dead = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
    assert dead["status"] == "dead"
    assert client.post(f"/api/runtime/llm-tasks/{task['id']}/requeue").status_code == 200


def test_a_worker_that_lost_its_lease_cannot_complete_the_new_holders_task(client, leases):
    register_worker(client, "slow")
    task = create_task(client)
    old = lease(client, task["id"], worker_id="slow", ttl_seconds=1).get_json()["lease"]
    time.sleep(1.1)
    leases.sweep_expired_leases()
    register_worker(client, "fresh")
    new = lease(client, task["id"], worker_id="fresh").get_json()["lease"]
    late = complete(client, task["id"], lease_id=old["id"], worker_id="slow")
    assert late.status_code == 409
    assert heartbeat(client, task["id"], lease_id=old["id"]).status_code == 409
    current = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
    assert (current["status"], current["lease_id"]) == ("leased", new["id"])
    assert complete(client, task["id"], lease_id=new["id"]).status_code == 200


def test_stats_count_tasks_leases_and_workers(client):
    register_worker(client, "w1", max_concurrency=2)
    register_worker(client, "w2", status="offline")
    first = create_task(client)
    create_task(client)
    lease(client, first["id"])
    stats = client.get("/api/runtime/stats").get_json()
    assert stats["tasks"]["total"] == 2
    assert stats["tasks"]["by_status"]["queued"] == 1 and stats["tasks"]["by_status"]["leased"] == 1
    assert stats["leases"] == {"total": 1, "active": 1}
    assert stats["workers"] == {"total": 2, "online": 1}


def test_audit_is_newest_first_and_limited(client):
    for _ in range(3):
        create_task(client)
    entries = client.get("/api/runtime/audit?limit=2").get_json()
    assert len(entries) == 2
    assert entries[0]["timestamp"] >= entries[1]["timestamp"]
    assert client.get("/api/runtime/audit?limit=x").status_code == 400


def test_a_task_shows_its_latest_result_and_a_failure_stays_readable(client):
    register_worker(client, "w1")
    task = create_task(client, max_attempts=1)
    granted = lease(client, task["id"]).get_json()["lease"]
    client.post(f"/api/runtime/llm-tasks/{task['id']}/complete", json={
        "status": "error", "output": None, "error_message": "exit code 2: command not found",
        "metrics": {"duration_ms": 5}, "lease_id": granted["id"],
    })
    shown = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
    assert shown["status"] == "failed"
    assert shown["result"]["status"] == "error"
    assert shown["result"]["error_message"] == "exit code 2: command not found"
    assert shown["result"]["completed_at"] >= shown["created_at"]


@pytest.mark.parametrize("output, status", [('{"summary": "ok"}', "completed"), ("this is not json", "failed")])
def test_a_json_task_completed_with_output_that_is_not_json_fails_with_the_reason(client, output, status):
    register_worker(client, "w1")
    task = create_task(client, desired_format="json", max_attempts=1)
    lease(client, task["id"])
    done = client.post(f"/api/runtime/llm-tasks/{task['id']}/complete", json={**DONE, "output": output})
    assert done.status_code == 200
    assert done.get_json()["task"]["status"] == status
    result = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["result"]
    assert result["output"] == output  # kept, so the failure can be understood
    if status == "failed":
        assert result["status"] == "error" and "not valid JSON" in result["error_message"]
    else:
        assert result["status"] == "success"


def test_stats_past_the_threshold_estimate_finished_counts_and_stay_exact_for_live_ones(
    client, database_url, monkeypatch
):
    from sqlalchemy import create_engine, text

    import bloom.records.service

    monkeypatch.setattr(bloom.records.service, "STATS_EXACT_BELOW_ROWS", 1000)
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at) "
            "SELECT 'old-' || g, 'c', 'a', 'p', (ARRAY['completed', 'failed'])[1 + g % 2], g, g "
            "FROM generate_series(1, 4000) g"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE llm_tasks"))
    engine.dispose()
    for _ in range(3):
        create_task(client)
    stats = client.get("/api/runtime/stats").get_json()
    assert stats["estimated"] is True
    assert stats["tasks"]["by_status"]["queued"] == 3  # live: exact
    assert 1500 <= stats["tasks"]["by_status"]["completed"] <= 2500  # ~2,000, from the statistics
    assert 1500 <= stats["tasks"]["by_status"]["failed"] <= 2500


def test_one_worker_heartbeat_renews_all_its_leases_and_names_the_lost_ones(client, database_url):
    from sqlalchemy import create_engine, text

    register_worker(client, "w1", max_concurrency=8)
    register_worker(client, "w2")
    tasks = [create_task(client) for _ in range(4)]
    leases = [lease(client, task["id"], worker_id="w1", ttl_seconds=60).get_json()["lease"] for task in tasks]
    other = lease(client, create_task(client)["id"], worker_id="w2").get_json()["lease"]
    engine = create_engine(database_url)
    with engine.begin() as connection:  # one lease's time ran out, the sweep has not come yet
        connection.execute(text("UPDATE leases SET expires_at = 1 WHERE id = :id"), {"id": leases[2]["id"]})
    engine.dispose()
    client.post(f"/api/runtime/llm-tasks/{tasks[3]['id']}/cancel")
    held = [lease_["id"] for lease_ in leases] + [other["id"], "no-such-lease"]
    response = client.post("/api/runtime/workers/w1/heartbeat", json={"lease_ids": held})
    assert response.status_code == 200
    body = response.get_json()
    assert sorted(r["lease_id"] for r in body["renewed"]) == sorted([leases[0]["id"], leases[1]["id"]])
    assert all(r["expires_at"] > leases[0]["expires_at"] - 1 for r in body["renewed"])
    lost = {entry["lease_id"]: (entry["lease_status"], entry["task_status"]) for entry in body["lost"]}
    assert lost == {
        leases[2]["id"]: ("expired", "leased"),
        leases[3]["id"]: ("released", "cancelled"),
        other["id"]: ("unknown", "leased"),  # another worker's lease: not this worker's to renew
        "no-such-lease": ("unknown", None),
    }
    assert client.get(f"/api/runtime/llm-tasks/{tasks[0]['id']}").get_json()["status"] == "running"
    assert client.post("/api/runtime/workers/nobody/heartbeat", json={}).status_code == 404


def test_a_batch_creates_its_tasks_all_or_nothing_with_idempotency_per_item(client):
    batch = [{**TASK, "prompt": f"p{n}", "idempotency_key": f"k{n}" if n % 2 else None} for n in range(5)]
    first = client.post("/api/runtime/llm-tasks/batch", json={"tasks": batch})
    assert first.status_code == 201
    created = first.get_json()["tasks"]
    assert [task["prompt"] for task in created] == [f"p{n}" for n in range(5)]  # in the order given
    assert {task["status"] for task in created} == {"queued"}
    keyed_again = [item for item in batch if item["idempotency_key"]]
    again = client.post("/api/runtime/llm-tasks/batch", json={"tasks": keyed_again})
    assert again.status_code == 200
    assert [t["id"] for t in again.get_json()["tasks"]] == [t["id"] for t in created if t["prompt"] in ("p1", "p3")]
    mixed = [{**TASK, "prompt": "new"}, {**keyed_again[0], "prompt": "changed"}]
    refused = client.post("/api/runtime/llm-tasks/batch", json={"tasks": mixed})
    assert (refused.status_code, refused.get_json()) == (422, {"error": "Idempotency-Key reused with a different request"})
    invalid = client.post("/api/runtime/llm-tasks/batch", json={"tasks": [{**TASK, "prompt": "ok"}, {**TASK, "prompt": ""}]})
    assert invalid.status_code == 400 and "tasks" in invalid.get_json()["error"]["fieldErrors"]
    assert client.post("/api/runtime/llm-tasks/batch", json={"tasks": [TASK] * 1001}).status_code == 400
    duplicate_keys = [{**TASK, "idempotency_key": "same"}, {**TASK, "idempotency_key": "same"}]
    assert client.post("/api/runtime/llm-tasks/batch", json={"tasks": duplicate_keys}).status_code == 400
    assert len(client.get("/api/runtime/llm-tasks").get_json()) == 5  # nothing from the refused batches


def test_text_postgresql_cannot_store_is_a_400_however_the_body_writes_it(client):
    """NUL and unpaired surrogates reach a string only through a \\u escape; the body is
    looked through whenever it could hold one (also UTF-16 bodies, and a stray
    escaped backslash), and a body that cannot is taken without the walk."""
    def post(raw: bytes):
        return client.post("/api/runtime/llm-tasks", data=raw, content_type="application/json")

    prompt_with = '{"context_id": "c", "agent_slug": "s", "prompt": "%s"}'
    for written in ("a\\u0000b", "a\\uD83Db", "a\\udfffb"):
        response = post((prompt_with % written).encode())
        assert response.status_code == 400, written
        assert "NUL" in str(response.get_json()) or "surrogate" in str(response.get_json())
    batch = ('{"tasks": [{"context_id": "c", "agent_slug": "s", "prompt": "fine"}, '
             '{"context_id": "c", "agent_slug": "s", "prompt": "x", "context_hints": ["\\u0000"]}]}')
    assert client.post("/api/runtime/llm-tasks/batch", data=batch.encode(),
                       content_type="application/json").status_code == 400
    assert post((prompt_with % "a\\u0000b").encode("utf-16")).status_code == 400  # detected as UTF-16
    assert client.get("/api/runtime/llm-tasks?limit=10").get_json() == []  # nothing was created
    stored = post((prompt_with % "a\\\\u0000b \\u00e9").encode())  # a literal backslash-u, and an é
    assert stored.status_code == 201 and stored.get_json()["prompt"] == "a\\u0000b é"
