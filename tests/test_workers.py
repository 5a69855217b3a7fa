"""Registering, listing, showing and removing workers."""
from __future__ import annotations

import pytest

from .helpers import audit_actions, create_task, lease, register_worker


def test_register_creates_an_online_worker_with_defaults(client):
    response = client.post("/api/runtime/workers", json={"name": "gpu-box-1", "url": "http://10.0.0.5:7000"})
    assert response.status_code == 201
    worker = response.get_json()
    assert worker["id"] == "gpu-box-1"
    assert worker["status"] == "online"
    assert worker["capabilities"] == {"claude_cli": True, "max_concurrency": 1, "labels": []}
    assert worker["active_leases"] == 0
    assert worker["last_heartbeat"] == worker["registered_at"]
    assert worker["registered_at"] > 1_600_000_000_000  # epoch milliseconds
    assert audit_actions(client) == ["worker_registered"]


def test_reregistering_keeps_registered_at_and_answers_200(client):
    first = register_worker(client, "w1", max_concurrency=2)
    again = client.post("/api/runtime/workers", json={"name": "w1", "status": "offline"})
    assert again.status_code == 200
    worker = again.get_json()
    assert worker["registered_at"] == first["registered_at"]
    assert worker["status"] == "offline"
    assert worker["capabilities"]["max_concurrency"] == 2  # left out, so kept
    assert worker["last_heartbeat"] >= first["last_heartbeat"]
    assert audit_actions(client) == ["worker_updated", "worker_registered"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"name": "w", "status": "sleeping"}, "status"),
        ({"name": "w", "capabilities": {"max_concurrency": 0}}, "capabilities"),
        ({"name": "w", "capabilities": {"max_concurrency": 33}}, "capabilities"),
        ({"name": "w", "capabilities": {"max_concurrency": "2"}}, "capabilities"),
        ({"name": "w", "capabilities": {"claude_cli": "yes"}}, "capabilities"),
        ({"name": "w", "ip_addrs": "10.0.0.1"}, "ip_addrs"),
    ],
)
def test_invalid_registration_is_400_and_writes_nothing(client, body, field):
    response = client.post("/api/runtime/workers", json=body)
    assert response.status_code == 400
    assert field in response.get_json()["error"]["fieldErrors"]
    assert client.get("/api/runtime/workers").get_json() == []
    assert audit_actions(client) == []


def test_worker_detail_lists_its_active_leases(client):
    register_worker(client, "w1", max_concurrency=2)
    task = create_task(client)
    granted = lease(client, task["id"], worker_id="w1").get_json()
    detail = client.get("/api/runtime/workers/w1").get_json()
    assert detail["active_leases"] == 1
    assert [entry["id"] for entry in detail["leases"]] == [granted["lease"]["id"]]
    listed = client.get("/api/runtime/workers").get_json()
    assert [(w["id"], w["active_leases"]) for w in listed] == [("w1", 1)]


def test_unknown_worker_is_404(client):
    response = client.get("/api/runtime/workers/nobody")
    assert response.status_code == 404
    assert response.get_json() == {"error": "Worker not found"}
    assert client.delete("/api/runtime/workers/nobody").status_code == 404


def test_remove_worker(client):
    register_worker(client, "w1")
    response = client.delete("/api/runtime/workers/w1")
    assert response.status_code == 200
    assert response.get_json() == {"removed": True, "id": "w1"}
    assert client.get("/api/runtime/workers/w1").status_code == 404
    assert audit_actions(client)[0] == "worker_removed"


def test_worker_list_pages_with_limit_and_offset(client):
    for index in range(5):
        register_worker(client, f"w{index}")
    first = client.get("/api/runtime/workers?limit=2").get_json()
    rest = client.get("/api/runtime/workers?limit=10&offset=2").get_json()
    assert len(first) == 2 and len(rest) == 3
    assert {w["id"] for w in first + rest} == {f"w{i}" for i in range(5)}
    assert client.get("/api/runtime/workers?limit=0").status_code == 400
    assert client.get("/api/runtime/workers?limit=1001").status_code == 400
    assert client.get("/api/runtime/workers?offset=-1").status_code == 400
    assert client.get("/api/runtime/workers?limit=abc").status_code == 400
