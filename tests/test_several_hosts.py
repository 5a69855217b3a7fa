"""Several hosts on one database behind a load balancer, as docs/OPERATIONS.md says to
run them: BLOOM_PUBLIC_URL is the balancer's address, so an agent's callbacks reach a
live host whichever host delivered the task, and a host that dies mid-run takes no
agent capacity with it."""
from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from .fake_agent import AGENT_KEY
from .support import GunicornServer, TcpBalancer, wait_until

pytestmark = pytest.mark.slow  # two gunicorn hosts and a balancer

TASK = {"context_id": "notebook-1", "agent_slug": "summarizer", "prompt": "Summarize."}


def _task(api: str, task_id: str) -> dict | None:
    """The task as a client reads it; None when the connection broke (one made to the
    killed host as it died: a client, or a balancer's health check, tries again)."""
    try:
        response = requests.get(f"{api}/llm-tasks/{task_id}", timeout=10)
    except requests.ConnectionError:
        return None
    return response.json() if response.ok else None


def _leader(hosts: list[GunicornServer]) -> GunicornServer | None:
    leading = [host for host in hosts if "dispatcher: this process dispatches" in host.log()]
    return leading[-1] if len(leading) == 1 else None


def test_a_host_killed_mid_run_leaves_the_run_and_the_agents_capacity_to_the_survivor(database_url, agents):
    balancer = TcpBalancer([])
    hosts = [GunicornServer({"DATABASE_URL": database_url, "BLOOM_PUBLIC_URL": balancer.url,
                             "MEMBRIDGE_AGENT_KEY": AGENT_KEY, "WORKER_SYNC_INTERVAL_S": "1"}, workers=1)
             for _ in range(2)]
    balancer.backends[:] = [host.port for host in hosts]
    api = f"{balancer.url}/api/runtime"
    try:
        agent = agents("agent-1", run_seconds=3.0, max_concurrency=1)
        assert agent.register(balancer.url).status_code == 201
        task = requests.post(f"{api}/llm-tasks", json=TASK, timeout=10).json()
        wait_until(lambda: [c for c in agent.state.callbacks if c[0] == "heartbeat"], timeout=15,
                   what="the run to start")
        leader = wait_until(lambda: _leader(hosts), timeout=5, what="the host that dispatched")
        os.killpg(leader.process.pid, signal.SIGKILL)  # the host is gone: no FIN for its sessions
        killed_at = time.monotonic()
        done = wait_until(lambda: (t := _task(api, task["id"])) and t["status"] == "completed" and t, timeout=20,
                          what="the run's completion, through the balancer, at the survivor")
        assert time.monotonic() - killed_at < 10  # the run's end, not its lease's (timeout_sec + 60 s)
        assert done["attempts"] == 1 and agent.outputs() == [task["id"]]
        assert [status for kind, _, status in agent.state.callbacks if kind == "complete"] == [200]
        assert requests.get(f"{api}/workers/agent-1", timeout=10).json()["active_leases"] == 0
        # The survivor takes the dispatch over and the agent's slot serves the next task.
        second = requests.post(f"{balancer.url}/api/runtime/llm-tasks", json=TASK, timeout=10).json()
        wait_until(lambda: (t := _task(api, second["id"])) and t["status"] == "completed", timeout=30,
                   what="the next task on the survivor")
    finally:
        for host in hosts:
            host.stop()
        balancer.close()
