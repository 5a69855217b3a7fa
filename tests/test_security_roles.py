"""Who may receive the agent key and the prompts: an operator key apart from the workers'
key, and agent urls only inside BLOOM_AGENT_NETWORKS."""
from __future__ import annotations

import pytest
import requests

from bloom import create_app
from bloom.agents.client import AgentClient, AgentNetworks, AgentUnreachable
from bloom.services import services
from bloom.settings import Settings

from .conftest import make_settings
from .helpers import TASK
from .support import wait_until

WORKER_KEY = "worker-key-0123456789"
OPERATOR_KEY = "operator-key-9876543210"
AS_WORKER = {"X-Runtime-API-Key": WORKER_KEY}
AS_OPERATOR = {"X-Runtime-API-Key": OPERATOR_KEY}
DONE = {"status": "success", "output": "ok", "error_message": None, "metrics": {"duration_ms": 5}}


@pytest.fixture
def split_app(database_url):
    app = create_app(make_settings(database_url, RUNTIME_API_KEY=WORKER_KEY, BLOOM_OPERATOR_KEY=OPERATOR_KEY))
    yield app
    services(app).database.dispose()


def test_the_workers_key_does_a_workers_work_and_nothing_else(split_app):
    client = split_app.test_client()
    agent = {"name": "agent-1", "url": "http://127.0.0.1:8001", "capabilities": {"max_concurrency": 2}}
    assert client.post("/api/runtime/workers", json=agent, headers=AS_WORKER).status_code == 201
    task = client.post("/api/runtime/llm-tasks", json=TASK, headers=AS_OPERATOR).get_json()
    claimed = client.post("/api/runtime/workers/agent-1/claim", json={}, headers=AS_WORKER).get_json()
    assert claimed["task"]["id"] == task["id"]
    fence = {"lease_id": claimed["lease"]["id"]}
    assert client.post(f"/api/runtime/llm-tasks/{task['id']}/heartbeat", json=fence, headers=AS_WORKER).status_code == 200
    assert client.post("/api/runtime/workers/agent-1/heartbeat", json={}, headers=AS_WORKER).status_code == 200
    assert client.post(f"/api/runtime/llm-tasks/{task['id']}/complete", json={**DONE, **fence},
                       headers=AS_WORKER).status_code == 200

    for method, path, body in [
        ("get", "/api/runtime/llm-tasks", None),  # other callers' prompts
        ("post", "/api/runtime/llm-tasks", TASK),
        ("get", f"/api/runtime/llm-tasks/{task['id']}", None),
        ("get", "/api/runtime/artifacts", None),
        ("delete", "/api/runtime/workers/agent-1", None),
        ("post", "/api/runtime/config", {"membridge_server_url": "http://evil:1", "admin_key": "x"}),
        ("get", "/api/runtime/audit", None),
        ("get", "/api/membridge/projects", None),
    ]:
        response = getattr(client, method)(path, json=body, headers=AS_WORKER)
        assert response.status_code == 403, (path, response.get_json())
        assert response.get_json() == {"error": "Forbidden: this route needs the operator key"}
    for headers in ({}, {"X-Runtime-API-Key": "guess"}):
        assert client.get("/api/runtime/llm-tasks", headers=headers).status_code == 401
    assert client.get("/api/runtime/llm-tasks", headers=AS_OPERATOR).status_code == 200
    assert client.get("/api/runtime/health").status_code == 200


def test_only_an_operator_points_an_existing_worker_at_another_url(split_app):
    client = split_app.test_client()
    agent = {"name": "agent-1", "url": "http://127.0.0.1:8001"}
    assert client.post("/api/runtime/workers", json=agent, headers=AS_WORKER).status_code == 201
    again = client.post("/api/runtime/workers", json={**agent, "url": "http://127.0.0.1:8001/"}, headers=AS_WORKER)
    assert again.status_code == 200  # the agent registering again, as it was
    moved = client.post("/api/runtime/workers", json={**agent, "url": "http://10.6.6.6:8001"}, headers=AS_WORKER)
    assert moved.status_code == 403 and "operator" in moved.get_json()["error"]
    current = client.get("/api/runtime/workers/agent-1", headers=AS_OPERATOR).get_json()
    assert current["url"] == "http://127.0.0.1:8001/"
    by_operator = client.post("/api/runtime/workers", json={**agent, "url": "http://10.6.6.6:8001"},
                              headers=AS_OPERATOR)
    assert by_operator.status_code == 200 and by_operator.get_json()["url"] == "http://10.6.6.6:8001"


def test_one_key_alone_opens_everything_as_before(database_url):
    app = create_app(make_settings(database_url, RUNTIME_API_KEY=WORKER_KEY))
    try:
        client = app.test_client()
        client.post("/api/runtime/workers", json={"name": "w", "url": "http://127.0.0.1:8001"}, headers=AS_WORKER)
        moved = client.post("/api/runtime/workers", json={"name": "w", "url": "http://127.0.0.1:8002"},
                            headers=AS_WORKER)
        assert moved.status_code == 200 and moved.get_json()["url"] == "http://127.0.0.1:8002"
        assert client.get("/api/runtime/llm-tasks", headers=AS_WORKER).status_code == 200
    finally:
        services(app).database.dispose()


