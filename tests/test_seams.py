"""Exactly once at the seams: who may claim, fenced agent callbacks, hung agents, one agent
one capacity, dispatch that agrees with the queue, workers that leave, reloads that lose
nothing, a caller's mistake upstream that is no outage.

Fleet tests run gunicorn with several workers on PostgreSQL, with stand-in agents over
real sockets that freeze as a SIGSTOPped or partitioned agent does (tests/fake_agent.py).
"""
from __future__ import annotations

import os
import signal
import time
from collections import Counter

import psutil
import pytest
import requests

from bloom.services import services
from bloom.workers.sync import offline_silent_workers, sync_workers

from .fake_membridge import ADMIN_KEY
from .helpers import api, audit_actions, create_task, lease, new_task, register_worker, results_of, task_of, worker_of
from .support import GunicornServer, listening_socket, wait_until

# 1. Who may claim --------------------------------------------------------------------


def _nothing_was_leased(client, task_ids):
    assert client.get("/api/runtime/leases").get_json() == []
    assert {client.get(f"/api/runtime/llm-tasks/{t}").get_json()["status"] for t in task_ids} == {"queued"}


@pytest.mark.parametrize("max_tasks", [None, 4])
def test_a_claim_by_a_worker_that_may_not_claim_gets_nothing(client, max_tasks):
    task_ids = [create_task(client)["id"] for _ in range(3)]
    register_worker(client, "offline-one", status="offline")
    register_worker(client, "no-cli", capabilities={"claude_cli": False, "max_concurrency": 4})
    body = {} if max_tasks is None else {"max_tasks": max_tasks}

    def claim(path_id: str):
        return client.post(f"/api/runtime/workers/{path_id}/claim", json=body)

    for unknown in ("ghost", "..%2F", "%2E%2E%2F", "rack%2F1"):
        response = claim(unknown)
        assert response.status_code == 404 and response.get_json() == {"error": "Worker not found"}, unknown
    offline = claim("offline-one")
    assert offline.status_code == 409 and "offline" in offline.get_json()["error"]
    no_cli = claim("no-cli")
    assert no_cli.status_code == 409 and "claude_cli" in no_cli.get_json()["error"]
    _nothing_was_leased(client, task_ids)

    register_worker(client, "full", max_concurrency=1)
    assert claim("full").status_code == 201
    full = claim("full")
    assert full.status_code == 409 and "no free capacity" in full.get_json()["error"]
    assert len(client.get("/api/runtime/leases").get_json()) == 1


# 2 and 3. A frozen agent: found at short intervals, and its late callbacks refused ------


@pytest.mark.parametrize("interval_s", [1, 3])
def test_a_hung_agents_task_runs_elsewhere_and_its_late_completion_is_refused(fleet_server, agents, interval_s):
    served = fleet_server(WORKER_SYNC_INTERVAL_S=str(interval_s))
    frozen = agents("frozen", run_seconds=1.0)
    frozen.register(served.base_url)
    task = new_task(served)
    wait_until(lambda: [c for c in frozen.state.callbacks if c[0] == "heartbeat"], timeout=10,
               what="the first agent to start the run")
    frozen.freeze()  # accepts connections, answers nothing, calls nobody
    frozen_at = time.monotonic()
    rescuer = agents("rescuer")
    rescuer.register(served.base_url)
    done = wait_until(lambda: (t := task_of(served, task["id"]))["status"] == "completed" and t,
                      timeout=interval_s + 12, interval=0.2, what="the task to run on the rescuer")
    assert time.monotonic() - frozen_at < interval_s + 10
    assert done["worker_id"] == "rescuer" and rescuer.outputs() == [task["id"]]
    assert worker_of(served, "frozen")["status"] == "offline"

    frozen.thaw()  # wakes up, finishes its run and reports it, late
    late = wait_until(lambda: [c for c in frozen.state.callbacks if c[0] == "complete"], timeout=10,
                      what="the late completion")[0]
    assert 400 <= late[2] < 500  # refused...
    time.sleep(0.5)  # ...and its answer to the delivery, read by the runtime, changes nothing either
    after = task_of(served, task["id"])
    assert (after["status"], after["worker_id"], after["lease_id"]) == ("completed", "rescuer", done["lease_id"])
    assert [a["content"] for a in results_of(served, task["id"])] == [f"rescuer ran {task['id']}"]
    assert [c[2] for c in rescuer.state.callbacks] == [200, 200]
    assert frozen.state.deliveries[0]["runtime_url"] != rescuer.state.deliveries[0]["runtime_url"]


def _connection_open(local: tuple[str, int]) -> bool:
    """Whether the runtime still holds the TCP connection whose end is `local`."""
    return any(c.laddr and (c.laddr.ip, c.laddr.port) == tuple(local) and c.status == psutil.CONN_ESTABLISHED
               for c in psutil.net_connections(kind="tcp"))


