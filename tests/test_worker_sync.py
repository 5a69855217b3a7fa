"""Worker sync from Membridge's /agents, in process and under gunicorn."""
from __future__ import annotations

import time

import pytest
import requests

from bloom.services import services
from bloom.workers.sync import SyncFailed, run_worker_sync, sync_workers

from .fake_membridge import ADMIN_KEY
from .support import GunicornServer, shortest_gap, wait_until


@pytest.fixture
def app(membridge_app):
    return membridge_app


@pytest.fixture
def sync(app):
    def run():
        return sync_workers(services(app).membridge, services(app).database)

    return run


def workers_by_id(client):
    return {w["id"]: w for w in client.get("/api/runtime/workers").get_json()}


def test_sync_creates_workers_with_millisecond_timestamps(client, membridge, sync):
    last_seen = time.time() - 5
    membridge.state.agents = [
        {"name": "node-a", "url": "http://127.0.0.1:9", "status": "online", "registered_at": 1.7e9, "last_seen": last_seen},
        {"name": "node-b", "url": None, "status": "offline", "registered_at": None, "last_seen": None,
         "max_concurrency": 4, "labels": ["gpu"]},
    ]
    before = int(time.time() * 1000)
    outcome = sync()
    assert (outcome.inserted, outcome.updated, outcome.skipped) == (2, 0, 0)
    workers = workers_by_id(client)
    a, b = workers["node-a"], workers["node-b"]
    assert a["last_heartbeat"] == int(last_seen * 1000)
    assert a["registered_at"] >= before  # local first-seen time, in ms
    # A push worker (it has a url) is 'unknown' until the runtime's own probe has spoken:
    # upstream's 'online' can be hours old (the real control plane's statuses change only when it polls).
    assert (a["url"], a["status"]) == ("http://127.0.0.1:9", "unknown")
    assert b["status"] == "offline"  # no url, no evidence of its own: upstream decides
    assert b["last_heartbeat"] >= before  # no last_seen: now
    assert b["capabilities"] == {"claude_cli": True, "max_concurrency": 4, "labels": ["gpu"]}


def test_sync_updates_keep_registered_at_and_fields_upstream_left_out(client, membridge, sync):
    membridge.state.agents = [{"name": "node-a", "status": "online", "last_seen": time.time(),
                               "ip_addrs": ["10.0.0.1"], "obs_count": 7, "db_sha": "abc",
                               "capabilities": {"max_concurrency": 3}}]
    sync()
    first = workers_by_id(client)["node-a"]
    membridge.state.agents = [{"name": "node-a", "status": "syncing", "last_seen": time.time() + 1}]
    outcome = sync()
    assert (outcome.inserted, outcome.updated) == (0, 1)
    second = workers_by_id(client)["node-a"]
    assert second["status"] == "syncing"
    assert second["registered_at"] == first["registered_at"]
    assert second["last_heartbeat"] > first["last_heartbeat"]
    for kept in ("ip_addrs", "obs_count", "db_sha", "capabilities"):
        assert second[kept] == first[kept], kept


def test_sync_offlines_online_workers_gone_upstream_for_a_minute(client, membridge, sync):
    membridge.state.agents = [
        {"name": "stale", "status": "online", "last_seen": time.time() - 120},
        {"name": "recent", "status": "online", "last_seen": time.time() - 10},
    ]
    sync()
    client.post("/api/runtime/workers", json={"name": "by-hand"})  # heard from just now
    membridge.state.agents = []
    assert sync().offlined == 1
    statuses = {w["id"]: w["status"] for w in client.get("/api/runtime/workers").get_json()}
    assert statuses == {"stale": "offline", "recent": "online", "by-hand": "online"}


def test_sync_skips_bad_entries_and_applies_the_rest(client, membridge, sync, caplog):
    membridge.state.agents = [
        {"url": "http://nameless"},
        {"name": ""},
        {"name": 42},
        "just a string",
        {"name": "bad-time", "last_seen": "yesterday"},
        {"name": "bad-caps", "capabilities": {"max_concurrency": "8"}},
        {"name": "bad-ips", "ip_addrs": "10.0.0.1"},
        {"node_id": "by-node-id", "status": "weird-status"},
        {"name": "good", "status": "online"},
    ]
    outcome = sync()
    assert (outcome.inserted, outcome.skipped) == (2, 7)
    workers = workers_by_id(client)
    assert set(workers) == {"by-node-id", "good"}
    assert workers["by-node-id"]["status"] == "unknown"
    assert "skipped agent" in caplog.text


