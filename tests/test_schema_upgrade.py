"""A database the Express service created keeps working, and is mended on start."""
from __future__ import annotations

from sqlalchemy import create_engine, text

from bloom import create_app
from bloom.services import services

from .conftest import make_settings

# The tables as the Express service left them: no priority, no idempotency key, no
# indexes of ours, and a task with two 'active' leases from its double-lease bug.
EXPRESS_SCHEMA = """
CREATE TABLE llm_tasks (id text PRIMARY KEY, context_id text NOT NULL, agent_slug text NOT NULL,
  prompt text NOT NULL, context_hints jsonb NOT NULL DEFAULT '[]', policy jsonb NOT NULL,
  desired_format text NOT NULL DEFAULT 'text', status text NOT NULL DEFAULT 'queued',
  created_at bigint NOT NULL, updated_at bigint NOT NULL, lease_id text, worker_id text,
  attempts integer NOT NULL DEFAULT 0, max_attempts integer NOT NULL DEFAULT 3);
CREATE TABLE leases (id text PRIMARY KEY, task_id text NOT NULL, worker_id text NOT NULL,
  started_at bigint NOT NULL, expires_at bigint NOT NULL, ttl_seconds integer NOT NULL,
  status text NOT NULL DEFAULT 'active', last_heartbeat bigint NOT NULL, context_id text);
CREATE TABLE workers (id text PRIMARY KEY, node_id text, url text, status text NOT NULL,
  capabilities jsonb NOT NULL, last_heartbeat bigint, ip_addrs jsonb NOT NULL DEFAULT '[]',
  obs_count integer NOT NULL DEFAULT 0, db_sha text, registered_at bigint NOT NULL);
CREATE TABLE users (id text PRIMARY KEY);
INSERT INTO workers VALUES ('old-worker', 'old-worker', NULL, 'online',
  '{"claude_cli": true, "max_concurrency": 2, "labels": []}', 1700000000000, '[]', 0, NULL, 1700000000000);
INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, policy, status, created_at, updated_at,
  lease_id, worker_id, attempts)
  VALUES ('old-task', 'ctx', 'agent', 'prompt', '{"timeout_sec": 120, "budget": 0}', 'leased',
          1700000000000, 1700000000000, 'current-lease', 'old-worker', 2);
INSERT INTO leases VALUES
  ('current-lease', 'old-task', 'old-worker', 1700000000000, 4102444800000, 300, 'active', 1700000000000, 'ctx'),
  ('extra-lease', 'old-task', 'old-worker', 1700000000000, 4102444800000, 300, 'active', 1700000000000, 'ctx');
"""


def test_an_express_database_is_upgraded_in_place_and_keeps_working(postgres):
    name = postgres.create_database()
    url = postgres.url_for(name)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for table in ("llm_tasks", "leases", "workers", "runtime_artifacts", "llm_results", "audit_logs",
                          "runtime_settings"):
                conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
            conn.execute(text(EXPRESS_SCHEMA))

        app = create_app(make_settings(url))  # applies schema.sql at start
        client = app.test_client()

        task = client.get("/api/runtime/llm-tasks/old-task").get_json()
        assert (task["status"], task["priority"], task["lease_id"]) == ("leased", 0, "current-lease")
        leases = {lease["id"]: lease["status"] for lease in client.get("/api/runtime/leases").get_json()}
        assert leases == {"current-lease": "active", "extra-lease": "expired"}
        assert client.get("/api/runtime/workers/old-worker").get_json()["active_leases"] == 1

        done = client.post("/api/runtime/llm-tasks/old-task/complete",
                           json={"status": "success", "output": "kept", "metrics": {"duration_ms": 1}})
        assert done.status_code == 200
        assert client.post("/api/runtime/llm-tasks", json={"context_id": "c", "agent_slug": "a", "prompt": "p",
                                                          "priority": 3}).status_code == 201
        with engine.connect() as conn:
            indexes = {row[0] for row in conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'leases'"))}
            users_rows = conn.execute(text("SELECT count(*) FROM users")).scalar()
        assert "leases_one_active_per_task" in indexes
        assert users_rows == 0  # another service's table: left as it was
        create_app(make_settings(url))  # applying the schema again changes nothing and does not fail
        services(app).database.dispose()
    finally:
        engine.dispose()
        postgres.drop_database(name)


def test_a_start_with_the_schema_current_runs_no_ddl(database_url):
    """The DDL (ALTER TABLE locks its table even when nothing changes) runs only when
    schema.sql changed since it was applied: a restart takes no table locks."""
    from bloom.db import Database, apply_schema

    database = Database(database_url)
    try:
        assert apply_schema(database) is False  # the test database has this very schema
        assert apply_schema(database, force=True) is True  # flask init-db applies it anyway
        with database.autocommit() as tx:
            tx.execute("put_setting", key="schema_sha256", value="an older schema", now=1)
        assert apply_schema(database) is True  # a new schema.sql is applied once...
        assert apply_schema(database) is False  # ...and then skipped
    finally:
        database.dispose()


def test_a_start_recreates_a_table_that_a_partial_restore_left_out(database_url):
    """A restore of some tables (runtime_settings, with the applied schema's digest, among
    them) made the next start skip the DDL: GET /projects answered 500 for ever."""
    app = create_app(make_settings(database_url))
    services(app).database.dispose()
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE project_node_status; DROP TABLE managed_projects"))
    engine.dispose()
    app = create_app(make_settings(database_url))  # the start after the restore
    try:
        assert app.test_client().get("/api/runtime/projects").status_code == 200
    finally:
        services(app).database.dispose()
