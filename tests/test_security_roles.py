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
from .fake_membridge import ADMIN_KEY
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
    agent = {"name": "agent-1", "capabilities": {"max_concurrency": 2}}  # a pull worker: it claims
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
    # An agent that registered itself with the workers' key waits for an operator.
    approved = requests.post(served.url("/api/runtime/workers/agent-1/approve"), headers=AS_OPERATOR, timeout=10)
    assert approved.status_code == 200 and approved.json()["approved"] is True
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
        ("POST", "/api/runtime/workers/<worker_id:worker_id>/release"),
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


def test_a_lease_given_out_with_its_id_is_touched_only_by_callers_that_name_it(split_app):
    """A claimed lease (the pull client has its id) and a dispatched one (the delivery URL
    carries it): a heartbeat or completion that does not name it changes nothing, whoever
    sends it; the holder's, naming it, works. (Before: the workers' key completed a task
    out on a fenced delivery with its own output.)"""
    client = split_app.test_client()
    leases = services(split_app).leases
    assert client.post("/api/runtime/workers", json={"name": "puller"}, headers=AS_WORKER).status_code == 201
    agent = {"name": "pushed", "url": "http://127.0.0.1:9", "capabilities": {"max_concurrency": 2}}
    assert client.post("/api/runtime/workers", json=agent, headers=AS_OPERATOR).status_code == 201
    claimed_task = client.post("/api/runtime/llm-tasks", json=TASK, headers=AS_OPERATOR).get_json()
    claim = client.post("/api/runtime/workers/puller/claim", json={}, headers=AS_WORKER).get_json()
    assert claim["task"]["id"] == claimed_task["id"]
    pushed_task = client.post("/api/runtime/llm-tasks", json=TASK, headers=AS_OPERATOR).get_json()
    delivery = leases.grant_lease(pushed_task["id"], worker_id="pushed", ttl_seconds=None, push_only=True)
    for task_id, lease_id in [(claimed_task["id"], claim["lease"]["id"]), (pushed_task["id"], delivery["lease"]["id"])]:
        for headers in (AS_WORKER, AS_OPERATOR):
            stolen = client.post(f"/api/runtime/llm-tasks/{task_id}/complete", json={**DONE, "output": "STOLEN"},
                                 headers=headers)
            assert stolen.status_code == 409 and "lease_id" in stolen.get_json()["error"]
            beat = client.post(f"/api/runtime/llm-tasks/{task_id}/heartbeat", json={}, headers=headers)
            assert beat.status_code == 409
        assert client.get(f"/api/runtime/llm-tasks/{task_id}", headers=AS_OPERATOR).get_json()["status"] == "leased"
        fence = {"lease_id": lease_id}
        assert client.post(f"/api/runtime/llm-tasks/{task_id}/heartbeat", json=fence, headers=AS_WORKER).status_code == 200
        done = client.post(f"/api/runtime/llm-tasks/{task_id}/complete", json={**DONE, **fence}, headers=AS_WORKER)
        assert done.status_code == 200 and done.get_json()["task"]["status"] == "completed"
    # A lease taken through the lease route (the Express API's) keeps its optional fencing.
    plain = client.post("/api/runtime/llm-tasks", json=TASK, headers=AS_OPERATOR).get_json()
    assert client.post(f"/api/runtime/llm-tasks/{plain['id']}/lease", json={"worker_id": "puller"},
                       headers=AS_OPERATOR).status_code == 201
    assert client.post(f"/api/runtime/llm-tasks/{plain['id']}/complete", json=DONE, headers=AS_WORKER).status_code == 200


def test_a_worker_heartbeat_naming_no_lease_renews_none(split_app):
    """A dead worker's lease was kept alive for ever by anyone sending `{}` heartbeats in
    its name; now only a heartbeat that names a lease renews it."""
    client = split_app.test_client()
    assert client.post("/api/runtime/workers", json={"name": "victim"}, headers=AS_WORKER).status_code == 201
    client.post("/api/runtime/llm-tasks", json=TASK, headers=AS_OPERATOR)
    claim = client.post("/api/runtime/workers/victim/claim", json={"ttl_seconds": 60}, headers=AS_WORKER).get_json()
    beat = client.post("/api/runtime/workers/victim/heartbeat", json={}, headers=AS_WORKER)
    assert beat.status_code == 200 and beat.get_json() == {"renewed": [], "lost": []}
    named = client.post("/api/runtime/workers/victim/heartbeat", json={"lease_ids": [claim["lease"]["id"]]},
                        headers=AS_WORKER).get_json()
    assert [lease["lease_id"] for lease in named["renewed"]] == [claim["lease"]["id"]]


def test_the_workers_key_cannot_change_a_push_workers_status_or_capacity(split_app):
    client = split_app.test_client()
    agent = {"name": "agent-1", "url": "http://127.0.0.1:8001", "capabilities": {"max_concurrency": 1}}
    assert client.post("/api/runtime/workers", json=agent, headers=AS_OPERATOR).status_code == 201
    again = client.post("/api/runtime/workers", headers=AS_WORKER, json={
        "name": "agent-1", "status": "offline", "agent_version": "0.4.1",
        "capabilities": {"max_concurrency": 32, "claude_cli": False, "labels": ["gpu"]}})
    assert again.status_code == 200
    worker = client.get("/api/runtime/workers/agent-1", headers=AS_OPERATOR).get_json()
    assert worker["status"] == "online" and worker["capabilities"]["max_concurrency"] == 1
    assert worker["capabilities"]["labels"] == []
    # What the agent says of itself is taken: its version, and that it has no CLI.
    assert worker["capabilities"]["claude_cli"] is False and worker["agent_version"] == "0.4.1"
    # A pull worker's own registration (no url) still sets its status and capacity.
    client.post("/api/runtime/workers", json={"name": "puller"}, headers=AS_WORKER)
    again = client.post("/api/runtime/workers", headers=AS_WORKER,
                        json={"name": "puller", "capabilities": {"max_concurrency": 4}}).get_json()
    assert again["capabilities"]["max_concurrency"] == 4


