"""Several hosts on a real network, faults injected under load (docs/FAULTS.md, "Several hosts").

Every machine is a network namespace of its own (tests/netns.py): PostgreSQL (behind a TCP
relay, in host `db`), two application hosts (`h1`, `h2`: gunicorn, 2 processes each,
`BLOOM_PUBLIC_URL` the balancer's address), and `edge`, which holds the load balancer
(it sends new connections only to hosts whose /ready answers), three stand-in Membridge
agents and the clients. Clients create tasks steadily, each with an Idempotency-Key,
repeating a request until it is acknowledged. Meanwhile:

1. the host holding the dispatch leadership is cut from the database (nftables drops
   every packet both ways: its sessions stay open on both sides), then healed;
2. the host holding it then is paused (SIGSTOP to all its processes: a frozen VM keeps
   its TCP sessions), then resumed.

Measured: how long until the other host holds the leadership (and dispatches), how long a
request to the cut host takes to be answered and with what, how long after the heal it
serves again. Then the queue is drained, and every acknowledged task is reconciled
against the database and the agents' own run records (tests/fault_run.py's checks).

    python -m tests.host_faults --cut 30 --pause 30 --seconds 120   # the long run
    tests/test_host_faults.py runs a short one in the suite.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg2
import requests
from sqlalchemy.engine import make_url

from .fake_agent import AGENT_KEY, FakeAgent
from .fault_run import Outcome, _check, _Producer
from .netns import Host, Network
from .support import REPO_ROOT, GunicornServer, StallingRelay, TcpBalancer, wait_until

AGENTS, CAPACITY = 3, 2


@dataclass
class HostFaults:
    """What the faults cost, in seconds (None: did not happen within the run)."""

    cut_takeover_s: float | None = None  # leader cut from the database -> the other host holds dispatch
    cut_answer_s: float | None = None  # a request to the cut host, answered after
    cut_answer_status: int | None = None
    cut_ready_status: int | None = None
    served_after_heal_s: float | None = None  # heal -> the cut host answers 200 again
    pause_takeover_s: float | None = None  # leader paused -> the other host holds dispatch
    longest_wait_s: float = 0.0  # the longest creation-to-completion of any task
    slowest_history: list[tuple] = field(default_factory=list)  # that task's audit entries
    outcome: Outcome = field(default_factory=Outcome)

    def summary(self) -> str:
        def seconds(value: float | None) -> str:
            return "never" if value is None else f"{value:.1f} s"

        return (f"leader cut from the database: the other host dispatched after {seconds(self.cut_takeover_s)}; "
                f"the cut host answered {self.cut_answer_status} in {seconds(self.cut_answer_s)} "
                f"(/ready {self.cut_ready_status}), served again {seconds(self.served_after_heal_s)} after the heal; "
                f"leader paused: the other host dispatched after {seconds(self.pause_takeover_s)}; "
                f"longest creation-to-completion {self.longest_wait_s:.1f} s. {self.outcome.summary()}")


class _Deployment:
    def __init__(self, database_url: str, tree: Path) -> None:
        self.tree = tree
        self.sqlalchemy_url = database_url
        self.database_url = plain_url(database_url)
        self.network = Network()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        db, h1, h2, self.edge = (self.network.add_host(name) for name in ("db", "h1", "h2", "edge"))
        # PostgreSQL answers on the db host's address; the relay's own side of each session
        # is this machine's (a Unix socket or loopback), where no fault is injected.
        self.relay = StallingRelay(self.sqlalchemy_url, listener=db.listening_socket(5432))
        self.db = db
        public = f"http://{self.edge.address}:8080"
        env = {"DATABASE_URL": self.relay.url_for(make_url(self.sqlalchemy_url).database),
               "BLOOM_PUBLIC_URL": public, "MEMBRIDGE_AGENT_KEY": AGENT_KEY,
               "WORKER_SYNC_INTERVAL_S": "1", "LEASE_SWEEP_INTERVAL_S": "1"}
        self.hosts: dict[str, GunicornServer] = {}
        self.host_of: dict[str, Host] = {}
        for host in (h1, h2):
            self.hosts[host.name] = GunicornServer(env, workers=2, host=host, cwd=self.tree)
            self.host_of[host.name] = host
        backends = [(self.host_of[name].address, served.port) for name, served in self.hosts.items()]
        self.balancer = self.edge.call(lambda: TcpBalancer(
            backends, listener=socket.create_server((self.edge.address, 8080), backlog=128), ready_path="/api/runtime/ready"))
        self.fleet = [self.edge.call(lambda i=i: FakeAgent(f"agent-{i}", run_seconds=0.3, max_concurrency=CAPACITY,
                                                           address=self.edge.address))
                      for i in range(AGENTS)]
        for agent in self.fleet:
            assert self.edge.call(lambda agent=agent: agent.register(public)).status_code == 201

    def url(self, path: str) -> str:
        return f"{self.balancer.url}{path}"

    def leader(self) -> str | None:
        """The application host that took the dispatch over last (each process says so
        when it does; a leader that loses it says nothing)."""
        latest = {name: _takeover_times(served.log()) for name, served in self.hosts.items()}
        latest = {name: times[-1] for name, times in latest.items() if times}
        return max(latest, key=latest.__getitem__) if latest else None

    def takeovers(self, name: str) -> int:
        return len(_takeover_times(self.hosts[name].log()))

    def request(self, name: str, path: str) -> tuple[int | None, float]:
        """(status or None, seconds) of a GET sent straight to one host, from the edge."""
        url = self.hosts[name].url(path)

        def get() -> tuple[int | None, float]:
            started = time.monotonic()
            try:
                status: int | None = requests.get(url, timeout=30).status_code
            except requests.RequestException:
                status = None
            return status, time.monotonic() - started

        return self.edge.call(get)

    def signal_host(self, name: str, signum: int) -> None:
        master = psutil.Process(self.hosts[name].process.pid)
        for process in [master, *master.children()]:
            os.kill(process.pid, signum)

    def close(self) -> None:
        keep = os.environ.get("BLOOM_FAULT_LOGS")  # a directory to keep the hosts' logs in
        if keep:
            for name, served in getattr(self, "hosts", {}).items():
                Path(keep, f"{name}.log").write_text(served.log())
        for agent in getattr(self, "fleet", []):
            agent.kill()
        for served in getattr(self, "hosts", {}).values():
            self.signal_host_quietly(served, signal.SIGCONT)
            served.stop()
        if hasattr(self, "balancer"):
            self.balancer.close()
        if hasattr(self, "relay"):
            self.relay.close()
        self.network.close()

    @staticmethod
    def signal_host_quietly(served: GunicornServer, signum: int) -> None:
        try:
            os.killpg(served.process.pid, signum)
        except ProcessLookupError:
            pass


TAKEOVER_LINE = "dispatcher: this process dispatches"


def _takeover_times(log: str) -> list[str]:
    """The time stamps of a host's lines saying one of its processes took dispatch over."""
    return [line[:23] for line in log.splitlines() if TAKEOVER_LINE in line]


