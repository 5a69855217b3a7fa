"""Membridge integration against a real HTTP stand-in: proxy, retries, config, test-connection."""
from __future__ import annotations

import logging
import time
from urllib.parse import quote

import pytest

from bloom import create_app

from .conftest import make_settings
from .fake_membridge import ADMIN_KEY


@pytest.fixture
def app(membridge_app):
    return membridge_app


def health_of_membridge(client):
    return client.get("/api/runtime/health").get_json()["membridge"]


def test_proxy_forwards_the_admin_key_and_never_returns_it(client, membridge, caplog):
    caplog.set_level(logging.DEBUG)
    response = client.get("/api/membridge/projects")
    assert response.status_code == 200
    assert response.get_json()[0]["canonical_id"] == "cid-1"
    sent = membridge.state.requests_to("/projects")
    assert [r.headers.get("X-MEMBRIDGE-ADMIN") for r in sent] == [ADMIN_KEY]
    assert ADMIN_KEY not in response.get_data(as_text=True)
    assert ADMIN_KEY not in caplog.text
    for path in ("/api/membridge/health", "/api/membridge/projects/cid-1/nodes", "/api/membridge/projects/cid-1/leadership"):
        assert client.get(path).status_code == 200, path


def test_upstream_errors_pass_through_as_json_and_a_refused_key_is_502(client, database_url, membridge):
    wrong_key = create_app(make_settings(database_url, MEMBRIDGE_SERVER_URL=membridge.url, MEMBRIDGE_ADMIN_KEY="nope"))
    refused = wrong_key.test_client().get("/api/membridge/projects")
    # Not 401: the caller's own runtime key was fine; it is Membridge that refused ours.
    assert (refused.status_code, refused.get_json()) == (
        502, {"error": "Membridge refused the admin key", "detail": "invalid admin key"}
    )
    missing = client.post("/api/membridge/projects/cid-1/leadership/select", json={})
    assert missing.status_code == 422
    assert missing.get_json() == {
        "error": "body.primary_node_id: Field required",
        "detail": [{"type": "missing", "loc": ["body", "primary_node_id"], "msg": "Field required", "input": {}}],
    }


def test_an_upstream_started_without_its_admin_key_is_a_readable_500(client, membridge):
    membridge.state.admin_key = None
    response = client.get("/api/membridge/projects")
    assert (response.status_code, response.get_json()) == (
        500, {"error": "MEMBRIDGE_ADMIN_KEY not configured on server", "detail": "MEMBRIDGE_ADMIN_KEY not configured on server"}
    )


def test_an_unknown_project_is_empty_data_as_upstream_says(client, membridge):
    assert client.get("/api/membridge/projects/nope/nodes").get_json() == []
    assert client.get("/api/membridge/projects/nope/leadership").get_json()["preferred_primary"] is None


def test_test_connection_uses_the_admin_key_and_config_agrees_with_health(client, membridge):
    assert client.post("/api/runtime/test-connection").get_json()["connected"] is True
    assert client.get("/api/runtime/config").get_json()["connected"] is True
    assert health_of_membridge(client)["connected"] is True
    client.post("/api/runtime/config", json={"membridge_server_url": membridge.url, "admin_key": "wrong-key-123"})
    # Changed: no longer known to be connected, before any test.
    assert client.get("/api/runtime/config").get_json()["connected"] is False
    failed = client.post("/api/runtime/test-connection").get_json()
    assert failed == {"connected": False, "error": "Membridge refused the admin key"}
    assert client.get("/api/runtime/config").get_json()["connected"] is False
    assert health_of_membridge(client)["connected"] is False
    client.post("/api/runtime/config", json={"membridge_server_url": membridge.url, "admin_key": ADMIN_KEY})
    assert client.get("/api/membridge/projects").status_code == 200  # any upstream success counts
    assert client.get("/api/runtime/config").get_json()["connected"] is True
    assert health_of_membridge(client)["connected"] is True


def test_a_get_is_retried_three_times_with_backoff_on_5xx(client, membridge):
    membridge.state.mode = "fail5xx"
    started = time.monotonic()
    response = client.get("/api/membridge/projects")
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert response.get_json() == {"error": "control plane overloaded", "detail": "control plane overloaded"}
    assert membridge.state.count("GET", "/projects") == 4
    assert elapsed >= 0.5 + 1.0 + 2.0  # backoff from 0.5 s, doubling


def test_a_get_is_retried_when_the_connection_drops_then_502(client, membridge):
    membridge.state.mode = "drop"
    response = client.get("/api/membridge/projects")
    assert response.status_code == 502
    assert "unreachable" in response.get_json()["error"]
    assert membridge.state.count("GET", "/projects") == 4


@pytest.mark.parametrize("mode, status", [("fail5xx", 503), ("drop", 502)])
def test_a_post_that_reached_the_server_is_never_repeated(client, membridge, mode, status):
    membridge.state.mode = mode
    response = client.post("/api/membridge/projects/cid-1/leadership/select", json={"primary_node_id": "node-a"})
    assert response.status_code == status
    assert membridge.state.count("POST", "/projects/cid-1/leadership/select") == 1
    assert "leadership_promote" not in [e["action"] for e in client.get("/api/runtime/audit").get_json()]


