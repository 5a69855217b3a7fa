"""SQL round trips of the hot paths, counted at the driver: every statement the service
sends (BEGIN and COMMIT included) fires SQLAlchemy's before_cursor_execute once."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
from sqlalchemy import event

from .helpers import DONE, create_task, lease, register_worker


@pytest.fixture
def statements(app):
    engine = app.extensions["bloom.database"].engine
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    @contextmanager
    def counting():
        sent.clear()
        event.listen(engine, "before_cursor_execute", record)
        try:
            yield sent
        finally:
            event.remove(engine, "before_cursor_execute", record)

    return counting


def test_create_is_one_statement(client, statements):
    with statements() as sent:
        create_task(client)
    assert len(sent) == 1


def test_lease_is_two_statements(client, statements):
    register_worker(client, "w1", max_concurrency=4)
    task = create_task(client)
    with statements() as sent:
        assert lease(client, task["id"]).status_code == 201
    assert len(sent) == 2
    named = create_task(client)
    with statements() as sent:
        assert lease(client, named["id"], worker_id="w1").status_code == 201
    assert len(sent) == 2


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
    assert len(sent) == 1
    assert "audit_logs" in sent[0] and "llm_results" in sent[0] and "runtime_artifacts" in sent[0]


def test_claim_is_two_statements(client, statements):
    register_worker(client, "w1")
    create_task(client)
    with statements() as sent:
        assert client.post("/api/runtime/workers/w1/claim", json={}).status_code == 201
    assert len(sent) == 2