def test_a_hung_agents_delivery_is_dropped_as_soon_as_it_leaves_the_rotation(fleet_server, agents):
    """The runtime gave up on the run (the task runs elsewhere): it holds the connection
    to the hung agent no longer (it did for timeout_sec + 25 s, 145 s by default)."""
    served = fleet_server(WORKER_SYNC_INTERVAL_S="1")
    frozen = agents("frozen", run_seconds=1.0)
    frozen.register(served.base_url)
    task = new_task(served)
    wait_until(lambda: [c for c in frozen.state.callbacks if c[0] == "heartbeat"], timeout=10,
               what="the run to start")
    delivery = frozen.state.delivery_peers[0]
    assert _connection_open(delivery)
    frozen.freeze()
    wait_until(lambda: worker_of(served, "frozen")["status"] == "offline", timeout=15, what="the hung agent out")
    out_at = time.monotonic()
    wait_until(lambda: not _connection_open(delivery), timeout=10, interval=0.1, what="the delivery dropped")
    assert time.monotonic() - out_at < 2
    assert task_of(served, task["id"])["status"] == "queued"
    assert "dropped: its lease ended" in served.log()
    frozen.thaw()


def test_delivery_callbacks_are_fenced_by_their_lease(client):
    register_worker(client, "agent", url="http://127.0.0.1:9")
    task = create_task(client)
    granted = lease(client, task["id"]).get_json()["lease"]
    base = f"/api/runtime/deliveries/{granted['id']}/api/runtime/llm-tasks/{task['id']}"
    stale = f"/api/runtime/deliveries/not-the-lease/api/runtime/llm-tasks/{task['id']}"
    done = {"status": "success", "output": "late", "error_message": None,
            "metrics": {"duration_ms": 5, "tokens_used": None}}
    assert client.post(f"{stale}/heartbeat").status_code == 409
    assert client.post(f"{stale}/complete", json=done).status_code == 409
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "leased"
    assert client.post(f"{base}/heartbeat").status_code == 200
    assert client.post(f"{base}/complete", json={**done, "output": "on time"}).status_code == 200
    assert client.post(f"{base}/complete", json=done).status_code == 409  # once
    final = client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()
    assert (final["status"], final["result"]["output"]) == ("completed", "on time")


# 4. One agent, one capacity -----------------------------------------------------------


def test_one_agent_under_several_names_never_runs_over_its_capacity(fleet_server, agents, membridge):
    served = fleet_server()
    agent = agents("agent", run_seconds=0.4, max_concurrency=2)
    agent.register(served.base_url)
    # The same agent under a second name, claiming a capacity of 32 (a stale or hostile
    # registration), and under a third that Membridge lists.
    alias = {"name": "alias", "url": agent.url + "/", "capabilities": {"max_concurrency": 32}}
    assert requests.post(api(served, "/workers"), json=alias, timeout=10).status_code == 201
    membridge.add_agent("upstream-name", agent.url)
    membridge.poll_agents(alive={"upstream-name"})
    wait_until(lambda: worker_of(served, "upstream-name").get("status") == "online", timeout=10,
               what="the synced name to be probed online")
    created = [new_task(served)["id"] for _ in range(12)]
    wait_until(lambda: all(task_of(served, t)["status"] == "completed" for t in created), timeout=60,
               interval=0.3, what="all tasks to complete")
    assert agent.state.most_running <= 2
    assert Counter(agent.outputs()) == Counter({task_id: 1 for task_id in created})
    names = {lease["worker_id"] for lease in requests.get(api(served, "/leases?limit=1000"), timeout=10).json()}
    assert names <= {"agent", "alias", "upstream-name"}


# 5. Dispatch agrees with the queue ------------------------------------------------------


def test_dispatch_agrees_with_the_queue(fleet_server, agents):
    served = fleet_server(WORKER_SYNC_INTERVAL_S="600")
    agent = agents("agent", run_seconds=1.5)
    agent.register(served.base_url)

    next_week = new_task(served, run_at=int(time.time() * 1000) + 7 * 86_400_000)
    early = requests.post(api(served, f"/llm-tasks/{next_week['id']}/dispatch"), timeout=10)
    assert early.status_code == 409 and "not due until" in early.json()["error"]
    assert task_of(served, next_week["id"])["status"] == "queued"

    task = new_task(served)  # the background dispatcher delivers it...
    delivered = wait_until(lambda: (t := task_of(served, task["id"]))["lease_id"] and t, timeout=10,
                           what="the automatic dispatch")
    again = requests.post(api(served, f"/llm-tasks/{task['id']}/dispatch"), timeout=10)  # ...as the client asks
    assert again.status_code == 202
    assert again.json() == {"dispatched": True, "task_id": task["id"], "worker_id": "agent",
                            "lease_id": delivered["lease_id"]}
    done = wait_until(lambda: (t := task_of(served, task["id"]))["status"] == "completed" and t, timeout=10,
                      what="the run")
    assert done["attempts"] == 1 and agent.outputs() == [task["id"]]
    assert [d["task_id"] for d in agent.state.deliveries] == [task["id"]]
    audit = requests.get(api(served, "/audit?limit=1000"), timeout=10).json()
    assert [e["actor"] for e in audit if e["action"] == "task_dispatched"] == ["dispatcher"]


