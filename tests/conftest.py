"""Fixtures: a real PostgreSQL (TEST_DATABASE_URL, or an embedded one the run starts),
a fresh database per test cloned from a template, the Flask app and its test client."""
from __future__ import annotations

import os
import uuid

import pytest

from bloom import create_app, stop_background_jobs
from bloom.services import services
from bloom.settings import Settings

from .fake_agent import AGENT_KEY, FakeAgent
from .fake_membridge import ADMIN_KEY, FakeMembridge
from .support import GunicornServer, PostgresCluster, SeaweedS3, start_embedded_cluster


@pytest.fixture(scope="session")
def postgres() -> PostgresCluster:
    admin_url = os.environ.get("TEST_DATABASE_URL", "").strip()
    server = None
    if not admin_url:
        admin_url, server = start_embedded_cluster()
    # Under pytest-xdist every process of the run has a template of its own.
    cluster = PostgresCluster(admin_url, template=f"bloom_test_template_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    cluster.create_template()
    yield cluster
    cluster.dispose()
    if server is not None:
        server.cleanup()


@pytest.fixture
def database_url(postgres: PostgresCluster) -> str:
    name = postgres.create_database()
    yield postgres.url_for(name)
    postgres.drop_database(name)


def make_settings(database_url: str, **env: str) -> Settings:
    return Settings.from_env({
        "DATABASE_URL": database_url,
        "BLOOM_RATE_LIMIT": "100000 per minute",
        "BLOOM_TEST_CONNECTION_RATE_LIMIT": "100000 per minute",
        **env,
    })


@pytest.fixture
def app(database_url: str):
    app = create_app(make_settings(database_url))
    yield app
    stop_background_jobs(app)
    services(app).database.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def leases(app):
    return services(app).leases


@pytest.fixture(scope="module")
def module_database_url(postgres: PostgresCluster) -> str:
    name = postgres.create_database()
    yield postgres.url_for(name)
    postgres.drop_database(name)


@pytest.fixture(scope="module")
def server(module_database_url: str):
    """gunicorn with three workers on a database of this test module."""
    served = GunicornServer({"DATABASE_URL": module_database_url})
    yield served
    served.stop()


@pytest.fixture(scope="session")
def s3():
    """One SeaweedFS S3 server for the run; each test uses a bucket of its own."""
    server = SeaweedS3()
    yield server
    server.stop()


@pytest.fixture
def bucket():
    """A bucket of this test's own in the session's S3 server."""
    return f"bloom-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def s3_app(database_url, s3, bucket):
    """The app with its artifacts in the real S3 server."""
    app = create_app(make_settings(database_url, **s3.env(bucket)))
    yield app
    services(app).database.dispose()


@pytest.fixture
def membridge():
    """A real HTTP server speaking the Membridge contract, on a free local port."""
    upstream = FakeMembridge(admin_key=ADMIN_KEY)
    yield upstream
    upstream.stop()


@pytest.fixture
def membridge_app(database_url, membridge):
    app = create_app(make_settings(database_url, MEMBRIDGE_SERVER_URL=membridge.url, MEMBRIDGE_ADMIN_KEY=ADMIN_KEY))
    yield app
    services(app).database.dispose()


@pytest.fixture
def agents():
    started: list[FakeAgent] = []

    def start(name: str, **options) -> FakeAgent:
        agent = FakeAgent(name, **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()


@pytest.fixture
def fleet_server(database_url, membridge):
    """gunicorn that pushes tasks: BLOOM_PUBLIC_URL is its own address; fast sync rounds."""
    servers: list[GunicornServer] = []

    def start(listen_socket=None, **env) -> GunicornServer:
        served = GunicornServer(
            {"DATABASE_URL": database_url, "MEMBRIDGE_SERVER_URL": membridge.url, "MEMBRIDGE_ADMIN_KEY": ADMIN_KEY,
             "MEMBRIDGE_AGENT_KEY": AGENT_KEY, "WORKER_SYNC_INTERVAL_S": "0.5", **env},
            workers=2, public=True, listen_socket=listen_socket,
        )
        servers.append(served)
        return served

    yield start
    for served in servers:
        served.stop()
        assert AGENT_KEY not in served.log() and ADMIN_KEY not in served.log()


# `make test-quick` runs the tests that start no server or process (`-m "not slow"`).
# A test is slow when it uses one of these fixtures, directly or through another one:
# each starts a server of its own (gunicorn, redis-server, nginx, SeaweedFS) or stand-in
# agents. A test that starts a process in its own body says so with @pytest.mark.slow;
# under `make test-quick` the test servers refuse to start (tests/support.py), so a
# test that forgets to say it fails there instead of slowing the quick run down.
SERVER_FIXTURES = {"server", "fleet_server", "served", "s3", "agents", "limited_server", "fuzz_server",
                   "redis_url", "nginx_front"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts servers or processes (left out by make test-quick)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
