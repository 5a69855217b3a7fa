"""With no DATABASE_URL the service starts its own PostgreSQL and keeps its data there."""
from __future__ import annotations

import pytest
import requests

from .support import GunicornServer

pytestmark = pytest.mark.slow  # every test here starts servers or processes of its own


def test_service_runs_on_an_embedded_postgresql_and_keeps_data_across_restarts(tmp_path):
    env = {"DATABASE_URL": "", "BLOOM_DATA_DIR": str(tmp_path / "data")}
    served = GunicornServer(env, workers=2)
    try:
        health = requests.get(served.url("/api/runtime/health"), timeout=5).json()
        assert health["storage"] == "postgresql"
        created = requests.post(
            served.url("/api/runtime/llm-tasks"),
            json={"context_id": "c", "agent_slug": "a", "prompt": "kept"},
            timeout=10,
        )
        assert created.status_code == 201
    finally:
        served.stop()
    assert (tmp_path / "data" / "pgdata" / "PG_VERSION").exists()

    restarted = GunicornServer(env, workers=2)
    try:
        tasks = requests.get(restarted.url("/api/runtime/llm-tasks"), timeout=5).json()
        assert [task["prompt"] for task in tasks] == ["kept"]
    finally:
        restarted.stop()
    # Start and stop speak once per instance: no process dumps, no line per worker at exit.
    log = restarted.log()
    assert "remaining pids" not in log and "PostmasterInfo" not in log
    assert log.count("RUNTIME_API_KEY is not set") == 1
