"""The Membridge fleet end to end: agents that take work only when it is pushed to them,
call back as the real agent does, and die; a control plane that lists dead agents as
'online'. Everything over real sockets: gunicorn, PostgreSQL, stand-in agents and
control plane (tests/fake_agent.py, tests/fake_membridge.py)."""
from __future__ import annotations

import http.client
import time
from collections import Counter
from urllib.parse import quote

import pytest
import requests

from .helpers import actions, api, create_task, new_task, results_of, task_of, worker_of
from .support import free_port, wait_until

# Callbacks as the agent sends them -------------------------------------------------------


def test_the_agents_registration_and_callbacks_are_accepted_as_it_sends_them(client):
    registered = client.post("/api/runtime/workers", json={
        "name": "agent-1", "url": "http://127.0.0.1:9", "status": "online",
        "capabilities": {"claude_cli": True, "max_concurrency": 2, "labels": []}, "ip_addrs": ["127.0.0.1"],
        "agent_version": "0.4.2", "os_info": {"system": "Linux", "release": "6.1"}, "install_method": "pipx",
    })
    assert registered.status_code == 201
    listed = client.get("/api/runtime/workers").get_json()[0]
    assert (listed["agent_version"], listed["os_info"], listed["install_method"]) == (
        "0.4.2", {"system": "Linux", "release": "6.1"}, "pipx")
    task = create_task(client)
    assert client.post(f"/api/runtime/llm-tasks/{task['id']}/lease", json={"worker_id": "agent-1"}).status_code == 201
    beat = client.post(f"/api/runtime/llm-tasks/{task['id']}/heartbeat")  # no body at all
    assert beat.status_code == 200
    done = client.post(f"/api/runtime/llm-tasks/{task['id']}/complete", json={
        "status": "success", "output": None, "error_message": None,
        "metrics": {"duration_ms": 1234, "tokens_used": None},
    })
    assert done.status_code == 200, done.get_json()
    assert done.get_json()["result"]["metrics"] == {"duration_ms": 1234, "tokens_used": None}
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "completed"


def test_a_registration_with_a_url_that_is_not_http_is_refused(client):
    # ... nor an IPv4 address spelt other than a.b.c.d (refused at every call later; one
    # agent under six spellings escaped the per-host probe limit).
    for url in ("file:///etc/passwd", "ftp://host/x", "not a url", "http://2130706433:8001",
                "http://0x7f000001:8001", "http://127.1:8001", "http://0177.0.0.1:8001"):
        response = client.post("/api/runtime/workers", json={"name": "w", "url": url})
        assert response.status_code == 400 and "url" in response.get_json()["error"]["fieldErrors"], url
    assert client.get("/api/runtime/workers").get_json() == []