# 6. Workers that leave -------------------------------------------------------------------


def test_a_removed_worker_gives_its_tasks_back_at_once(client):
    register_worker(client, "leaving", max_concurrency=2)
    started, waiting = create_task(client), create_task(client)
    started_lease = lease(client, started["id"], worker_id="leaving").get_json()["lease"]
    lease(client, waiting["id"], worker_id="leaving")
    client.post(f"/api/runtime/llm-tasks/{started['id']}/heartbeat", json={"lease_id": started_lease["id"]})
    assert client.delete("/api/runtime/workers/leaving").get_json() == {"removed": True, "id": "leaving"}
    after = {t["id"]: t for t in client.get("/api/runtime/llm-tasks").get_json()}
    assert (after[started["id"]]["status"], after[started["id"]]["attempts"]) == ("queued", 1)  # it ran once
    assert (after[waiting["id"]]["status"], after[waiting["id"]]["attempts"]) == ("queued", 0)  # it never started
    assert client.get("/api/runtime/leases?status=active").get_json() == []
    register_worker(client, "next")
    assert client.post("/api/runtime/workers/next/claim", json={}).status_code == 201
    assert audit_actions(client)[:2] == ["task_leased", "worker_registered"]


def test_a_removed_worker_stays_removed_while_membridge_lists_it_until_it_registers(membridge_app, membridge):
    client = membridge_app.test_client()
    membridge.add_agent("listed", "http://127.0.0.1:9")

    def sync():
        sync_workers(services(membridge_app).membridge, services(membridge_app).database)

    sync()
    assert client.get("/api/runtime/workers/listed").status_code == 200
    assert client.delete("/api/runtime/workers/listed").status_code == 200
    sync()
    sync()
    assert client.get("/api/runtime/workers/listed").status_code == 404
    assert client.post("/api/runtime/workers", json={"name": "listed"}).status_code == 201  # its own sign of life
    sync()
    assert client.get("/api/runtime/workers/listed").status_code == 200


def test_a_silent_worker_goes_offline_and_its_next_call_brings_it_back(app, client):
    register_worker(client, "quiet")
    time.sleep(0.05)
    assert offline_silent_workers(services(app).database, liveness_s=0.01) == 1
    assert client.get("/api/runtime/workers/quiet").get_json()["status"] == "offline"
    assert client.post("/api/runtime/workers/quiet/heartbeat", json={}).status_code == 200
    assert client.get("/api/runtime/workers/quiet").get_json()["status"] == "online"


@pytest.mark.slow  # starts processes of its own
def test_without_membridge_a_silent_pull_worker_goes_offline_under_gunicorn(database_url):
    served = GunicornServer({"DATABASE_URL": database_url, "WORKER_SYNC_INTERVAL_S": "0.5",
                             "BLOOM_WORKER_LIVENESS_S": "1"}, workers=2)
    try:
        requests.post(served.url("/api/runtime/workers"), json={"name": "puller"}, timeout=10)
        wait_until(lambda: requests.get(served.url("/api/runtime/workers/puller"), timeout=5).json()["status"]
                   == "offline", timeout=10, what="the silent worker to go offline")
        assert requests.post(served.url("/api/runtime/workers/puller/heartbeat"), json={}, timeout=5).ok
        assert requests.get(served.url("/api/runtime/workers/puller"), timeout=5).json()["status"] == "online"
    finally:
        served.stop()


# 7. A reload loses nothing ---------------------------------------------------------------


