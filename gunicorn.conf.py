"""gunicorn settings for BLOOM Runtime: `gunicorn -c gunicorn.conf.py wsgi:app`.

Every gunicorn process builds its own app, engine and connection pool after the fork
(no preload), so no database connection is ever shared across processes. The
background jobs run in every process's scheduler but do their work once per
deployment (see bloom/scheduler.py), however many processes and hosts there are. (gunicorn
calls its processes workers: `workers`, `worker_class` and the hooks' `worker` are its words;
in BLOOM a worker is a registered node.)

A reload (SIGHUP to the master) serves exactly the code and settings on disk: gunicorn
reads this file again, BLOOM_ENV_FILE's settings with it; the new code is first booted in
a process of its own, and only if it boots are new processes started (each imports the
service afresh: the master keeps none of it for them) and the old ones retired. A reload
that would not boot is refused with one line, and the old processes keep serving.
"""
import importlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time


def _read_settings_file(path):
    """KEY=VALUE lines (systemd's EnvironmentFile, without its escapes): blank lines and
    lines starting with # or ; are skipped, one pair of surrounding quotes is taken off."""
    values = {}
    if not path:
        return values
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            key, equals, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not equals or not key.replace("_", "a").isalnum() or key[0].isdigit():
                raise ValueError(f"{path}, line {number}: not KEY=VALUE")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[key] = value
    return values


# BLOOM_ENV_FILE: the settings, read at start and again at every reload (the master's own
# environment never changes after it starts); its values win over the environment's.
_settings_file = os.environ.get("BLOOM_ENV_FILE", "").strip()
_settings_file_problem = None
try:
    _file_settings = _read_settings_file(_settings_file)
except (OSError, ValueError) as problem:
    if not os.environ.get("BLOOM_SETTINGS_ANNOUNCED"):
        raise SystemExit(f"BLOOM_ENV_FILE: {problem}") from None
    _file_settings, _settings_file_problem = {}, f"BLOOM_ENV_FILE: {problem}"  # a reload: refused below
raw_env = [f"{key}={value}" for key, value in _file_settings.items()]
_env = {**os.environ, **_file_settings}

bind = f"0.0.0.0:{_env.get('BLOOM_RUNTIME_PORT', '3002')}"
workers = int(_env.get("WEB_CONCURRENCY") or min(2 * multiprocessing.cpu_count() + 1, 12))
# Threads let a process serve while other requests wait on PostgreSQL, Membridge or a long
# poll. A waiting long poll holds a thread but no database connection, and at most
# threads - 8 of them wait at once (bloom/api/workers.py): 8 always serve short requests.
worker_class = "gthread"
threads = int(_env.get("GUNICORN_THREADS", "128"))
preload_app = False
# Longest legitimate request: a 30 s long-poll claim, or a Membridge call with its retries.
timeout = 75
graceful_timeout = 30  # SIGTERM: finish in-flight requests, then exit
keepalive = 5
# Behind the reverse proxy: the same peers the app trusts (bloom/web/proxies.py).
_trusted = _env.get("BLOOM_TRUSTED_PROXIES", "").strip()
forwarded_allow_ips = _trusted if _trusted and not _trusted.isdigit() else "127.0.0.1,::1"
_data_dir = os.path.abspath(_env.get("BLOOM_DATA_DIR") or "./.bloom")
# One control socket per instance (two instances on a host must not share one).
control_socket = os.path.join(_data_dir, f"gunicorn-{_env.get('BLOOM_RUNTIME_PORT', '3002')}.ctl")
# The app logs one line per API request (bloom/web/request_log.py: method, path, status,
# duration, request id, client): gunicorn's access log would repeat it at a cost per
# request. `--access-logfile -` turns it on, one JSON object a line.
accesslog = None
access_log_format = (
    '{"remote":"%(h)s","method":"%(m)s","path":"%(U)s","query":"%(q)s","status":%(s)s,'
    '"bytes":"%(B)s","duration_ms":%(M)s,"request_id":"%({x-request-id}o)s","agent":"%(a)s"}'
)
errorlog = "-"
loglevel = _env.get("BLOOM_LOG_LEVEL", "info").lower()


def on_starting(server):
    """Set up the host's rate-limit counters, and without DATABASE_URL start the
    embedded PostgreSQL once, in the master.

    The processes inherit its URL; the server stops when the master is gone. A setting
    the service cannot use stops the start here, with one clear line. The master imports
    only these few modules of the service, and its processes import them again (post_fork).
    """
    # Before anything imports prometheus_client: its multiprocess mode, with a fresh
    # directory for this instance's per-process files (bloom/metrics.py).
    metrics_dir = os.path.join(_data_dir, f"metrics-{_env.get('BLOOM_RUNTIME_PORT', '3002')}")
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.makedirs(metrics_dir)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

    from bloom.logs import ANNOUNCED_ENV, announce_settings
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

        os.environ["DATABASE_URL"] = start_embedded_postgres(settings.data_dir, guard=True)