def test_leadership_select_passes_the_body_and_is_audited(client, membridge):
    body = {"primary_node_id": "node-b", "lease_seconds": 45}
    response = client.post("/api/membridge/projects/cid-1/leadership/select", json=body)
    assert response.status_code == 200
    assert response.get_json()["primary_node_id"] == "node-b"
    assert membridge.state.requests_to("/projects/cid-1/leadership/select")[0].body == body
    entry = client.get("/api/runtime/audit").get_json()[0]
    assert (entry["action"], entry["entity_id"], entry["detail"]) == ("leadership_promote", "cid-1", {"primary_node_id": "node-b"})


@pytest.mark.parametrize("cid", ["..", "../agents", "x?y=1", "x#frag", "a/../../agents", "%2e%2e", "100%"])
def test_path_tricks_in_the_project_id_stay_inside_one_segment(client, membridge, cid):
    response = client.get(f"/api/membridge/projects/{quote(cid, safe='')}/nodes")
    received = [r.path for r in membridge.state.received]
    if response.status_code == 404 and not received:
        return  # the route itself refused it (an encoded '/' splits the path): nothing went upstream
    assert len(received) == 1
    path = received[0]
    assert path.startswith("/projects/") and path.endswith("/nodes")
    segment = path[len("/projects/"):-len("/nodes")]
    assert "/" not in segment and "?" not in segment and "#" not in segment
    assert segment not in (".", "..")
    assert response.status_code == 200  # an unknown project: upstream's empty data


def test_unreachable_upstream_is_502_and_health_counts_failures_then_recovers(client, membridge):
    assert client.get("/api/membridge/projects").status_code == 200
    assert health_of_membridge(client)["connected"] is True
    membridge.stop()
    assert client.get("/api/membridge/projects").status_code == 502
    assert client.get("/api/membridge/projects").status_code == 502
    down = health_of_membridge(client)
    assert down["connected"] is False
    assert down["consecutiveFailures"] == 2
    assert "unreachable" in down["lastError"]
    membridge.start()
    assert client.get("/api/membridge/projects").status_code == 200
    up = health_of_membridge(client)
    assert (up["connected"], up["consecutiveFailures"]) == (True, 0)
    assert up["lastSuccess"] > 1_600_000_000_000


# Config and connection test ---------------------------------------------------------


def test_config_shows_the_env_defaults_with_a_masked_key(client, membridge):
    config = client.get("/api/runtime/config").get_json()
    assert config == {
        "membridge_server_url": membridge.url,
        "admin_key_masked": "memb****-key",
        "connected": False,
        "last_test": None,
    }


@pytest.mark.parametrize(
    "body, field",
    [
        ({"admin_key": "k"}, "membridge_server_url"),
        ({"membridge_server_url": "not a url", "admin_key": "k"}, "membridge_server_url"),
        ({"membridge_server_url": "ftp://host", "admin_key": "k"}, "membridge_server_url"),
        ({"membridge_server_url": "http://host:8000"}, "admin_key"),
        ({"membridge_server_url": "http://host:8000", "admin_key": ""}, "admin_key"),
    ],
)
def test_invalid_config_is_400_and_changes_nothing(client, membridge, body, field):
    response = client.post("/api/runtime/config", json=body)
    assert response.status_code == 400
    assert field in response.get_json()["error"]["fieldErrors"]
    assert client.get("/api/runtime/config").get_json()["membridge_server_url"] == membridge.url


def test_config_change_is_persisted_masked_audited_and_seen_by_other_processes(app, client, database_url, membridge):
    other_process = create_app(make_settings(database_url, MEMBRIDGE_SERVER_URL="http://127.0.0.1:9", MEMBRIDGE_ADMIN_KEY="x"))
    other_process.test_client().get("/api/runtime/config")  # warms its cache with the old values
    response = client.post("/api/runtime/config", json={"membridge_server_url": membridge.url, "admin_key": "short"})
    assert response.status_code == 200
    assert response.get_json()["admin_key_masked"] == "****"
    time.sleep(2.1)  # the read-through cache lives at most two seconds
    seen = other_process.test_client().get("/api/runtime/config").get_json()
    assert seen["membridge_server_url"] == membridge.url and seen["admin_key_masked"] == "****"
    # The other process now uses the new key upstream: the fake accepts only its own.
    assert other_process.test_client().get("/api/membridge/projects").status_code == 502
    entry = client.get("/api/runtime/audit").get_json()[0]
    assert entry["action"] == "config_updated"
    assert "short" not in str(entry)


def test_test_connection_reports_and_records_the_outcome(client, membridge):
    response = client.post("/api/runtime/test-connection")
    assert response.status_code == 200
    assert response.get_json() == {
        "connected": True,
        "health": {"status": "ok", "service": "membridge-control-plane", "version": "0.9.1"},
    }
    config = client.get("/api/runtime/config").get_json()
    assert config["connected"] is True and config["last_test"] > 1_600_000_000_000
    assert client.get("/api/runtime/audit").get_json()[0]["action"] == "connection_test"
    membridge.stop()
    failed = client.post("/api/runtime/test-connection").get_json()
    assert failed["connected"] is False and "unreachable" in failed["error"]
    time.sleep(2.1)
    assert client.get("/api/runtime/config").get_json()["connected"] is False


def test_test_connection_is_open_and_has_its_own_stricter_limit(database_url, membridge):
    app = create_app(make_settings(
        database_url, MEMBRIDGE_SERVER_URL=membridge.url, RUNTIME_API_KEY="runtime-key",
        BLOOM_TEST_CONNECTION_RATE_LIMIT="2 per minute",
    ))
    client = app.test_client()
    assert client.get("/api/membridge/projects").status_code == 401  # the proxy needs the runtime key
    assert [client.post("/api/runtime/test-connection").status_code for _ in range(3)] == [200, 200, 429]
