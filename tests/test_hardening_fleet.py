"""Hostile, broken and slow agents cost bounded resources; results survive a short
database outage. gunicorn on PostgreSQL, stand-in agents over real sockets."""
from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

from bloom.agents.client import AgentClient, AgentNetworks
from bloom.settings import Settings

from .fake_agent import AGENT_KEY
from .helpers import TASK, api, new_task, results_of, task_of, worker_of
from .support import GunicornServer, free_port, shortest_gap, wait_until


class _OddHealthServer:
    """A /health that answers after `delay` seconds, trickles its answer a byte a second,
    or sends a huge body."""

    def __init__(self, behaviour: str, delay: float = 0.0) -> None:
        self.behaviour, self.delay = behaviour, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.served = 0
        self.arrivals: list[float] = []  # when each probe came
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(4096)
                self.arrivals.append(time.monotonic())
                time.sleep(self.delay)
                if self.behaviour == "trickle":
                    for byte in b"HTTP/1.1 200 OK\r\n\r\n":
                        connection.sendall(bytes([byte]))
                        time.sleep(1.0)
                elif self.behaviour == "huge":
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 536870912\r\n\r\n")
                    chunk = b"x" * 65536
                    for _ in range(8192):
                        connection.sendall(chunk)
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                self.served += 1
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()


def test_a_slow_health_is_an_answer_and_a_trickle_or_a_flood_costs_one_bounded_probe():
    client = AgentClient("key", AgentNetworks(Settings.from_env({}).agent_networks))
    slow = _OddHealthServer("plain", delay=2.5)
    trickle = _OddHealthServer("trickle")
    huge = _OddHealthServer("huge")
    try:
        assert client.probe(slow.url) is True  # 2.5 s: slow, not dead
        for odd in (trickle, huge):
            started = time.monotonic()
            threads_before = threading.active_count()
            alive = client.probe(odd.url)
            took = time.monotonic() - started
            if odd is huge:
                assert alive is True and took < 1.0  # the status line was enough; the body was never read
            else:
                assert alive is False and took < 2 * 3.0 + 0.5  # every try ends at its deadline
            assert threading.active_count() <= threads_before + 2  # nothing left running
    finally:
        for odd in (slow, trickle, huge):
            odd.close()


def test_a_worker_url_with_an_impossible_port_is_refused(client):
    for url in ("http://127.0.0.1:99999", "http://127.0.0.1:0", "http://127.0.0.1:abc", "http://a b:80"):
        response = client.post("/api/runtime/workers", json={"name": "w", "url": url})
        assert response.status_code == 400 and "url" in response.get_json()["error"]["fieldErrors"], url
    assert client.get("/api/runtime/workers").get_json() == []


def test_an_agents_result_survives_a_short_database_outage(agents):
    from bloom.embedded_postgres import import_pgserver

    data_dir = Path(tempfile.mkdtemp(prefix="bloom-outage-pg-"))
    pg = import_pgserver().get_server(data_dir / "pgdata", cleanup_mode="delete")
    served = GunicornServer({"DATABASE_URL": pg.get_uri(driver="psycopg2"), "MEMBRIDGE_AGENT_KEY": AGENT_KEY,
                             "WORKER_SYNC_INTERVAL_S": "600"}, workers=2, public=True)
    try:
        agent = agents("agent", run_seconds=2.0)
        agent.register(served.base_url)
        task = new_task(served)
        wait_until(lambda: [c for c in agent.state.callbacks if c[0] == "heartbeat"], timeout=10,
                   what="the run to start")
        pg.stop()  # down as the run ends: the agent's completion gets 503, and agents never retry
        lost = wait_until(lambda: [c for c in agent.state.callbacks if c[0] == "complete"], timeout=10,
                          what="the agent's completion")[0]
        assert lost[2] == 503
        time.sleep(1.0)
        pg.ensure_postgres_running()
        # Until each process has seen the database answer again (a ping a second), reads get 503.
        done = wait_until(lambda: (r := requests.get(api(served, f"/llm-tasks/{task['id']}"), timeout=10)).ok
                          and r.json()["status"] == "completed" and r.json(),
                          timeout=30, interval=0.5, what="the held result to be stored")
        assert done["attempts"] == 1 and agent.outputs() == [task["id"]]  # ran once
        assert [a["content"] for a in results_of(served, task["id"])] == [f"agent ran {task['id']}"]
    finally:
        served.stop()
        pg.cleanup()


