"""gunicorn settings for BLOOM Runtime: `gunicorn -c gunicorn.conf.py wsgi:app`."""
import multiprocessing
import os

bind = f"0.0.0.0:{os.environ.get('BLOOM_RUNTIME_PORT', '3002')}"
# Several processes; each builds its own app, engine and pool after the fork.
workers = int(os.environ.get("WEB_CONCURRENCY", min(2 * multiprocessing.cpu_count() + 1, 8)))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread"
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}i)s'
errorlog = "-"
loglevel = os.environ.get("BLOOM_LOG_LEVEL", "info").lower()


def on_starting(server):
    """Without DATABASE_URL, start the embedded PostgreSQL once, in the master.

    The workers inherit its URL; the master stops the server when it exits.
    """
    if not os.environ.get("DATABASE_URL", "").strip():
        from bloom.embedded_postgres import start_embedded_postgres

        os.environ["DATABASE_URL"] = start_embedded_postgres(os.environ.get("BLOOM_DATA_DIR") or "./.bloom")


def post_worker_init(worker):
    from bloom import start_background_jobs

    start_background_jobs(worker.wsgi)
