"""Changing a running service as the README says: a reload (SIGHUP to gunicorn's master)
serves the code and settings on disk, one whose code would not boot leaves the old
processes serving, and a terminal's Ctrl-C stops everything, the embedded PostgreSQL
with it (#31)."""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from .support import REPO_ROOT, GunicornServer, wait_until

pytestmark = pytest.mark.slow  # every test here starts servers of its own

NOT_FOUND = ('404: "Not found",', '404: "Not found (the new release)",')


def _copy_of_the_service(into: Path) -> Path:
    """What a deployment's directory holds: the code, the entry point, the settings."""
    into.mkdir()
    shutil.copytree(REPO_ROOT / "bloom", into / "bloom", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("wsgi.py", "gunicorn.conf.py", "schema.sql"):
        shutil.copy2(REPO_ROOT / name, into / name)
    return into


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} in {path}"
    path.write_text(text.replace(old, new))


def _not_found_messages(served: GunicornServer, requests_made: int = 12) -> set[str]:
    """The 404 message of each of a dozen requests on fresh connections (spread over
    the processes): bloom/web/error_handlers.py is imported by the app at its start."""
    return {requests.get(served.url("/no-such-page"), timeout=5, headers={"Connection": "close"}).json()["error"]
            for _ in range(requests_made)}


def _tasks_status(served: GunicornServer, key: str) -> int:
    return requests.get(served.url("/api/runtime/llm-tasks"), headers={"X-Runtime-API-Key": key}, timeout=5).status_code


def _processes(served: GunicornServer) -> set[int]:
    return {child.pid for child in psutil.Process(served.process.pid).children()}


def _booted(served: GunicornServer) -> bool:
    """Every process has imported the app (an importing process has one thread; a booted
    one runs its background jobs): the code on disk may change now without failing the
    first start, which gunicorn ends when a process cannot load the app."""
    return all(psutil.Process(pid).num_threads() > 1 for pid in _processes(served))


def _hang_up(served: GunicornServer) -> set[int]:
    """SIGHUP to the master; the processes serving before it."""
    before = _processes(served)
    os.kill(served.process.pid, signal.SIGHUP)
    return before


def _replaced(served: GunicornServer, old: set[int], what: str) -> None:
    """Wait until none of the `old` processes serves any more (they serve until the new ones do)."""
    wait_until(lambda: not (old & _processes(served)), timeout=60, interval=0.2, what=what)


def test_a_reload_serves_the_code_and_the_settings_on_disk(database_url, tmp_path):
    tree = _copy_of_the_service(tmp_path / "release")
    settings = tmp_path / "bloom.env"
    settings.write_text("# the operator's settings\nRUNTIME_API_KEY=first-key\n")
    served = GunicornServer({"DATABASE_URL": database_url, "BLOOM_ENV_FILE": str(settings)}, workers=3, cwd=tree)
    try:
        assert _not_found_messages(served) == {"Not found"}
        assert _tasks_status(served, "first-key") == 200 and _tasks_status(served, "second-key") == 401

        # A process that dies is replaced (the master's own modules must not get in the way
        # of the replacement's imports), before and after the reload.
        wait_until(lambda: _booted(served), timeout=30, what="every process to boot")
        first = _processes(served)
        os.kill(min(first), signal.SIGKILL)
        wait_until(lambda: len(_processes(served) - first) == 1, timeout=30, what="a replacement process")
        wait_until(lambda: _not_found_messages(served) == {"Not found"}, timeout=30, what="the replacement to serve")

        _edit(tree / "bloom/web/error_handlers.py", *NOT_FOUND)
        settings.write_text("RUNTIME_API_KEY='second-key'\n")
        _replaced(served, _hang_up(served), "the old processes to be retired")
        assert _not_found_messages(served) == {"Not found (the new release)"}
        os.kill(min(_processes(served)), signal.SIGKILL)
        wait_until(lambda: len(_processes(served)) == 3 and _tasks_status(served, "second-key") == 200, timeout=30,
                   what="a replacement process")
        assert _not_found_messages(served) == {"Not found (the new release)"}
        assert _tasks_status(served, "second-key") == 200 and _tasks_status(served, "first-key") == 401
        assert "reload: the code and settings on disk boot" in served.log()
    finally:
        served.stop()
        print(served.log())  # shown when the test fails