def test_a_refused_dispatch_to_a_dead_url_leaves_nothing_leased(fleet_server):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="600")
    dead = f"http://127.0.0.1:{free_port()}"
    requests.post(api(served, "/workers"), json={"name": "dead", "url": dead}, timeout=10)
    task = new_task(served)
    response = requests.post(api(served, f"/llm-tasks/{task['id']}/dispatch"), timeout=15)
    assert response.status_code == 502
    assert (task_of(served, task["id"])["status"], task_of(served, task["id"])["attempts"]) == ("queued", 0)
    assert worker_of(served, "dead")["active_leases"] == 0


def test_an_agent_that_takes_tasks_and_never_answers_is_held_out_and_a_task_that_dies_says_why(
    fleet_server, agents
):
    served = fleet_server(WORKER_SYNC_INTERVAL_S="0.5")
    hole = agents("black-hole", mode="black_hole", max_concurrency=2)  # its /health says ok throughout
    hole.register(served.base_url)
    quick = {"policy": {"timeout_sec": 1, "budget": 0}}
    last_chance = new_task(served, max_attempts=1, **quick)
    retried = new_task(served, **quick)
    wait_until(lambda: len(hole.state.deliveries) == 2, timeout=10, what="both tasks delivered to the black hole")
    honest = agents("honest")
    honest.register(served.base_url)
    done = wait_until(lambda: (t := task_of(served, retried["id"]))["status"] == "completed" and t, timeout=30,
                      interval=0.3, what="the task to run on the honest agent")
    assert done["worker_id"] == "honest"
    dead = task_of(served, last_chance["id"])
    assert dead["status"] == "dead"
    assert "taken out of rotation" in dead["result"]["error_message"]
    assert "no answer" in dead["result"]["error_message"]
    time.sleep(1.5)  # several probe rounds: its /health answers, yet it stays out
    assert worker_of(served, "black-hole")["status"] == "error"
    assert len(hole.state.deliveries) == 2  # never given the same task again
    hole.register(served.base_url)  # its own registration brings it back
    assert worker_of(served, "black-hole")["status"] == "online"


def test_an_agent_that_trickles_its_answer_is_refused_within_seconds(fleet_server, agents):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="600")
    slow = agents("trickler", mode="trickle")
    slow.register(served.base_url)
    task = new_task(served)
    started = time.monotonic()
    response = requests.post(api(served, f"/llm-tasks/{task['id']}/dispatch"), timeout=30)
    assert time.monotonic() - started < 6
    assert response.status_code == 502 and response.json()["dispatched"] is False
    after = task_of(served, task["id"])
    assert (after["status"], after["attempts"], after["lease_id"]) == ("queued", 0, None)
    assert worker_of(served, "trickler")["status"] == "offline"


def test_an_agents_error_text_is_cut_to_one_short_line(fleet_server, agents):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="600")
    chatty = agents("chatty", mode="fail_next")
    chatty.state.fail_detail = "internal page of the target\n<secret-looking line>\n" * 500
    chatty.register(served.base_url)
    task = new_task(served)
    response = requests.post(api(served, f"/llm-tasks/{task['id']}/dispatch"), timeout=15)
    error = response.json()["error"]
    assert response.status_code == 502 and error.startswith("agent answered 500: internal page of the target")
    assert len(error) <= len("agent answered 500: ") + 120 and "\n" not in error
    audit = requests.get(api(served, "/audit?limit=1000"), timeout=10).json()
    assert all(len(str(entry["detail"])) < 600 for entry in audit)