# Every worker reachable ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["rack/1", "a%2Fb", "..", "ü-node", "x/claim", "a//b"])
def test_every_worker_id_is_reachable_on_every_route(server, name):
    """Raw requests (http.client): client libraries would 'normalize' `..` away."""
    encoded = quote(name, safe="").replace(".", "%2E")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    def call(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, f"/api/runtime/workers{path}", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()

    import json

    status, _ = call("POST", "", json.dumps({"name": name}).encode())
    assert status in (200, 201)
    status, body = call("GET", f"/{encoded}")
    assert status == 200 and json.loads(body)["id"] == name
    status, _ = call("POST", f"/{encoded}/claim", b"{}")
    assert status == 204  # reached: nothing to claim
    status, body = call("DELETE", f"/{encoded}")
    assert status == 200 and json.loads(body) == {"removed": True, "id": name}
    status, _ = call("GET", f"/{encoded}")
    assert status == 404


# The dispatch route -------------------------------------------------------------------


def test_dispatch_without_a_public_url_is_409(client):
    client.post("/api/runtime/workers", json={"name": "agent", "url": "http://127.0.0.1:9"})
    task = create_task(client)
    response = client.post(f"/api/runtime/llm-tasks/{task['id']}/dispatch", json={})
    assert response.status_code == 409 and "BLOOM_PUBLIC_URL" in response.get_json()["error"]
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "queued"


def test_dispatch_delivers_the_task_to_the_agent_which_runs_and_completes_it(fleet_server, agents):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="600")
    agent = agents("agent-1", run_seconds=0.3)
    assert agent.register(served.base_url).status_code == 201
    task = new_task(served, desired_format="json", policy={"timeout_sec": 30, "budget": 1.5})
    response = requests.post(
        api(served, f"/llm-tasks/{task['id']}/dispatch"), json={},
        headers={"X-Forwarded-Host": "evil.example", "Host": "evil.example"}, timeout=10,
    )
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["dispatched"] is True and answer["worker_id"] == "agent-1" and answer["task_id"] == task["id"]
    lease = requests.get(api(served, "/leases"), timeout=10).json()[0]
    assert lease["id"] == answer["lease_id"] and lease["ttl_seconds"] == 30 + 60  # timeout_sec + 60
    delivered = wait_until(lambda: agent.state.deliveries, timeout=5, what="the delivery")[0]
    assert delivered == {
        "task_id": task["id"], "prompt": task["prompt"], "context_id": task["context_id"],
        "agent_slug": task["agent_slug"], "desired_format": "json", "context_hints": [],
        "policy": {"timeout_sec": 30, "budget": 1.5},
        # From configuration, never from Host or X-Forwarded-Host; naming the delivery's
        # lease, so that the agent's callbacks are fenced by it.
        "runtime_url": f"{served.base_url}/api/runtime/deliveries/{answer['lease_id']}",
    }
    done = wait_until(lambda: (t := task_of(served, task["id"]))["status"] == "completed" and t, timeout=10,
                      what=f"the agent's completion (callbacks so far: {agent.state.callbacks})")
    assert done["attempts"] == 1
    assert agent.state.callbacks == [("heartbeat", task["id"], 200), ("complete", task["id"], 200)]
    assert [a["content"] for a in results_of(served, task["id"])] == [f'{{"result": "agent-1 ran {task["id"]}"}}']
    assert "task_dispatched" in actions(served)


@pytest.mark.parametrize("how", ["unreachable", "no_cli"])
def test_a_refused_dispatch_is_502_requeues_without_spending_an_attempt_and_takes_the_worker_out(
    fleet_server, agents, how
):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="600")
    if how == "unreachable":
        closed = f"http://127.0.0.1:{free_port()}"
        requests.post(api(served, "/workers"), json={"name": "agent-1", "url": closed}, timeout=10)
    else:
        agents("agent-1", mode="no_cli").register(served.base_url)
    task = new_task(served)
    response = requests.post(api(served, f"/llm-tasks/{task['id']}/dispatch"), json={}, timeout=15)
    assert response.status_code == 502
    answer = response.json()
    assert (answer["dispatched"], answer["task_id"], answer["worker_id"]) == (False, task["id"], "agent-1")
    assert answer["error"]
    after = task_of(served, task["id"])
    assert (after["status"], after["attempts"], after["lease_id"], after["worker_id"]) == ("queued", 0, None, None)
    assert [lease["status"] for lease in requests.get(api(served, "/leases"), timeout=10).json()] == ["released"]
    worker = worker_of(served, "agent-1")
    if how == "unreachable":
        assert worker["status"] == "offline"
    else:
        assert worker["capabilities"]["claude_cli"] is False
    assert worker["active_leases"] == 0
    assert "dispatch_failed" in actions(served)
    # Out of the rotation: the next dispatch finds no push worker.
    again = requests.post(api(served, f"/llm-tasks/{task['id']}/dispatch"), json={}, timeout=15)
    assert again.status_code == 503