@pytest.mark.parametrize("url", ["http://8.8.8.8:8001", "http://169.254.169.254/latest", "http://[2001:db8::1]:80"])
def test_an_agent_url_outside_the_agent_networks_is_refused(client, url):
    response = client.post("/api/runtime/workers", json={"name": "far", "url": url})
    assert response.status_code == 400 and "BLOOM_AGENT_NETWORKS" in response.get_json()["error"]["fieldErrors"]["url"][0]
    assert client.get("/api/runtime/workers").get_json() == []
    inside = client.post("/api/runtime/workers", json={"name": "near", "url": "http://10.1.2.3:8001"})
    assert inside.status_code == 201


def test_an_address_outside_the_networks_is_never_called(agents):
    agent = agents("local")  # listens on 127.0.0.1
    elsewhere_only = AgentClient("agent-secret", AgentNetworks(Settings.from_env(
        {"BLOOM_AGENT_NETWORKS": "10.0.0.0/8"}).agent_networks))
    assert elsewhere_only.probe(agent.url) is False
    with pytest.raises(AgentUnreachable, match="not allowed"):
        elsewhere_only.send_task(agent.url, {"task_id": "t", "prompt": "secret prompt"}, answer_timeout_s=5)
    named = agent.url.replace("127.0.0.1", "localhost")  # a name is checked by what it resolves to
    with pytest.raises(AgentUnreachable, match="not allowed"):
        elsewhere_only.send_task(named, {"task_id": "t", "prompt": "secret prompt"}, answer_timeout_s=5)
    assert agent.state.deliveries == []
    allowed = AgentClient("agent-secret", AgentNetworks(Settings.from_env({}).agent_networks))
    assert allowed.probe(named) is True


def test_a_real_agent_keeps_working_with_the_documented_keys(fleet_server, agents):
    served = fleet_server(RUNTIME_API_KEY=WORKER_KEY, BLOOM_OPERATOR_KEY=OPERATOR_KEY)
    agent = agents("agent-1", runtime_api_key=WORKER_KEY)  # sends the runtime key, as the real agent
    assert agent.register(served.base_url).status_code == 201
    task = requests.post(served.url("/api/runtime/llm-tasks"), json=TASK, headers=AS_OPERATOR, timeout=10).json()
    done = wait_until(
        lambda: (t := requests.get(served.url(f"/api/runtime/llm-tasks/{task['id']}"), headers=AS_OPERATOR,
                                   timeout=10).json())["status"] == "completed" and t,
        timeout=15, what="the agent's run")
    assert done["worker_id"] == "agent-1"
    assert [status for _, _, status in agent.state.callbacks] == [200, 200]
    assert OPERATOR_KEY not in served.log() and WORKER_KEY not in served.log()


def test_the_workers_key_opens_exactly_the_routes_marked_for_workers(split_app):
    """Who may call a route is said on the route (@worker_route); this list makes any
    change to it a visible one. Every other route answers the workers' key 403."""
    marked = sorted(
        (method, rule.rule) for rule in split_app.url_map.iter_rules()
        if getattr(split_app.view_functions[rule.endpoint], "worker_route", False)
        for method in rule.methods - {"HEAD", "OPTIONS"}
    )
    assert marked == [
        ("POST", "/api/runtime/deliveries/<lease_id>/api/runtime/llm-tasks/<task_id>/complete"),
        ("POST", "/api/runtime/deliveries/<lease_id>/api/runtime/llm-tasks/<task_id>/heartbeat"),
        ("POST", "/api/runtime/llm-tasks/<task_id>/complete"),
        ("POST", "/api/runtime/llm-tasks/<task_id>/heartbeat"),
        ("POST", "/api/runtime/workers"),
        ("POST", "/api/runtime/workers/<worker_id:worker_id>/claim"),
        ("POST", "/api/runtime/workers/<worker_id:worker_id>/heartbeat"),
    ]
    client = split_app.test_client()
    assert client.get("/api/runtime/llm-tasks", headers=AS_WORKER).status_code == 403
    assert client.delete("/api/runtime/workers/w1", headers=AS_WORKER).status_code == 403


def test_with_only_an_operator_key_every_route_needs_it(database_url):
    """Only BLOOM_OPERATOR_KEY set: the workers' routes were open to anyone (a registration
    with a url, then pushes to it); now nothing but the health routes opens without it."""
    app = create_app(make_settings(database_url, BLOOM_OPERATOR_KEY=OPERATOR_KEY))
    client = app.test_client()
    try:
        agent = {"name": "agent-1", "url": "http://127.0.0.1:8001"}
        for method, path, body in [("post", "/api/runtime/workers", agent), ("post", "/api/runtime/workers/x/claim", {}),
                                   ("post", "/api/runtime/workers/x/heartbeat", {}),
                                   ("post", "/api/runtime/llm-tasks/t/complete", DONE),
                                   ("post", "/api/runtime/llm-tasks/t/heartbeat", {})]:
            for headers in ({}, AS_WORKER):
                assert getattr(client, method)(path, json=body, headers=headers).status_code == 401, (path, headers)
        assert client.post("/api/runtime/workers", json=agent, headers=AS_OPERATOR).status_code == 201
        assert client.get("/api/runtime/health").status_code == 200
    finally:
        services(app).database.dispose()
