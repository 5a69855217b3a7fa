"""Leadership (bloom/leadership.py): a row with an expiry and an epoch. A leader that
stops renewing — killed, frozen, cut off — is replaced once its row expires, and its
grants after that are refused by their epoch; proven with a SIGSTOPped gunicorn process."""
from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime

import pytest
import requests

from bloom.errors import Unavailable
from bloom.leadership import Leadership
from bloom.services import services

from .helpers import TASK, api, new_task, task_of
from .support import wait_until


def test_a_leadership_is_held_by_one_renewed_by_it_and_taken_over_once_it_expires(app):
    database = services(app).database
    first = Leadership(database, "dispatch", "host-a:1:x", ttl_ms=400)
    second = Leadership(database, "dispatch", "host-b:2:y", ttl_ms=400)
    assert first.take_or_renew() and first.epoch == 1
    assert not second.take_or_renew()
    assert first.take_or_renew() and first.epoch == 1  # renewed, same epoch
    time.sleep(0.5)  # `first` is frozen: no renewal for longer than its TTL
    assert second.take_or_renew() and second.epoch == 2
    assert not first.take_or_renew() and first.epoch is None  # it wakes and finds it lost
    second.release()
    assert first.take_or_renew() and first.epoch == 3  # released: taken at once


def test_a_leader_that_lost_its_leadership_grants_nothing(app, client):
    """The dispatcher's grants carry its epoch: the woken old leader's grant changes
    nothing; the current leader's goes through."""
    database, leases = services(app).database, services(app).leases
    client.post("/api/runtime/workers", json={"name": "agent-1", "url": "http://127.0.0.1:9",
                                              "capabilities": {"max_concurrency": 4}})
    task = client.post("/api/runtime/llm-tasks", json=TASK).get_json()
    old = Leadership(database, "dispatch", "host-a:1:x", ttl_ms=300)
    assert old.take_or_renew()
    stale_epoch = old.epoch
    time.sleep(0.4)
    new = Leadership(database, "dispatch", "host-b:2:y")
    assert new.take_or_renew()
    with pytest.raises(Unavailable):
        leases.grant_lease(task["id"], worker_id=None, ttl_seconds=None, push_only=True,
                           leader=(old.holder, stale_epoch))
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "queued"
    granted = leases.grant_lease(task["id"], worker_id=None, ttl_seconds=None, push_only=True,
                                 leader=(new.holder, new.epoch))
    assert granted["task"]["status"] == "leased"


_TAKEN = re.compile(r"^(\S+ \S+) INFO \[(\d+)\] bloom\.agents\.dispatch: dispatcher: this process dispatches", re.M)


def _leader_pid(log: str) -> int | None:
    found = _TAKEN.findall(log)
    return int(found[-1][1]) if found else None


def _taken_at(log: str, pid: int) -> float:
    """When `pid` last took the leadership, by the log's own clock (seconds since the epoch)."""
    stamp = [when for when, taker in _TAKEN.findall(log) if int(taker) == pid][-1]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.slow  # starts processes of its own
def test_a_frozen_leader_is_replaced_and_does_no_leaders_work_when_it_wakes(fleet_server, agents):
    """The dispatching process is SIGSTOPped (a paused VM keeps its TCP session, and a
    session lock with it, for as long as it is paused): another process dispatches within
    seconds; woken, the old leader finds its leadership lost and grants nothing."""
    served = fleet_server()
    agent = agents("agent-1")
    assert agent.register(served.base_url).status_code == 201
    first = new_task(served)
    wait_until(lambda: task_of(served, first["id"])["status"] == "completed", timeout=20, what="the first run")
    leader = wait_until(lambda: _leader_pid(served.log()), timeout=10, what="a leader")
    os.kill(leader, signal.SIGSTOP)
    try:
        stopped_at = time.time()
        second = new_task(served)
        wait_until(lambda: task_of(served, second["id"])["status"] == "completed", timeout=40,
                   what="a run dispatched by another process")
        successor = _leader_pid(served.log())
        assert successor != leader
        took_over_s = _taken_at(served.log(), successor) - stopped_at
    finally:
        os.kill(leader, signal.SIGCONT)
    wait_until(lambda: f"[{leader}] bloom.agents.dispatch: dispatcher: leadership lost" in served.log(), timeout=15,
               what="the woken process to find its leadership lost")
    third = new_task(served)
    wait_until(lambda: task_of(served, third["id"])["status"] == "completed", timeout=20, what="a third run")
    leases = requests.get(api(served, "/leases?limit=1000"), timeout=10).json()
    assert sorted(lease["task_id"] for lease in leases) == sorted([first["id"], second["id"], third["id"]])
    # The row's TTL (10 s) after the last renewal (at most 2 s before the stop), and one
    # retry (2 s): about 12 s; more on a loaded machine.
    assert took_over_s < 20, took_over_s