def test_an_agent_that_refuses_one_task_keeps_the_runs_it_has_started(fleet_server, agents):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="600")
    agent = agents("agent-1", run_seconds=1.5)
    agent.register(served.base_url)
    running, refused = new_task(served), new_task(served)
    assert requests.post(api(served, f"/llm-tasks/{running['id']}/dispatch"), json={}, timeout=10).status_code == 202
    agent.state.mode = "fail_next"
    response = requests.post(api(served, f"/llm-tasks/{refused['id']}/dispatch"), json={}, timeout=10)
    assert response.status_code == 502 and "agent error" in response.json()["error"]
    assert (task_of(served, refused["id"])["status"], task_of(served, refused["id"])["attempts"]) == ("queued", 0)
    assert task_of(served, running["id"])["status"] == "running"  # not taken from a live agent
    done = wait_until(lambda: (t := task_of(served, running["id"]))["status"] == "completed" and t, timeout=10,
                      what="the started run to finish")
    assert done["worker_id"] == "agent-1" and agent.outputs() == [running["id"]]


def test_push_and_pull_workers_serve_one_queue_each_task_once(fleet_server, agents):
    served = fleet_server()
    agent = agents("pusher", run_seconds=0.05, max_concurrency=2)
    agent.register(served.base_url)
    requests.post(api(served, "/workers"), json={"name": "puller", "capabilities": {"max_concurrency": 1}}, timeout=10)
    created = [new_task(served)["id"] for _ in range(40)]
    pulled: list[str] = []

    def pull_worker():
        session = requests.Session()
        while len(pulled) + len(agent.outputs()) < 40:
            response = session.post(api(served, "/workers/puller/claim"), json={"wait_seconds": 1}, timeout=10)
            if response.status_code != 201:
                continue
            task_id = response.json()["task"]["id"]
            fence = {"lease_id": response.json()["lease"]["id"], "worker_id": "puller"}
            time.sleep(0.05)
            done = session.post(api(served, f"/llm-tasks/{task_id}/complete"),
                                json={"status": "success", "output": "pulled", "metrics": {"duration_ms": 50}, **fence},
                                timeout=10)
            assert done.status_code == 200
            pulled.append(task_id)

    import threading

    puller = threading.Thread(target=pull_worker)
    puller.start()
    puller.join(timeout=60)
    wait_until(lambda: requests.get(api(served, "/stats"), timeout=10).json()["tasks"]["by_status"]["completed"] == 40,
               timeout=30, what="all tasks to complete")
    ran = Counter(pulled + agent.outputs())
    assert sorted(ran) == sorted(created) and set(ran.values()) == {1}
    assert pulled and agent.outputs()  # both kinds took work


def test_a_run_whose_callback_never_came_is_completed_from_the_agents_answer_once(fleet_server, agents):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="600")
    agent = agents("agent-1", mode="drop_callback")
    agent.register(served.base_url)
    task = new_task(served)
    assert requests.post(api(served, f"/llm-tasks/{task['id']}/dispatch"), json={}, timeout=10).status_code == 202
    done = wait_until(lambda: (t := task_of(served, task["id"]))["status"] == "completed" and t, timeout=10,
                      what="completion from the answer")
    assert done["worker_id"] == "agent-1"
    assert [a["content"] for a in results_of(served, task["id"])] == [f"agent-1 ran {task['id']}"]
    assert [c[0] for c in agent.state.callbacks] == ["heartbeat"]


# Automatic dispatch ---------------------------------------------------------------------


def test_200_tasks_run_on_4_agents_each_exactly_once_with_no_client_leasing(fleet_server, agents):
    served = fleet_server()
    fleet = [agents(f"agent-{n}", run_seconds=0.05, max_concurrency=2) for n in range(4)]
    for agent in fleet:
        assert agent.register(served.base_url).status_code == 201
    created = [new_task(served, context_id=f"ctx-{n % 7}", priority=n % 3)["id"] for n in range(200)]

    def all_done():
        stats = requests.get(api(served, "/stats"), timeout=10).json()["tasks"]["by_status"]
        return stats["completed"] == 200 and stats

    wait_until(all_done, timeout=90, interval=0.5, what="all 200 tasks to complete")
    ran = Counter(task_id for agent in fleet for task_id in agent.outputs())
    assert sorted(ran) == sorted(created) and set(ran.values()) == {1}  # each delivered and run once
    assert all(agent.state.most_running <= 2 for agent in fleet)  # never over capacity
    assert all(agent.outputs() for agent in fleet)  # the work was spread
    for task_id in created[:20]:
        assert len(results_of(served, task_id)) == 1
    log = served.log()
    assert "/lease" not in log and "/claim" not in log  # nobody but the runtime handed out work