def test_an_agent_the_workers_key_registered_is_sent_nothing_until_it_is_vouched_for(fleet_server, agents, membridge):
    """The workers' key registered a url of its choosing (inside BLOOM_AGENT_NETWORKS) and
    the next tasks went there with the agent key. Now such a worker waits: no probe, no
    task, no key, and no answer that tells whether the address is alive, until an operator
    approves it or Membridge lists it with that url."""
    served = fleet_server(RUNTIME_API_KEY=WORKER_KEY, BLOOM_OPERATOR_KEY=OPERATOR_KEY)
    rogue = agents("good-agent", runtime_api_key=WORKER_KEY)
    registered = rogue.register(served.base_url)
    assert registered.status_code == 201 and registered.json()["approved"] is False
    # A control agent an operator registered (without the CLI, so it takes no task): once it
    # has been probed three times, the rogue would have been probed and pushed to by now.
    control = agents("control")
    requests.post(served.url("/api/runtime/workers"), headers=AS_OPERATOR, timeout=10, json={
        "name": "control", "url": control.url, "capabilities": {"claude_cli": False}})
    task = requests.post(served.url("/api/runtime/llm-tasks"), json=TASK, headers=AS_OPERATOR, timeout=10).json()
    wait_until(lambda: sum(path == "/health" for _, path, _ in control.state.seen) >= 3, timeout=20,
               what="three probes of the control agent")
    assert rogue.state.seen == []  # nothing at all: no probe, no delivery, no agent key
    assert requests.get(served.url(f"/api/runtime/llm-tasks/{task['id']}"), headers=AS_OPERATOR,
                        timeout=10).json()["status"] == "queued"
    dispatched = requests.post(served.url(f"/api/runtime/llm-tasks/{task['id']}/dispatch"),
                               json={"worker_id": "good-agent"}, headers=AS_OPERATOR, timeout=10)
    assert dispatched.status_code == 409 and "approval" in dispatched.json()["error"]
    # Its claims say the same whether the address answers or not.
    requests.post(served.url("/api/runtime/workers"), headers=AS_WORKER, timeout=10,
                  json={"name": "dark", "url": "http://127.0.0.1:9"})
    answers = [requests.post(served.url(f"/api/runtime/workers/{name}/claim"), json={}, headers=AS_WORKER, timeout=10)
               for name in ("good-agent", "dark")]
    assert [a.status_code for a in answers] == [409, 409]
    assert answers[0].json()["error"].replace("good-agent", "x") == answers[1].json()["error"].replace("dark", "x")
    assert rogue.state.seen == []
    # Membridge lists the agent with that url: vouched for, it gets the task.
    membridge.state.agents = [{"name": "good-agent", "url": rogue.url, "status": "online"}]
    done = wait_until(
        lambda: (t := requests.get(served.url(f"/api/runtime/llm-tasks/{task['id']}"), headers=AS_OPERATOR,
                                   timeout=10).json())["status"] == "completed" and t,
        timeout=20, what="the vouched-for agent's run")
    assert done["worker_id"] == "good-agent"


def test_every_route_with_each_key_and_without(database_url, membridge):
    """Every rule of the URL map, called with no key, a wrong one, the workers' and the
    operator's: the open routes open to all; the workers' routes to either key; every
    other route to the operator's key alone. (Membridge answers: its proxy routes too.)"""
    from bloom.web.guards import OPEN_PATHS

    split_app = create_app(make_settings(database_url, RUNTIME_API_KEY=WORKER_KEY, BLOOM_OPERATOR_KEY=OPERATOR_KEY,
                                         MEMBRIDGE_SERVER_URL=membridge.url, MEMBRIDGE_ADMIN_KEY=ADMIN_KEY))
    client = split_app.test_client()
    checked = 0
    for rule in split_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<worker_id:worker_id>", "w-1")
        for name in rule.arguments:
            path = path.replace(f"<{name}>", "x-1")
        worker_route = getattr(split_app.view_functions[rule.endpoint], "worker_route", False)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            call = getattr(client, method.lower())
            statuses = {who: call(path, json={}, headers=headers).status_code
                        for who, headers in [("nobody", {}), ("guess", {"X-Runtime-API-Key": "guess"}),
                                             ("worker", AS_WORKER), ("operator", AS_OPERATOR)]}
            if path in OPEN_PATHS or not path.startswith(("/api/runtime/", "/api/membridge/")):
                assert 401 not in statuses.values() and 403 not in statuses.values(), (method, path, statuses)
            else:
                assert statuses["nobody"] == statuses["guess"] == 401, (method, path, statuses)
                assert (statuses["worker"] not in (401, 403)) if worker_route else statuses["worker"] == 403, \
                    (method, path, statuses)
                assert statuses["operator"] not in (401, 403), (method, path, statuses)
            checked += 1
    services(split_app).database.dispose()
    assert checked > 40
