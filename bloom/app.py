"""The service: the Flask app factory, its background jobs, and what start-up says."""
from __future__ import annotations

import logging
import os

import click
from flask import Flask
from sqlalchemy.exc import DBAPIError

from .agents.client import AgentClient, AgentNetworks
from .agents.dispatch import Dispatcher
from .agents.liveness import probe_push_workers, probe_round_budget_s
from .agents.operations import AgentOperations
from .api.converters import WorkerIdConverter
from .artifacts import MinioArtifactStore
from .db import Database, apply_schema
from .large_bodies import LargeBodies
from .leases.service import LeaseService
from .logs import ANNOUNCED_ENV, announce_settings, configure_logging
from .membridge.client import MembridgeClient, UpstreamHealth
from .membridge.settings import MembridgeSettingsStore
from .projects.service import ProjectService
from .queue_events import QueueEvents, WaitingRoom
from .records.retention import RetentionPolicy, prune
from .records.service import RecordService
from .scheduler import Job, start_scheduler
from .services import EXTENSION_KEY, Services, services
from .settings import Settings
from .tasks.service import TaskService
from .web.error_handlers import register_error_handlers
from .web.guards import install_api_key_check, install_request_guards
from .web.jsonio import OrjsonProvider
from .web.proxies import TrustedProxies
from .web.rate_limits import LIMITER_KEY, init_limiter
from .web.request_log import install_request_log
from .workers.service import WorkerService
from .workers.sync import run_worker_sync

log = logging.getLogger("bloom")


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL, or an embedded PostgreSQL under BLOOM_DATA_DIR when it is unset."""
    if settings.database_url:
        return settings.database_url
    from .embedded_postgres import start_embedded_postgres

    return start_embedded_postgres(settings.data_dir)


class BloomFlask(Flask):
    """Flask, with each view's and hook's sync check made once per function: Flask asks
    `inspect.iscoroutinefunction` of every before/after-request hook on every request
    (about ten per request here), and the answer never changes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sync_callables: dict = {}

    def ensure_sync(self, func):
        callable_ = self._sync_callables.get(func)
        if callable_ is None:
            callable_ = self._sync_callables.setdefault(func, super().ensure_sync(func))
        return callable_


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging()
    app = BloomFlask(__name__)
    app.url_map.converters["worker_id"] = WorkerIdConverter
    app.url_map.merge_slashes = False  # a worker id may hold "//"; never a redirect
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json = OrjsonProvider(app)
    app.wsgi_app = TrustedProxies(app.wsgi_app, settings.trusted_proxy_networks,  # type: ignore[method-assign]
                                  settings.proxy_hops)

    database = Database(
        resolve_database_url(settings),
        pool_size=settings.db_pool_size,
        connect_timeout_s=settings.db_connect_timeout_s,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        lock_timeout_ms=settings.db_lock_timeout_ms,
    )
    artifact_store = MinioArtifactStore(settings.minio) if settings.minio else None
    leases = LeaseService(database, artifact_store, max_running_per_key=settings.max_running_per_key)
    records = RecordService(database, artifact_store)
    queue_events = QueueEvents(database.engine)
    # Bodies over 1 MiB held at once by this process: requests' and agents' answers alike.
    large_bodies = LargeBodies(settings.large_bodies_at_once)
    agents = AgentClient(settings.agent_key, AgentNetworks(settings.agent_networks),
                         max_answer_bytes=settings.max_body_bytes, large_bodies=large_bodies)
    membridge_settings = MembridgeSettingsStore(
        database,
        default_server_url=settings.membridge_server_url,
        default_admin_key=settings.membridge_admin_key,
    )
    membridge = MembridgeClient(
        membridge_settings.target, UpstreamHealth(on_change=membridge_settings.publish_upstream_status)
    )
    app.extensions[EXTENSION_KEY] = Services(
        settings=settings,
        database=database,
        queue_events=queue_events,
        waiting_room=WaitingRoom(settings.max_waiting_claims),
        tasks=TaskService(database, queue_events.announce),
        leases=leases,
        workers=WorkerService(database),
        records=records,
        projects=ProjectService(database, agents, membridge, records),
        agents=agents,
        agent_ops=AgentOperations(database, agents, records),
        dispatcher=Dispatcher(leases, records, database, agents, queue_events, public_url=settings.public_url,
                              callback_key=settings.runtime_api_key),
        membridge_settings=membridge_settings,
        membridge=membridge,
    )

    from .api import register_blueprints

    register_blueprints(app)
    register_error_handlers(app)
    install_request_log(app)  # first, so that even a refused request gets an id and a log line
    install_request_guards(app, settings, large_bodies)
    app.extensions[LIMITER_KEY] = init_limiter(app, settings)
    install_api_key_check(app, settings)
    _register_cli(app, database)

    if not os.environ.get(ANNOUNCED_ENV):  # under gunicorn the master said it, once
        announce_settings(settings)
    try:
        apply_schema(database)
    except DBAPIError as error:
        # Start anyway: requests answer 503 until the database is back, then work.
        log.error("could not apply the schema at start: %s", type(error.orig).__name__)
    return app


def start_background_jobs(app: Flask) -> None:
    """Start the scheduler of a serving process (gunicorn's post_worker_init calls this).

    Not started by create_app, so `flask init-db` and test apps run no jobs.
    """
    built = services(app)
    settings = built.settings
    if not settings.run_scheduler or built.scheduler is not None:
        return
    leases, records, database, agents = built.leases, built.records, built.database, built.agents

    # Two jobs at one interval: the runtime's own probes never wait behind a slow Membridge.
    probe_budget_s = probe_round_budget_s(settings.worker_sync_interval_s)
    policy = RetentionPolicy(settings.retention_completed_s, settings.retention_failed_s, settings.retention_audit_s)
    jobs = [
        Job("lease-sweep", settings.lease_sweep_interval_s, leases.sweep_expired_leases),
        Job("worker-sync", settings.worker_sync_interval_s,
            lambda: run_worker_sync(built.membridge, database, liveness_s=settings.worker_liveness_s)),
        Job("worker-probe", settings.worker_sync_interval_s,
            lambda: probe_push_workers(database, agents, budget_s=probe_budget_s)),
        Job("retention", settings.prune_interval_s, lambda: prune(database, records.artifacts, policy)),
    ]
    built.scheduler = start_scheduler(database, jobs)
    built.membridge_settings.refresh_in_background()
    if settings.dispatch_enabled:
        built.dispatcher.start()


def stop_background_jobs(app: Flask) -> None:
    """Stop this process's scheduler and dispatcher (gunicorn's worker_exit calls this,
    once the process has served its last request)."""
    built: Services | None = getattr(app, "extensions", {}).get(EXTENSION_KEY)
    if built is None:
        return
    if built.scheduler is not None and built.scheduler.running:
        built.scheduler.shutdown(wait=False)
    built.dispatcher.stop()
    built.queue_events.close()


def _register_cli(app: Flask, database: Database) -> None:
    @app.cli.command("init-db")
    def init_db() -> None:
        """Create the tables and indexes of schema.sql (idempotent)."""
        apply_schema(database, force=True)
        click.echo("schema applied")