def test_a_task_of_an_agent_killed_mid_run_is_completed_by_another(fleet_server, agents):
    served = fleet_server()
    doomed = agents("doomed", mode="die_mid_run")
    doomed.register(served.base_url)
    task = new_task(served)
    wait_until(lambda: doomed.state.deliveries, timeout=10, what="the doomed agent to get the task")
    survivor = agents("survivor")
    survivor.register(served.base_url)
    wait_until(lambda: not doomed.alive, timeout=5, what="the agent to die")
    died_at = time.monotonic()
    done = wait_until(lambda: (t := task_of(served, task["id"]))["status"] == "completed" and t, timeout=15,
                      interval=0.1, what="the task to be completed by the survivor")
    assert time.monotonic() - died_at < 0.5 + 2 + 3  # one sync round + a probe + the run, not a lease TTL
    assert done["worker_id"] == "survivor"
    assert survivor.outputs() == [task["id"]]
    assert worker_of(served, "doomed")["status"] == "offline"


def test_a_dead_agent_that_upstream_still_lists_online_receives_nothing(fleet_server, agents, membridge):
    ghost_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    membridge.add_agent("ghost", ghost_url)
    membridge.poll_agents(alive={"ghost"})  # upstream saw it once; the status now stays 'online'
    served = fleet_server()
    live = agents("live")
    live.register(served.base_url)
    wait_until(lambda: membridge.state.count("GET", "/agents") >= 2, timeout=10, what="two sync rounds")
    tasks = [new_task(served)["id"] for _ in range(10)]
    wait_until(lambda: all(task_of(served, t)["status"] == "completed" for t in tasks), timeout=30,
               what="the tasks to complete")
    assert sorted(live.outputs()) == sorted(tasks)
    leases = requests.get(api(served, "/leases"), timeout=10).json()
    assert {lease["worker_id"] for lease in leases} == {"live"}
    assert worker_of(served, "ghost")["status"] == "offline"
    assert "dispatch_failed" not in actions(served)


def test_a_self_registered_agent_unknown_upstream_keeps_working_through_10_sync_rounds(
    fleet_server, agents, membridge
):
    served = fleet_server(WORKER_SYNC_INTERVAL_S="0.3", BLOOM_WORKER_LIVENESS_S="1")
    agent = agents("self-registered")
    agent.register(served.base_url)  # once, as the real agent does
    membridge.add_agent("other", None)  # upstream knows another agent, not this one
    first = membridge.state.count("GET", "/agents")
    statuses = set()
    while membridge.state.count("GET", "/agents") - first < 10:
        statuses.add(worker_of(served, "self-registered")["status"])
        time.sleep(0.1)
    assert statuses == {"online"}
    membridge.restart()  # upstream forgets everything
    time.sleep(1.0)
    task = new_task(served)
    wait_until(lambda: task_of(served, task["id"])["status"] == "completed", timeout=10, what="the task to run")
    assert agent.outputs() == [task["id"]]


def test_two_instances_on_one_database_dispatch_each_task_once(fleet_server, agents):
    first = fleet_server()
    second = fleet_server()
    fleet = [agents(f"agent-{n}", max_concurrency=2) for n in range(3)]
    for agent in fleet:
        agent.register(first.base_url)
    created = [new_task(first if n % 2 else second)["id"] for n in range(60)]
    wait_until(lambda: requests.get(api(first, "/stats"), timeout=10).json()["tasks"]["by_status"]["completed"] == 60,
               timeout=60, interval=0.5, what="all tasks to complete")
    delivered = Counter(d["task_id"] for agent in fleet for d in agent.state.deliveries)
    assert sorted(delivered) == sorted(created) and set(delivered.values()) == {1}