def test_a_reload_whose_code_does_not_boot_leaves_the_old_processes_serving(database_url, tmp_path):
    tree = _copy_of_the_service(tmp_path / "release")
    served = GunicornServer({"DATABASE_URL": database_url}, workers=2, cwd=tree)
    try:
        wait_until(lambda: _booted(served), timeout=30, what="every process to boot")
        handlers = tree / "bloom/web/error_handlers.py"
        handlers.write_text(handlers.read_text() + "\nfrom bloom.http import load_body  # a module gone\n")
        _hang_up(served)
        wait_until(lambda: "reload refused" in served.log(), timeout=30, what="the reload to be refused")
        refused = next(line for line in served.log().splitlines() if "reload refused" in line)
        assert "No module named 'bloom.http'" in refused
        # The old processes serve on, and no new process tried to boot.
        until = time.monotonic() + 3
        while time.monotonic() < until:
            assert _not_found_messages(served, 3) == {"Not found"}
        assert served.process.poll() is None
        assert "Worker failed to boot" not in served.log()
        # A process that dies now is replaced from the broken code on disk: the replacement
        # fails and is tried again, while the other process serves on (gunicorn stopped the
        # whole service at the first such failure).
        os.kill(min(_processes(served)), signal.SIGKILL)
        wait_until(lambda: served.log().count("could not load the code on disk") >= 2, timeout=30,
                   what="the replacement to fail twice")
        assert _not_found_messages(served, 3) == {"Not found"} and served.process.poll() is None

        # Mended on disk, the next reload serves it.
        handlers.write_text((REPO_ROOT / "bloom/web/error_handlers.py").read_text().replace(*NOT_FOUND))
        _replaced(served, _hang_up(served), "the old processes to be retired")
        assert _not_found_messages(served) == {"Not found (the new release)"}
    finally:
        served.stop()
        print(served.log())  # shown when the test fails


def _postmaster_running(data_dir: Path) -> bool:
    return (data_dir / "pgdata" / "postmaster.pid").exists()


def test_ctrl_c_stops_the_service_and_its_embedded_postgresql_at_once(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to every process of the group (make, the master,
    its processes); the service stops within seconds, none of its processes killed."""
    data = tmp_path / "data"
    served = GunicornServer({"DATABASE_URL": "", "BLOOM_DATA_DIR": str(data)}, workers=3)
    try:
        # A request in every process, and the background jobs have run once.
        assert requests.get(served.url("/api/runtime/llm-tasks"), timeout=5).status_code == 200
        time.sleep(2)
        started = time.monotonic()
        os.killpg(served.process.pid, signal.SIGINT)
        served.process.wait(timeout=20)
        took = time.monotonic() - started
    finally:
        served.stop()
        print(served.log())  # shown when the test fails
    assert took < 5, f"{took:.1f} s to stop"
    assert "SIGKILL" not in served.log() and "Traceback" not in served.log()
    wait_until(lambda: not _postmaster_running(data), timeout=10, what="the embedded PostgreSQL to stop")


def test_the_embedded_postgresql_stops_when_the_master_was_killed(tmp_path):
    """A master killed outright (SIGKILL, out of memory) runs no exit handler: its guard
    stops the server it started, and the next start's server stops with it in turn."""
    data = tmp_path / "data"
    env = {"DATABASE_URL": "", "BLOOM_DATA_DIR": str(data)}
    served = GunicornServer(env, workers=1)
    try:
        assert _postmaster_running(data)
        os.kill(served.process.pid, signal.SIGKILL)
        served.process.wait(timeout=10)
        wait_until(lambda: not _postmaster_running(data), timeout=15, what="the guard to stop PostgreSQL")
    finally:
        served.stop()
        print(served.log())  # shown when the test fails

    again = GunicornServer(env, workers=1)
    try:
        assert _postmaster_running(data)
    finally:
        again.stop()
    wait_until(lambda: not _postmaster_running(data), timeout=15, what="PostgreSQL to stop with the service")