def _takeover(deployment: _Deployment, old: str, since: float, timeout_s: float) -> float | None:
    """Seconds from `since` until the host other than `old` takes dispatch over."""
    other = next(name for name in deployment.hosts if name != old)
    before = deployment.takeovers(other)
    try:
        wait_until(lambda: deployment.takeovers(other) > before, timeout=timeout_s, interval=0.2,
                   what="the other host to take dispatch over")
    except AssertionError:
        return None
    return time.monotonic() - since


def plain_url(database_url: str) -> str:
    """A SQLAlchemy URL as libpq (psycopg2.connect) takes it."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def run(database_url: str, *, seconds: float = 60.0, cut_s: float = 15.0, pause_s: float = 15.0,
        tasks_per_s: float = 6.0, seed: int = 1, tree: Path = REPO_ROOT) -> HostFaults:
    faults = HostFaults()
    deployment = _Deployment(database_url, tree)
    stop = threading.Event()
    acknowledged: list[str] = []
    try:
        producers = [_Producer(deployment, stop, acknowledged, seed + i, tasks_per_s / 2) for i in range(2)]
        deployment.edge.call(lambda: [producer.start() for producer in producers])
        started = time.monotonic()
        time.sleep(3)

        # 1. The leader cut from the database.
        leader = wait_until(deployment.leader, timeout=15, what="a dispatch leader")
        cut_at = time.monotonic()
        deployment.host_of[leader].cut_from(deployment.db)
        answered = threading.Thread(target=lambda: setattr(faults, "_cut_answer", deployment.request(
            leader, "/api/runtime/llm-tasks?limit=1")))
        answered.start()
        faults.cut_ready_status = deployment.request(leader, "/api/runtime/ready")[0]
        faults.cut_takeover_s = _takeover(deployment, leader, cut_at, timeout_s=cut_s + 10)
        answered.join()
        faults.cut_answer_status, faults.cut_answer_s = faults._cut_answer  # type: ignore[attr-defined]
        time.sleep(max(0.0, cut_at + cut_s - time.monotonic()))
        deployment.host_of[leader].heal()
        healed_at = time.monotonic()
        try:
            wait_until(lambda: deployment.request(leader, "/api/runtime/llm-tasks?limit=1")[0] == 200, timeout=30,
                       interval=0.2, what="the healed host to serve")
            faults.served_after_heal_s = time.monotonic() - healed_at
        except AssertionError:
            pass
        time.sleep(3)

        # 2. The leader paused.
        leader = wait_until(deployment.leader, timeout=15, what="a dispatch leader")
        paused_at = time.monotonic()
        deployment.signal_host(leader, signal.SIGSTOP)
        try:
            faults.pause_takeover_s = _takeover(deployment, leader, paused_at, timeout_s=pause_s + 10)
            time.sleep(max(0.0, paused_at + pause_s - time.monotonic()))
        finally:
            deployment.signal_host(leader, signal.SIGCONT)

        time.sleep(max(0.0, started + seconds - time.monotonic()))
        stop.set()
        for producer in producers:
            producer.join(timeout=60)
        faults.outcome.seconds = time.monotonic() - started
        drain_started = time.monotonic()
        wait_until(lambda: _all_done(deployment.database_url, acknowledged), timeout=180, interval=0.5,
                   what="every acknowledged task to be completed")
        faults.outcome.drain_seconds = time.monotonic() - drain_started
        _check(faults.outcome, deployment.database_url, acknowledged, deployment.fleet, Path("/nonexistent"))
        faults.longest_wait_s, faults.slowest_history = _longest_wait(deployment.database_url)
        return faults
    finally:
        stop.set()
        deployment.close()


def _all_done(database_url: str, acknowledged: list[str]) -> bool:
    with closing(psycopg2.connect(database_url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM llm_tasks WHERE id = ANY(%s) AND status = 'completed'",
                       (list(set(acknowledged)),))
        return cursor.fetchone()[0] == len(set(acknowledged))


def _longest_wait(database_url: str) -> tuple[float, list[tuple]]:
    """The longest creation-to-completion of a task, in seconds, and that task's history."""
    with closing(psycopg2.connect(database_url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT t.id, r.completed_at - t.created_at, t.created_at FROM llm_tasks t "
                       "JOIN llm_results r ON r.task_id = t.id AND r.status = 'success' ORDER BY 2 DESC LIMIT 1")
        row = cursor.fetchone()
        if row is None:
            return 0.0, []
        cursor.execute("SELECT timestamp - %s, action, actor, detail FROM audit_logs WHERE entity_id = %s "
                       "ORDER BY timestamp", (row[2], row[0]))
        return row[1] / 1000, cursor.fetchall()


def main() -> int:
    from .support import PostgresCluster, start_embedded_cluster

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--cut", type=float, default=30.0, help="seconds the leader is cut from the database")
    parser.add_argument("--pause", type=float, default=30.0, help="seconds the next leader is paused")
    parser.add_argument("--tasks-per-s", type=float, default=6.0)
    parser.add_argument("--tree", type=Path, default=REPO_ROOT,
                        help="the release to run (a checkout of another commit, to compare)")
    args = parser.parse_args()
    admin_url, server = start_embedded_cluster()
    cluster = PostgresCluster(admin_url)
    cluster.create_template()
    database = cluster.create_database()
    try:
        faults = run(cluster.url_for(database), seconds=args.seconds, cut_s=args.cut, pause_s=args.pause,
                     tasks_per_s=args.tasks_per_s, tree=args.tree)
    finally:
        cluster.drop_database(database)
        cluster.dispose()
        server.cleanup()  # type: ignore[attr-defined]
    print(faults.summary())
    print("the slowest task, ms after its creation:")
    for entry in faults.slowest_history:
        print("   ", *entry)
    return 1 if faults.outcome.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