def test_a_reload_mid_run_loses_no_callback_and_runs_nothing_twice(fleet_server, agents):
    served = fleet_server(WORKER_SYNC_INTERVAL_S="1")
    fleet = [agents(f"agent-{n}", run_seconds=1.0, max_concurrency=2) for n in range(2)]
    for agent in fleet:
        agent.register(served.base_url)
    created = [new_task(served)["id"] for _ in range(12)]
    wait_until(lambda: sum(len(a.state.deliveries) for a in fleet) >= 3, timeout=10, what="runs in flight")
    os.kill(served.process.pid, signal.SIGHUP)  # what `systemctl reload` sends gunicorn's master
    wait_until(lambda: all(task_of(served, t)["status"] == "completed" for t in created), timeout=60,
               interval=0.5, what="every task to complete across the reload")
    ran = Counter(task_id for agent in fleet for task_id in agent.outputs())
    assert sorted(ran) == sorted(created) and set(ran.values()) == {1}
    callbacks = [c for agent in fleet for c in agent.state.callbacks]
    assert {status for _, _, status in callbacks} == {200}, callbacks
    assert all(len(results_of(served, task_id)) == 1 for task_id in created)
    assert "Handling signal: hup" in served.log().lower() or "hang up" in served.log().lower()


def test_a_full_stop_and_start_on_a_held_socket_loses_no_callback_and_runs_nothing_twice(fleet_server, agents):
    """systemd's socket activation (README: bloom-runtime.socket): the listening socket
    outlives the service, so callbacks sent while it is down wait in the socket's
    backlog and are served by the next start, instead of being refused and lost."""
    held = listening_socket()
    try:
        first = fleet_server(listen_socket=held, WORKER_SYNC_INTERVAL_S="1")
        fleet = [agents(f"agent-{n}", run_seconds=2.0, max_concurrency=2) for n in range(2)]
        for agent in fleet:
            agent.register(first.base_url)
        created = [new_task(first)["id"] for _ in range(4)]
        wait_until(lambda: sum(len([c for c in a.state.callbacks if c[0] == "heartbeat"]) for a in fleet) == 4,
                   timeout=10, what="four runs in flight")
        first.stop()  # a full stop: every process of the service is gone
        # The runs end meanwhile, and their completions wait in the backlog (the stand-in
        # gives a callback 10 s: start again as soon as they are sent, not a fixed time later).
        wait_until(lambda: sum(len(a.state.runs) for a in fleet) == 4, timeout=10, what="the four runs to end")
        stopped_for = time.monotonic()
        second = fleet_server(listen_socket=held, WORKER_SYNC_INTERVAL_S="1")
        wait_until(lambda: all(task_of(second, t)["status"] == "completed" for t in created), timeout=15,
                   interval=0.2, what="every task to complete after the start")
        assert time.monotonic() - stopped_for < 15  # not a lease TTL (timeout_sec + 60 s) later
        ran = Counter(task_id for agent in fleet for task_id in agent.outputs())
        assert sorted(ran) == sorted(created) and set(ran.values()) == {1}
        assert {status for agent in fleet for _, _, status in agent.state.callbacks} == {200}
    finally:
        held.close()


# 8. The caller's mistake is not an outage ----------------------------------------------


def test_an_upstream_422_for_the_callers_body_leaves_the_connection_state_alone(membridge_app):
    client = membridge_app.test_client()
    assert client.get("/api/membridge/projects").status_code == 200
    assert client.get("/api/runtime/health").get_json()["membridge"]["connected"] is True
    refused = client.post("/api/membridge/projects/cid-1/leadership/select", json={})
    assert refused.status_code == 422 and "primary_node_id" in refused.get_json()["error"]
    health = client.get("/api/runtime/health").get_json()["membridge"]
    assert (health["connected"], health["consecutiveFailures"]) == (True, 0)
    assert client.get("/api/runtime/config").get_json()["connected"] is True
    assert ADMIN_KEY not in refused.get_data(as_text=True)


def test_no_task_is_delivered_to_an_agent_that_is_already_hung(fleet_server, agents):
    """A request written to a frozen agent waits in its socket and runs when the agent
    wakes, though the task ran elsewhere meanwhile (three of three tries with the real
    agent). A health check of at most a second right before each delivery keeps tasks
    away from an agent that is hung already, long before a probe round would notice."""
    served = fleet_server(WORKER_SYNC_INTERVAL_S="30")  # no probe round comes to the rescue
    hung = agents("hung", max_concurrency=4)  # most free capacity: the dispatcher's first pick
    hung.register(served.base_url)
    other = agents("other", max_concurrency=1)
    other.register(served.base_url)
    hung.freeze()
    task = new_task(served)
    done = wait_until(lambda: (t := task_of(served, task["id"]))["status"] == "completed" and t,
                      timeout=15, interval=0.2, what="the task to run on the agent that answers")
    assert done["worker_id"] == "other" and done["attempts"] == 1  # the refusal spent no attempt
    hung.thaw()
    wait_until(lambda: worker_of(served, "hung")["status"] == "offline", timeout=5, what="the hung agent out")
    assert ("POST", "/execute-task") not in [(method, path) for method, path, _ in hung.state.seen]
    assert hung.state.deliveries == []
