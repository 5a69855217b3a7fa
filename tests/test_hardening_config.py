"""Configuration a process cannot live with is refused at start, with one clear line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bloom.services import services
from bloom.settings import ConfigError, Settings

from .support import REPO_ROOT, free_port


@pytest.mark.parametrize("name, value", [
    ("WORKER_SYNC_INTERVAL_S", "0"),
    ("WORKER_SYNC_INTERVAL_S", "-5"),
    ("LEASE_SWEEP_INTERVAL_S", "0"),
    ("BLOOM_PRUNE_INTERVAL_S", "-1"),
    ("BLOOM_WORKER_LIVENESS_S", "0"),
    ("BLOOM_RETENTION_COMPLETED_S", "-1"),
    ("BLOOM_RETENTION_AUDIT_S", "-86400"),
    ("BLOOM_DB_POOL_SIZE", "0"),
    ("BLOOM_MAX_BODY_BYTES", "0"),
    ("BLOOM_RUNTIME_PORT", "70000"),
    ("BLOOM_PROXY_HOPS", "-1"),
    ("BLOOM_DB_STATEMENT_TIMEOUT_MS", "abc"),
])
def test_a_setting_the_service_cannot_use_is_refused_by_name(name, value):
    env = {name: value}
    if name == "BLOOM_PROXY_HOPS":
        env["BLOOM_TRUSTED_PROXIES"] = "10.0.0.5"
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    assert name in str(refused.value)


def test_zero_retention_still_means_keep_for_ever():
    assert Settings.from_env({"BLOOM_RETENTION_FAILED_S": "0"}).retention_failed_s == 0


@pytest.mark.slow  # starts processes of its own
def test_gunicorn_refuses_to_start_with_a_zero_interval_and_says_why(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "WORKER_SYNC_INTERVAL_S": "0", "BLOOM_RUNTIME_PORT": str(free_port()),
             "BLOOM_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    assert result.returncode != 0
    assert "configuration error: WORKER_SYNC_INTERVAL_S must be a number of seconds from 0.05" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option, value", [("--ttl", "0"), ("--ttl", "-3"), ("--wait", "-1"), ("--wait", "31"),
                                           ("--grace", "-1"), ("--concurrency", "0")])
@pytest.mark.slow  # starts processes of its own
def test_the_worker_client_refuses_intervals_that_would_spin(option, value):
    result = subprocess.run(
        [sys.executable, "-m", "bloom.worker", "--server", "http://127.0.0.1:9", "--name", "w", option, value,
         "--", "true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and option in result.stderr


def test_wrong_metrics_tokens_are_throttled_and_the_right_one_never_is(database_url):
    from bloom import create_app

    from .conftest import make_settings

    app = create_app(make_settings(database_url, BLOOM_METRICS_KEY="scrape-secret", BLOOM_RATE_LIMIT="5 per minute"))
    try:
        client = app.test_client()
        guesses = [client.get("/metrics", headers={"Authorization": f"Bearer guess-{n}"}).status_code
                   for n in range(8)]
        assert guesses == [401] * 5 + [429] * 3
        for _ in range(8):  # the scraper with the key is not counted, nor held back by the guesser
            assert client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}).status_code == 200
    finally:
        services(app).database.dispose()


def test_large_bodies_are_handled_a_few_at_a_time_and_the_rest_told_to_come_back(database_url):
    from bloom import create_app

    from .conftest import make_settings
    from .helpers import TASK

    app = create_app(make_settings(database_url, BLOOM_LARGE_BODIES_AT_ONCE="1"))
    try:
        client = app.test_client()
        gate = app.extensions["bloom.large_bodies"]
        gate.WAIT_S = 0.2
        big = {"tasks": [{**TASK, "prompt": "x" * 600_000}, {**TASK, "prompt": "y" * 600_000}]}
        assert gate.take()  # another request is handling a large body
        busy = client.post("/api/runtime/llm-tasks/batch", json=big)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
        assert client.post("/api/runtime/llm-tasks", json=TASK).status_code == 201  # small ones pass
        gate.give_back()
        assert client.post("/api/runtime/llm-tasks/batch", json=big).status_code == 201
        assert client.post("/api/runtime/llm-tasks/batch", json=big).status_code == 201  # its slot came back
    finally:
        services(app).database.dispose()


@pytest.mark.parametrize("value", ["inf", "nan", "1e-6", "0.001", "1e12"])
def test_intervals_must_be_finite_and_not_absurdly_short(value):
    """`inf` passed the check and killed every process with OverflowError when a timer was
    armed with it; a microsecond kept a process at 71 % of a core."""
    with pytest.raises(ConfigError, match="WORKER_SYNC_INTERVAL_S must be a number of seconds from"):
        Settings.from_env({"WORKER_SYNC_INTERVAL_S": value})
    assert Settings.from_env({"WORKER_SYNC_INTERVAL_S": "0.5"}).worker_sync_interval_s == 0.5
