"""Operations on a worker's agent, as the web client's Nodes page makes them: health,
update, restart, uninstall; against stand-in agents over real sockets."""
from __future__ import annotations

import pytest

from bloom import create_app
from bloom.services import services

from .conftest import make_settings
from .fake_agent import AGENT_KEY
from .helpers import audit_actions, create_task, lease


@pytest.fixture
def app(database_url):
    app = create_app(make_settings(database_url, MEMBRIDGE_AGENT_KEY=AGENT_KEY))
    yield app
    services(app).database.dispose()


def _register(client, agent, name=None):
    body = {"name": name or agent.name, "url": agent.url, "status": "unknown"}  # as the Nodes page does
    assert client.post("/api/runtime/workers", json=body).status_code == 201


def test_agent_health_reads_the_agent_and_updates_the_worker(client, agents):
    agent = agents("rpi4b")
    _register(client, agent)
    answer = client.get("/api/runtime/workers/rpi4b/agent-health")
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["reachable"] is True and body["version"] == "0.4.2" and body["hostname"] == "rpi4b-host"
    worker = client.get("/api/runtime/workers/rpi4b").get_json()
    assert (worker["status"], worker["agent_version"], worker["os_info"]) == ("online", "0.4.2", "rpi4b-host")
    assert worker["capabilities"]["max_concurrency"] == 2 and worker["ip_addrs"] == ["127.0.0.1"]

    agent.kill()
    silent = client.get("/api/runtime/workers/rpi4b/agent-health")
    assert silent.status_code == 200
    assert silent.get_json()["reachable"] is False and silent.get_json()["error"]
    assert client.get("/api/runtime/workers/rpi4b").get_json()["status"] == "offline"


def test_update_restart_and_uninstall_reach_the_agent_with_its_key(client, agents):
    agent = agents("rack/1")  # an id with '/' reaches every operation
    _register(client, agent)
    path = "/api/runtime/workers/rack%2F1"
    updated = client.post(f"{path}/agent-update", json={"repo_url": "https://example.org/membridge.git",
                                                         "branch": "main"})
    assert updated.status_code == 200
    assert updated.get_json()["status"] == "updated" and updated.get_json()["version"] == "0.5.0"
    assert client.get(path).get_json()["agent_version"] == "0.5.0"
    assert client.post(f"{path}/agent-restart", json={}).get_json()["status"] == "restarted"

    task = create_task(client)
    client.post("/api/runtime/workers", json={"name": "rack/1", "status": "online"})
    assert lease(client, task["id"], worker_id="rack/1").status_code == 201
    uninstalled = client.post(f"{path}/agent-uninstall", json={})
    assert uninstalled.status_code == 200 and uninstalled.get_json()["status"] == "uninstalled"
    worker = client.get(path).get_json()
    assert (worker["status"], worker["agent_version"], worker["active_leases"]) == ("offline", "uninstalled", 0)
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "queued"

    assert [op[0] for op in agent.state.operations] == ["/self-update", "/restart", "/uninstall"]
    assert agent.state.operations[0][1] == {"repo_url": "https://example.org/membridge.git", "branch": "main"}
    actions = audit_actions(client)
    assert {"agent_updated", "agent_restarted", "agent_uninstalled"} <= set(actions)


def test_operations_say_clearly_what_went_wrong(client, agents, caplog):
    assert client.get("/api/runtime/workers/nobody/agent-health").get_json() == {"error": "Worker not found"}
    client.post("/api/runtime/workers", json={"name": "pull-only"})
    no_url = client.post("/api/runtime/workers/pull-only/agent-restart", json={})
    assert (no_url.status_code, no_url.get_json()) == (400, {"error": "Worker has no URL configured"})
    failing = agents("failing")
    failing.state.operations_fail = True
    _register(client, failing)
    refused = client.post("/api/runtime/workers/failing/agent-update", json={})
    assert refused.status_code == 502
    error = refused.get_json()["error"]
    assert error.startswith("agent answered 500: operation failed") and len(error) < 200
    bad = client.post("/api/runtime/workers/failing/agent-update", json={"repo_url": "file:///etc", "branch": "a b"})
    assert bad.status_code == 400 and set(bad.get_json()["error"]["fieldErrors"]) == {"repo_url", "branch"}
    assert AGENT_KEY not in caplog.text and AGENT_KEY not in refused.get_data(as_text=True)