@pytest.mark.parametrize("mode", ["garbage", "fail5xx", "wrong-key", "down", "not-a-list"])
def test_an_upstream_failure_changes_nothing(app, client, membridge, sync, mode):
    membridge.state.agents = [{"name": "node-a", "status": "online", "last_seen": time.time() - 300}]
    sync()
    before = workers_by_id(client)
    if mode == "wrong-key":
        membridge.state.admin_key = "rotated"
    elif mode == "down":
        membridge.stop()
    elif mode == "not-a-list":
        membridge.state.agents = {"agents": []}
    else:
        membridge.state.mode = mode
    with pytest.raises(SyncFailed):
        sync()
    assert workers_by_id(client) == before  # node-a is stale, yet not marked offline
    run_worker_sync(services(app).membridge, services(app).database)
    health = client.get("/api/runtime/health").get_json()["membridge"]
    assert health["connected"] is False and health["consecutiveFailures"] >= 1


@pytest.mark.slow  # starts processes of its own
def test_gunicorn_syncs_once_per_interval_and_survives_an_upstream_outage(database_url, membridge):
    membridge.state.agents = [{"name": "remote-1", "url": "http://r1", "status": "online", "last_seen": time.time()}]
    served = GunicornServer(
        {"DATABASE_URL": database_url, "MEMBRIDGE_SERVER_URL": membridge.url, "MEMBRIDGE_ADMIN_KEY": ADMIN_KEY,
         "WORKER_SYNC_INTERVAL_S": "1"},
        workers=4,
    )
    try:
        api = served.url
        workers = wait_until(
            lambda: requests.get(api("/api/runtime/workers"), timeout=5).json(), timeout=5, what="the first sync"
        )
        assert workers[0]["id"] == "remote-1"
        assert workers[0]["last_heartbeat"] > 1_600_000_000_000  # milliseconds
        # Once per interval for the deployment, not once per process: four processes that
        # each synced would put four calls in every second, most a few ms apart.
        first = membridge.state.count("GET", "/agents")
        wait_until(lambda: membridge.state.count("GET", "/agents") - first >= 4, timeout=30, what="four more syncs")
        calls = [r.at for r in membridge.state.requests_to("/agents") if r.method == "GET"][first:]
        assert shortest_gap(calls) >= 0.5, f"syncs {shortest_gap(calls):.3f} s apart with four gunicorn processes"

        assert requests.get(api("/api/membridge/projects"), timeout=20).status_code == 200
        membridge.stop()
        assert requests.get(api("/api/membridge/projects"), timeout=20).status_code == 502
        failing = wait_until(
            lambda: (h := requests.get(api("/api/runtime/health"), timeout=5).json()["membridge"])["consecutiveFailures"] >= 2 and h,
            timeout=20, interval=0.25, what="health to count the sync failures",
        )
        assert failing["connected"] is False
        membridge.start()
        recovered = wait_until(
            lambda: (h := requests.get(api("/api/runtime/health"), timeout=5).json()["membridge"])["connected"] and h,
            timeout=15, interval=0.25, what="health to recover",
        )
        assert recovered["consecutiveFailures"] == 0
        assert requests.get(api("/api/membridge/projects"), timeout=20).status_code == 200
    finally:
        served.stop()
    assert ADMIN_KEY not in served.log()


@pytest.mark.slow  # starts processes of its own
def test_an_idle_service_without_membridge_logs_an_outage_once_not_every_round(database_url):
    served = GunicornServer({"DATABASE_URL": database_url, "MEMBRIDGE_SERVER_URL": "http://127.0.0.1:9",
                             "WORKER_SYNC_INTERVAL_S": "0.5"}, workers=3)
    try:
        time.sleep(6)  # about a dozen failed sync rounds
    finally:
        served.stop()
    log = served.log()
    # Once per process that happened to run the sync (3 workers), not once per round.
    assert 1 <= log.count("Membridge call failed") <= 3
    assert "apscheduler" not in log and "Retrying" not in log and "XDG_RUNTIME_DIR" not in log
    # Start-up speaks once per instance, not once per worker (three here).
    assert log.count("RUNTIME_API_KEY is not set") == 1 and log.count("BLOOM_PUBLIC_URL is not set") == 1
    assert log.count("schema applied") <= 1 and "scheduler started" not in log


def test_with_membridge_answering_a_silent_pull_worker_goes_offline_after_the_configured_liveness(
        app, client, membridge):
    """It went offline after a fixed 60 s whatever BLOOM_WORKER_LIVENESS_S said."""
    membridge.state.agents = []
    assert client.post("/api/runtime/workers", json={"name": "puller"}).status_code == 201
    time.sleep(1.2)  # silent for longer than the liveness below
    outcome = sync_workers(services(app).membridge, services(app).database, liveness_s=1.0)
    assert outcome.offlined == 1 and workers_by_id(client)["puller"]["status"] == "offline"
