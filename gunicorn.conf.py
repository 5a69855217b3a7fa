"""gunicorn settings for BLOOM Runtime: `gunicorn -c gunicorn.conf.py wsgi:app`.

Every gunicorn process builds its own app, engine and connection pool after the fork
(no preload), so no database connection is ever shared across processes. The
background jobs run in every process's scheduler but do their work once per
deployment (see bloom/scheduler.py), however many processes and hosts there are. (gunicorn
calls its processes workers: `workers`, `worker_class` and the hooks' `worker` are its words;
in BLOOM a worker is a registered node.)
"""
import multiprocessing
import os
import shutil

bind = f"0.0.0.0:{os.environ.get('BLOOM_RUNTIME_PORT', '3002')}"
workers = int(os.environ.get("WEB_CONCURRENCY") or min(2 * multiprocessing.cpu_count() + 1, 12))
# Threads let a process serve while other requests wait on PostgreSQL, Membridge or a long
# poll. A waiting long poll holds a thread but no database connection, and at most
# threads - 8 of them wait at once (bloom/api/workers.py): 8 always serve short requests.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "128"))
preload_app = False
# Longest legitimate request: a 30 s long-poll claim, or a Membridge call with its retries.
timeout = 75
graceful_timeout = 30  # SIGTERM: finish in-flight requests, then exit
keepalive = 5
# Behind the reverse proxy: the same peers the app trusts (bloom/web/proxies.py).
_trusted = os.environ.get("BLOOM_TRUSTED_PROXIES", "").strip()
forwarded_allow_ips = _trusted if _trusted and not _trusted.isdigit() else "127.0.0.1,::1"
_data_dir = os.path.abspath(os.environ.get("BLOOM_DATA_DIR") or "./.bloom")
# One control socket per instance (two instances on a host must not share one).
control_socket = os.path.join(_data_dir, f"gunicorn-{os.environ.get('BLOOM_RUNTIME_PORT', '3002')}.ctl")
# The app logs one line per API request (bloom/web/request_log.py: method, path, status,
# duration, request id, client): gunicorn's access log would repeat it at a cost per
# request. `--access-logfile -` turns it on, one JSON object a line.
accesslog = None
access_log_format = (
    '{"remote":"%(h)s","method":"%(m)s","path":"%(U)s","query":"%(q)s","status":%(s)s,'
    '"bytes":"%(B)s","duration_ms":%(M)s,"request_id":"%({x-request-id}o)s","agent":"%(a)s"}'
)
errorlog = "-"
loglevel = os.environ.get("BLOOM_LOG_LEVEL", "info").lower()


def on_starting(server):
    """Set up the host's rate-limit counters, and without DATABASE_URL start the
    embedded PostgreSQL once, in the master.

    The processes inherit its URL; the master stops the server when it exits. A setting
    the service cannot use stops the start here, with one clear line.
    """
    # Before anything imports prometheus_client: its multiprocess mode, with a fresh
    # directory for this instance's per-process files (bloom/metrics.py).
    metrics_dir = os.path.join(_data_dir, f"metrics-{os.environ.get('BLOOM_RUNTIME_PORT', '3002')}")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    from bloom import ANNOUNCED_ENV, announce_settings
    from bloom.settings import ConfigError, Settings

    try:
        settings = Settings.from_env()
    except ConfigError as problem:
        server.log.error("configuration error: %s", problem)
        raise SystemExit(2) from None
    announce_settings(settings)  # once, here, not once per process
    os.environ[ANNOUNCED_ENV] = "1"

    from bloom.web.rate_limit_store import share_counters_across_workers

    # Before any fork: every process inherits one table, so `memory://` limits hold per
    # client across all processes of this host.
    share_counters_across_workers()
    if not os.environ.get("DATABASE_URL", "").strip():
        from bloom.embedded_postgres import start_embedded_postgres

        os.environ["DATABASE_URL"] = start_embedded_postgres(os.environ.get("BLOOM_DATA_DIR") or "./.bloom")


def post_fork(server, worker):
    from bloom.web import server_errors

    server_errors.install()


def child_exit(server, worker):
    from bloom.metrics import forget_process

    forget_process(worker.pid)


def post_worker_init(worker):
    import gc

    from bloom import start_background_jobs
    from bloom.services import services

    start_background_jobs(worker.wsgi)
    if not os.environ.get("BLOOM_MAX_WAITING_CLAIMS"):
        # However the thread count was given (env or --threads): 8 stay for short requests.
        services(worker.wsgi).waiting_room.resize(worker.cfg.threads - 8)
    # What exists now (modules, the app, its schemas, SQL and pools) lives as long as the
    # process: keep it out of the cyclic collector. Its full passes over all of it took
    # 50-150 ms under load, a pause for every thread of the process (docs/PERFORMANCE.md).
    gc.freeze()


def worker_exit(server, worker):
    """Stop the background jobs before the interpreter winds down: a tick that fires
    after that could no longer be run (and would log a traceback)."""
    from bloom import stop_background_jobs

    stop_background_jobs(worker.wsgi)
