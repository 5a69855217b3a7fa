"""What any client sees: health, readiness, JSON errors for bad paths, methods and bodies."""
from __future__ import annotations

import json

from bloom import create_app

from .conftest import make_settings


def test_health_reports_the_service_and_postgresql_storage(client):
    response = client.get("/api/runtime/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["service"] == "bloom-runtime"
    assert body["storage"] == "postgresql"
    assert body["uptime"] >= 0
    assert set(body["membridge"]) == {"consecutiveFailures", "lastSuccess", "lastError", "connected"}


def test_ready_when_the_database_answers(client):
    response = client.get("/api/runtime/ready")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ready"}


def test_ready_is_503_json_when_the_database_is_unreachable():
    unreachable = "postgresql://nobody@127.0.0.1:1/none"
    app = create_app(make_settings(unreachable))
    response = app.test_client().get("/api/runtime/ready")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "error": "database unreachable"}
    tasks = app.test_client().get("/api/runtime/llm-tasks")
    assert tasks.status_code == 503
    assert tasks.get_json() == {"error": "Database unavailable"}


def test_unknown_path_and_wrong_method_are_json(client):
    missing = client.get("/api/runtime/nothing-here")
    assert missing.status_code == 404
    assert missing.get_json() == {"error": "Not found"}
    wrong = client.put("/api/runtime/stats")
    assert wrong.status_code == 405
    assert wrong.get_json() == {"error": "Method not allowed"}


def test_malformed_json_is_a_400_and_creates_nothing(client):
    response = client.post("/api/runtime/llm-tasks", data="{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {"error": "Malformed JSON body"}
    assert client.get("/api/runtime/llm-tasks").get_json() == []


def test_a_body_that_is_not_an_object_is_a_form_error(client):
    response = client.post("/api/runtime/llm-tasks", json=["a", "b"])
    assert response.status_code == 400
    assert response.get_json() == {"error": {"formErrors": ["Expected an object"], "fieldErrors": {}}}


def test_oversized_body_is_413(database_url):
    app = create_app(make_settings(database_url, BLOOM_MAX_BODY_BYTES="1024"))
    client = app.test_client()
    prompt = "x" * 2048
    response = client.post("/api/runtime/llm-tasks", json={"context_id": "c", "agent_slug": "a", "prompt": prompt})
    assert response.status_code == 413
    assert response.get_json() == {"error": "Request body too large"}
    assert client.get("/api/runtime/llm-tasks").get_json() == []


def test_several_mib_bodies_pass_the_default_limit(client):
    prompt = "é" * (3 * 1024 * 1024)  # 6 MiB of UTF-8
    body = json.dumps({"context_id": "c", "agent_slug": "a", "prompt": prompt}, ensure_ascii=False)
    response = client.post("/api/runtime/llm-tasks", data=body.encode(), content_type="application/json")
    assert response.status_code == 201
    assert client.get(f"/api/runtime/llm-tasks/{response.get_json()['id']}").get_json()["prompt"] == prompt


def test_api_key_guards_runtime_routes_but_not_health(database_url):
    app = create_app(make_settings(database_url, RUNTIME_API_KEY="s3cret-key"))
    client = app.test_client()
    assert client.get("/api/runtime/health").status_code == 200
    assert client.get("/api/runtime/ready").status_code == 200
    denied = client.get("/api/runtime/llm-tasks")
    assert denied.status_code == 401
    assert denied.get_json() == {"error": "Unauthorized"}
    assert client.get("/api/runtime/llm-tasks", headers={"X-Runtime-API-Key": "wrong"}).status_code == 401
    allowed = client.get("/api/runtime/llm-tasks", headers={"X-Runtime-API-Key": "s3cret-key"})
    assert allowed.status_code == 200
    assert b"s3cret-key" not in denied.data + allowed.data


def test_rate_limit_answers_429_json_after_the_configured_count(database_url):
    app = create_app(make_settings(database_url, BLOOM_RATE_LIMIT="5 per minute"))
    client = app.test_client()
    statuses = [client.get("/api/runtime/stats").status_code for _ in range(5)]
    assert statuses == [200] * 5
    # One counter is shared by every API route of a client address.
    limited = client.get("/api/runtime/llm-tasks")
    assert limited.status_code == 429
    assert limited.get_json() == {"error": "Too many requests, please try again later"}
    assert "Retry-After" in limited.headers
    # Monitoring is never throttled.
    assert client.get("/api/runtime/health").status_code == 200
    assert client.get("/api/runtime/ready").status_code == 200