def on_reload(server):
    """Before a reload starts new processes: boot the code and settings on disk in a
    process of their own, and refuse the reload (the old processes keep serving) unless
    they boot."""
    problem = _settings_file_problem or _boot_problem(server)
    if problem:
        server.log.error("reload refused, the running processes keep serving: %s", problem)
        server.cfg.set("workers", 0)  # the reload then starts no process and retires none
        # ...and does not wait (graceful_timeout, holding up the master) for the old ones
        # to exit, which they will not: the wait's limit is put back a moment later.
        graceful_timeout = server.cfg.graceful_timeout
        server.cfg.set("graceful_timeout", 0)
        threading.Timer(1.0, server.cfg.set, args=("graceful_timeout", graceful_timeout)).start()
        return
    server.log.info("reload: the code and settings on disk boot; replacing the processes")
    # gunicorn would stop the old processes as soon as the new ones are forked, before
    # they have loaded the app: for that second or two (longer on a busy host) no process
    # would accept. The old ones serve on until the new ones serve.
    old = set(server.WORKERS)
    wanted = server.num_workers
    server.num_workers = wanted + len(old)
    threading.Thread(target=_retire_when_replaced, args=(server, old, wanted), daemon=True).start()


def _retire_when_replaced(server, old, wanted, timeout_s=60.0):
    """Once `wanted` new processes serve (each has told the master it lives, which it does
    from its serving loop on), retire the old ones (they finish what they serve)."""
    first_seen = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        serving = 0
        for pid, worker in list(server.WORKERS.items()):
            if pid in old:
                continue
            try:
                stamp = worker.tmp.last_update()
            except (OSError, ValueError):
                continue
            serving += first_seen.setdefault(pid, stamp) != stamp
        if serving >= wanted:
            break
        time.sleep(0.1)
    server.num_workers = wanted
    for pid in old:  # the master's reload waits for them to exit
        server.kill_worker(pid, signal.SIGTERM)
    server.wakeup()


def _boot_problem(server):
    """What stops the app on disk from loading (None if it loads), said in one line."""
    check = ("import importlib, sys; module, _, name = sys.argv[1].partition(':'); "
             "getattr(importlib.import_module(module), name or 'application')")
    try:
        booted = subprocess.run(
            [sys.executable, "-c", check, server.app.app_uri], cwd=server.cfg.chdir,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired:
        return "the new code did not load within 60 s"
    if booted.returncode == 0:
        return None
    said = [line for line in booted.stderr.splitlines() if line.strip()]
    return f"the new code does not load: {said[-1] if said else f'exit status {booted.returncode}'}"


def pre_fork(server, worker):
    # The processes of the first start: if they cannot load the app, the start fails (as
    # gunicorn does). Any later one (a replacement, a reload's) must not take the service
    # down with it: see _load_or_retry.
    forked = getattr(server, "bloom_forked", 0)
    server.bloom_forked = forked + 1
    worker.bloom_first_start = forked < server.num_workers


def post_fork(server, worker):
    _import_service_afresh()
    from bloom.web import server_errors

    server_errors.install()
    if not worker.bloom_first_start:
        worker.load_wsgi = _load_or_retry(worker, worker.load_wsgi)


def _load_or_retry(worker, load_wsgi):
    """A process started after the first start that cannot load the code on disk (it is
    being deployed under it, or a refused reload left broken code there) exits as any
    failed process does, and the master starts another a moment later while the others
    serve on; gunicorn would instead stop the whole service ("Worker failed to boot")."""

    def load():
        try:
            load_wsgi()
        except Exception:
            worker.log.exception("this process could not load the code on disk; another is started in 2 s")
            time.sleep(2)
            os._exit(1)

    return load


def _import_service_afresh():
    """Forget the modules of the service the master imported at its start, so that this
    process imports all of it from disk (after a reload: the new code), keeping only the
    host's rate-limit table (shared memory, made once by the master)."""
    inherited = sys.modules.get("bloom.web.rate_limit_store")
    counters = inherited.host_counters() if inherited else None
    for name in [name for name in sys.modules if name in ("bloom", "wsgi") or name.startswith("bloom.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    if counters is not None:
        from bloom.web.rate_limit_store import adopt_host_counters

        adopt_host_counters(counters)


def child_exit(server, worker):
    """A dead process's live gauges no longer count (its counters do). Not through
    bloom.metrics: the master imports no module that registers metrics (a process forked
    after that would register them a second time, and fail to boot)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    import gc

    from bloom import start_background_jobs
    from bloom.services import services

    start_background_jobs(worker.wsgi)
    # A terminal's Ctrl-C reaches every process of the group; the master then tells each
    # process to quit (SIGQUIT). Heard twice, gunicorn's quit handler deadlocks on its
    # thread pool's lock until the master kills the process 30 s later: hear it once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
