"""SQL round trips of the hot paths, counted at the driver: every query text the service
sends (BEGIN and COMMIT included) goes through one psycopg2 cursor.execute, counted by a
cursor class given to the service's connections when they are opened.

The hot statements are prepared once per pooled connection, on its first hot call (see
bloom/sql.py); the counts below are of calls on a connection that has done so."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import psycopg2.extensions
import pytest
from sqlalchemy import event

from bloom.services import services
from bloom.sql import PREPARE_STATEMENTS

from .helpers import DONE, TASK, create_task, lease, register_worker
from .support import wait_until


class CountingCursor(psycopg2.extensions.cursor):
    """Records the query text of every execute made on the recording thread."""

    sent: list[str] | None = None
    thread: int | None = None

    def execute(self, query, vars=None):
        if CountingCursor.sent is not None and threading.get_ident() == CountingCursor.thread:
            CountingCursor.sent.append(query)
        return super().execute(query, vars)


class CountingConnection(psycopg2.extensions.connection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cursor_factory = CountingCursor


def listening(app) -> None:
    """The queue listener holds a pooled connection of its own from its first use on (a
    create announces its task through it): started first, it cannot take the connection
    a test has just warmed up."""
    engine = services(app).database.engine
    events = services(app).queue_events
    events.wait_for_change(events.generation, 0)
    wait_until(lambda: engine.pool.checkedout() == 1, timeout=10, what="the queue listener's connection")


@pytest.fixture
def statements(app):
    engine = services(app).database.engine

    def counting_connections(dialect, connection_record, cargs, cparams):
        cparams["connection_factory"] = CountingConnection

    event.listen(engine, "do_connect", counting_connections)
    engine.dispose()  # every connection from now on counts
    listening(app)

    @contextmanager
    def counting():
        sent: list[str] = []
        CountingCursor.sent, CountingCursor.thread = sent, threading.get_ident()
        try:
            yield sent
        finally:
            CountingCursor.sent = CountingCursor.thread = None

    yield counting
    event.remove(engine, "do_connect", counting_connections)


def test_hot_statements_are_prepared_once_per_connection(client, statements):
    with statements() as sent:
        create_task(client)
    assert len(sent) == 2 and sent[0].startswith("DEALLOCATE ALL;\nPREPARE ")  # every hot statement, at once
    assert "\nPREPARE bloom_create_task_0 " in sent[0] and "\nPREPARE bloom_lease_task_0 " in sent[0]
    assert sent[1].startswith("EXECUTE bloom_create_task_0")
    with statements() as sent:
        create_task(client)
    assert [statement.split(" (")[0] for statement in sent] == ["EXECUTE bloom_create_task_0"]


def test_a_connection_replaced_after_a_server_restart_prepares_again(app, client, database_url):
    import psycopg2

    create_task(client)
    with psycopg2.connect(database_url.replace("+psycopg2", "")) as admin, admin.cursor() as cursor:
        cursor.execute("""SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                           WHERE datname = current_database() AND application_name = 'bloom-runtime'""")
    admin.close()
    assert create_task(client)["status"] == "queued"


def test_hot_calls_survive_a_session_that_forgot_its_prepared_statements(app, client):
    listening(app)
    register_worker(client, "w1", max_concurrency=4)
    create_task(client)
    engine = services(app).database.engine
    assert engine.pool.checkedin() == 1  # the test client's one pooled connection
    with engine.connect() as connection:
        connection.exec_driver_sql("DEALLOCATE ALL")
    task = create_task(client)
    with engine.connect() as connection:
        connection.exec_driver_sql("DEALLOCATE ALL")
    assert lease(client, task["id"]).status_code == 201  # a statement list with its own BEGIN
    assert client.get(f"/api/runtime/llm-tasks/{task['id']}").get_json()["status"] == "leased"


def test_create_is_one_statement(client, statements):
    create_task(client)
    with statements() as sent:
        create_task(client)
    assert len(sent) == 1


def test_lease_is_one_statement(client, statements):
    register_worker(client, "w1", max_concurrency=4)
    task = create_task(client)
    with statements() as sent:
        assert lease(client, task["id"]).status_code == 201
    assert len(sent) == 1
    named = create_task(client)
    with statements() as sent:
        assert lease(client, named["id"], worker_id="w1").status_code == 201
    assert len(sent) == 1


def test_heartbeat_is_one_statement(client, statements):
    register_worker(client, "w1")
    task = create_task(client)
    granted = lease(client, task["id"]).get_json()["lease"]
    with statements() as sent:
        response = client.post(f"/api/runtime/llm-tasks/{task['id']}/heartbeat", json={"lease_id": granted["id"]})
    assert response.status_code == 200
    assert len(sent) == 1


def test_complete_is_one_statement_with_its_audit_entry(client, statements):
    register_worker(client, "w1")
    task = create_task(client)
    lease(client, task["id"])
    with statements() as sent:
        response = client.post(f"/api/runtime/llm-tasks/{task['id']}/complete", json=DONE)
    assert response.status_code == 200
    assert len(sent) == 1 and sent[0].startswith("EXECUTE bloom_complete_task_0 ")
    prepared = next(p for p in PREPARE_STATEMENTS.split(";\nPREPARE ") if "bloom_complete_task_0 " in p)
    assert "audit_logs" in prepared and "llm_results" in prepared and "runtime_artifacts" in prepared


def test_claim_is_one_statement(client, statements):
    register_worker(client, "w1")
    create_task(client)
    with statements() as sent:
        assert client.post("/api/runtime/workers/w1/claim", json={}).status_code == 201
    assert len(sent) == 1


def test_inside_a_callers_transaction_a_forgotten_statement_is_an_error_not_a_silent_resend(app, client):
    from sqlalchemy.exc import DBAPIError

    listening(app)
    database = services(app).database
    task = create_task(client)
    with pytest.raises(DBAPIError) as raised, database.transaction() as tx:
        tx.run_sql("DEALLOCATE ALL")
        tx.one_or_none("heartbeat_lease", task_id=task["id"], lease_id=None, worker_id=None, now=0)
    assert raised.value.orig.pgcode == "26000"  # the statement's own error, nothing sent after it
    assert create_task(client)["status"] == "queued"  # the next unit of work prepares again


def test_a_worker_heartbeat_is_one_statement_for_all_its_leases(client, statements):
    register_worker(client, "w1", max_concurrency=8)
    held = [lease(client, create_task(client)["id"]).get_json()["lease"]["id"] for _ in range(5)]
    client.post("/api/runtime/workers/w1/heartbeat", json={})  # prepares on this connection
    with statements() as sent:
        response = client.post("/api/runtime/workers/w1/heartbeat", json={"lease_ids": held})
    assert response.status_code == 200 and len(response.get_json()["renewed"]) == 5
    assert len(sent) == 1


def test_a_batch_of_a_thousand_tasks_is_one_statement(client, statements):
    with statements() as sent:
        response = client.post("/api/runtime/llm-tasks/batch", json={"tasks": [TASK] * 1000})
    assert response.status_code == 201 and len(response.get_json()["tasks"]) == 1000
    assert len(sent) == 1


def test_a_claim_of_several_tasks_is_one_statement(client, statements):
    register_worker(client, "w1", max_concurrency=16)
    for _ in range(12):
        create_task(client)
    client.post("/api/runtime/workers/w1/claim", json={"max_tasks": 1})  # prepares on this connection
    with statements() as sent:
        response = client.post("/api/runtime/workers/w1/claim", json={"max_tasks": 10})
    assert response.status_code == 201 and len(response.get_json()["tasks"]) == 10
    assert len(sent) == 1