def test_many_names_for_one_url_cost_one_probe_a_round(fleet_server, agents, database_url):
    target = _OddHealthServer("plain")
    try:
        served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="0.5")
        for n in range(50):
            requests.post(api(served, "/workers"), json={"name": f"name-{n}", "url": target.url}, timeout=10)
        before = len(target.arrivals)
        wait_until(lambda: len(target.arrivals) - before >= 4, timeout=30, what="four more probes")
        # One probe a round, 0.5 s apart; fifty names probed each would come ms apart.
        assert shortest_gap(target.arrivals[before:]) >= 0.2
        audit = requests.get(api(served, "/audit?limit=1000"), timeout=10).json()
        assert not [e for e in audit if e["action"] == "worker_out_of_rotation"]
    finally:
        target.close()


def test_a_dead_worker_is_audited_out_of_rotation_once_not_every_round(fleet_server):
    served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="0.5")
    requests.post(api(served, "/workers"), json={"name": "gone", "url": f"http://127.0.0.1:{free_port()}"},
                  timeout=10)
    wait_until(lambda: worker_of(served, "gone")["status"] == "offline", timeout=10, what="the probe")
    time.sleep(2.5)  # several more rounds that find it still dead
    audit = requests.get(api(served, "/audit?limit=1000"), timeout=10).json()
    assert [e["action"] for e in audit].count("worker_out_of_rotation") == 1


def test_agents_that_hold_every_delivery_slot_leave_a_fair_share_for_another_agent(fleet_server, agents):
    """Eight agents of capacity 32 whose runs last a minute hold all 256 delivery slots of
    the dispatching process; a ninth agent still gets its task within seconds."""
    served = fleet_server(WORKER_SYNC_INTERVAL_S="600")
    hogs = [agents(f"hog-{n}", run_seconds=60, max_concurrency=32) for n in range(8)]
    for hog in hogs:
        hog.register(served.base_url)
    batch = [{**TASK, "context_id": f"hog-{n}"} for n in range(256)]
    response = requests.post(api(served, "/llm-tasks/batch"), json={"tasks": batch}, timeout=30)
    assert response.status_code == 201
    wait_until(lambda: sum(len(hog.state.deliveries) for hog in hogs) == 256, timeout=60, interval=0.5,
               what="256 runs held by the eight agents")
    honest = agents("honest")
    honest.register(served.base_url)
    task = new_task(served, context_id="honest")
    done = wait_until(lambda: (t := task_of(served, task["id"]))["status"] == "completed" and t, timeout=20,
                      interval=0.3, what="the ninth agent's task to run")
    assert done["worker_id"] == "honest"
    assert all(len(hog.state.deliveries) <= 32 for hog in hogs)


def _memory_mib(served: GunicornServer) -> float:
    """The resident memory of the service's processes, together."""
    master = psutil.Process(served.process.pid)
    return sum(process.memory_info().rss for process in master.children()) / 2**20


def test_an_agents_answer_is_held_to_the_body_limit_and_its_memory_comes_back(fleet_server, agents):
    """An agent whose runs produce more than a completion may carry: its callback is
    refused (413), and its answer to the delivery is not read past the limit nor kept;
    the run fails saying why, and the processes' memory returns to where it was."""
    served = fleet_server(BLOOM_MAX_BODY_BYTES=str(4 << 20))
    big = agents("big", max_concurrency=8)
    big.state.output_bytes = 12 << 20
    before = _memory_mib(served)
    tasks = [new_task(served, max_attempts=1) for _ in range(8)]
    assert big.register(served.base_url).status_code == 201
    done = [wait_until(lambda t=t: (found := task_of(served, t["id"]))["status"] in ("failed", "dead") and found,
                       timeout=60, interval=0.3, what="the run to end") for t in tasks]
    for task in done:
        assert "larger than BLOOM_MAX_BODY_BYTES" in task["result"]["error_message"], task["result"]
        assert task["result"]["output"] is None
    assert {status for kind, _, status in big.state.callbacks if kind == "complete"} == {413}
    time.sleep(1)
    assert _memory_mib(served) < before + 64, (before, _memory_mib(served))


def test_agents_that_fail_every_run_are_taken_out_and_retries_go_to_another(fleet_server, agents):
    """Agents that fail every run at once are always idle: the least-loaded choice sent
    them every delivery, and 8 of 40 tasks spent all their attempts there."""
    served = fleet_server()
    good = agents("good", max_concurrency=2, run_seconds=0.2)
    broken = [agents(f"broken-{n}", max_concurrency=2, mode="fail_runs") for n in range(9)]
    for agent in [good, *broken]:
        assert agent.register(served.base_url).status_code == 201
    tasks = [new_task(served) for _ in range(40)]
    wait_until(lambda: all(task_of(served, t["id"])["status"] in ("completed", "failed") for t in tasks),
               timeout=90, interval=0.5, what="every task to end")
    assert {task_of(served, t["id"])["status"] for t in tasks} == {"completed"}
    assert sorted(good.outputs()) == sorted(t["id"] for t in tasks)
    # Each broken agent got a few runs before it was taken out (3, then one after each back-off:
    # 15 s, 30 s), not a share of every task's attempts.
    assert all(len(agent.state.deliveries) <= 7 for agent in broken), [len(a.state.deliveries) for a in broken]
    assert "runs failed in a row" in served.log()


def test_an_agent_known_under_several_names_is_taken_out_once_for_all_of_them(fleet_server, agents):
    """Its failures count per agent (url), not per name: under four names it got three
    failing runs under each name before every name was out."""
    served = fleet_server()
    good = agents("good", max_concurrency=2, run_seconds=0.2)
    broken = agents("broken", max_concurrency=2, mode="fail_runs")
    for agent in (good, broken):
        assert agent.register(served.base_url).status_code == 201
    for n in range(3):  # the same agent, listed again under other names (as Membridge or a rename would)
        answer = requests.post(api(served, "/workers"), json={"name": f"broken-alias-{n}", "url": broken.url},
                               timeout=10)
        assert answer.status_code == 201, answer.text
    tasks = [new_task(served) for _ in range(20)]
    wait_until(lambda: all(task_of(served, t["id"])["status"] == "completed" for t in tasks),
               timeout=60, interval=0.5, what="every task to complete")
    # Three failures, and at most the runs already granted while the third was failing.
    assert len(broken.state.deliveries) <= 5, len(broken.state.deliveries)


def test_agents_that_take_tasks_and_never_start_them_are_taken_out(fleet_server, agents):
    """An agent heartbeats as each run starts; these take the task, never do, and answer
    a byte a second: the tasks waited for timeout_sec + 25 s (145 s by default)."""
    served = fleet_server()
    good = agents("good", max_concurrency=1, run_seconds=0.2)
    silent = [agents(f"silent-{n}", max_concurrency=2, mode="silent_trickle") for n in range(4)]
    for agent in [good, *silent]:
        assert agent.register(served.base_url).status_code == 201
    tasks = [new_task(served) for _ in range(8)]
    started = time.monotonic()
    try:
        wait_until(lambda: all(task_of(served, t["id"])["status"] == "completed" for t in tasks),
                   timeout=60, interval=0.5, what="every task to complete")
    except AssertionError:
        raise AssertionError([task_of(served, t["id"])["status"] for t in tasks], served.log()[-6000:]) from None
    assert time.monotonic() - started < 40
    assert all(task_of(served, t["id"])["attempts"] == 1 for t in tasks)  # the silent ones cost no attempt
    assert "never started it; queued again" in served.log(), served.log()[-5000:]


def test_one_agent_under_many_spellings_costs_one_probe_a_round(fleet_server):
    """Urls spelled differently that resolve to one address are one target: one probe a
    round, not one per spelling (each spelling was a target of its own, four probes at
    a time per spelling)."""
    target = _OddHealthServer("plain")
    port = target.url.rsplit(":", 1)[1]
    try:
        served = fleet_server(BLOOM_DISPATCH="off", WORKER_SYNC_INTERVAL_S="0.5")
        spellings = [f"http://{host}:{port}" for host in ("127.0.0.1", "localhost", "LOCALHOST", "LocalHost")]
        for n, url in enumerate(spellings * 5):
            answer = requests.post(api(served, "/workers"), json={"name": f"name-{n}", "url": url}, timeout=10)
            assert answer.status_code == 201, answer.text
        before = len(target.arrivals)
        wait_until(lambda: len(target.arrivals) - before >= 4, timeout=30, what="four more probes")
        assert shortest_gap(target.arrivals[before:]) >= 0.2
    finally:
        target.close()
