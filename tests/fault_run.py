"""A fault run: the service under load while its processes are SIGKILLed and its
PostgreSQL is stopped at once (immediate shutdown, as a crash) and started again.

The fleet is both kinds at once: stand-in Membridge agents that tasks are pushed to
(tests/fake_agent.py) and `python -m bloom.worker` processes that claim. Clients create
tasks one by one and in batches, each with an Idempotency-Key, and repeat a request that
got no answer or a 5xx until it is acknowledged, as a careful client does. When the
faults stop, the queue is drained and the run is checked:

- every acknowledged task is stored once (its key kept it once) and ends completed, with
  exactly one successful result;
- no task ever ran on two runners at the same time (no double lease), and no agent ran
  more at once than its capacity;
- how many tasks ran twice one after the other is reported (a run whose completion was
  lost with a killed process can run again once its lease ends: README, "Running with a Membridge fleet", Restarting without loss).

    python -m tests.fault_run --seconds 300            # the long run (docs/FAULTS.md)
    tests/test_fault_run.py runs a short one in the suite.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections import Counter, defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg2
import requests

from .fake_agent import AGENT_KEY, FakeAgent
from .support import REPO_ROOT, GunicornServer, wait_until

TASK = {"context_id": "fault-run", "agent_slug": "summarizer", "prompt": "Summarize.",
        "policy": {"timeout_sec": 5, "budget": 0}}
CAPACITY = 2
# What each pull worker runs: notes its start and end in a ledger (one line each,
# appended atomically), so that runs of one task can be compared across runners.
_RUNNER = textwrap.dedent("""
    import json, os, sys, time
    task = json.loads(os.environ["BLOOM_TASK"])["id"]
    ledger = sys.argv[1]
    started = time.time()
    time.sleep(0.05)
    with open(ledger, "a") as out:
        out.write(json.dumps([task, started, time.time()]) + "\\n")
    print("pulled " + task, end="")
""")


@dataclass
class Outcome:
    acknowledged: int = 0
    stored_twice: list[str] = field(default_factory=list)
    not_stored: list[str] = field(default_factory=list)
    not_completed: dict[str, str] = field(default_factory=dict)
    results_not_one: dict[str, int] = field(default_factory=dict)
    overlapping_runs: list[str] = field(default_factory=list)
    ran_twice: dict[str, list[str]] = field(default_factory=dict)  # task -> its runners, in order
    histories: dict[str, list[tuple]] = field(default_factory=dict)  # audit entries of the tasks that ran twice
    over_capacity: dict[str, int] = field(default_factory=dict)
    worker_kills: int = 0
    database_stops: int = 0
    seconds: float = 0.0
    drain_seconds: float = 0.0

    def failures(self) -> list[str]:
        found = []
        for name in ("stored_twice", "not_stored", "not_completed", "results_not_one", "overlapping_runs",
                     "over_capacity"):
            value = getattr(self, name)
            if value:
                found.append(f"{name}: {len(value)} (e.g. {list(value)[:3]})")
        return found

    def summary(self) -> str:
        return (f"{self.acknowledged} acknowledged tasks in {self.seconds:.0f} s, {self.worker_kills} process SIGKILLs, "
                f"{self.database_stops} immediate PostgreSQL stops, drained {self.drain_seconds:.0f} s later; ran twice one after the other: {len(self.ran_twice)}; "
                + ("; ".join(self.failures()) or "every acknowledged task stored once and completed once, "
                   "no overlapping runs, no agent over capacity"))


class _Producer(threading.Thread):
    """Creates tasks until told to stop; a request is repeated (same key) until acknowledged."""

    def __init__(self, server: GunicornServer, stop: threading.Event, acknowledged: list[str], seed: int,
                 tasks_per_s: float) -> None:
        super().__init__(daemon=True)
        self.server, self.stop, self.acknowledged = server, stop, acknowledged
        self.random = random.Random(seed)
        self.tasks_per_s = tasks_per_s

    def run(self) -> None:
        session = requests.Session()
        due = time.monotonic()
        while not self.stop.is_set():
            before = len(self.acknowledged)
            if self.random.random() < 0.2:
                items = [{**TASK, "idempotency_key": str(uuid.uuid4())} for _ in range(10)]
                ids = self._until_acknowledged(session, "/api/runtime/llm-tasks/batch", {"tasks": items}, {})
                self.acknowledged.extend(task["id"] for task in ids["tasks"])
            else:
                key = {"Idempotency-Key": str(uuid.uuid4())}
                self.acknowledged.append(self._until_acknowledged(session, "/api/runtime/llm-tasks", TASK, key)["id"])
            due += (len(self.acknowledged) - before) / self.tasks_per_s  # as many as the fleet can run
            self.stop.wait(max(0.0, due - time.monotonic()))

    def _until_acknowledged(self, session: requests.Session, path: str, body: dict, headers: dict) -> dict:
        while True:
            try:
                response = session.post(self.server.url(path), json=body, headers=headers, timeout=15)
            except requests.RequestException:
                session.close()  # its connection died with a worker
                time.sleep(0.1)
                continue
            if response.status_code in (200, 201):
                return response.json()
            if response.status_code >= 500 or response.status_code == 429:
                time.sleep(0.2)
                continue
            raise AssertionError(f"{path} answered {response.status_code}: {response.text}")


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])


def run(seconds: float = 30.0, *, agents: int = 4, pull_workers: int = 2, producers: int = 4,
        tasks_per_s: float = 80.0, kill_every_s: float = 4.0, database_stops: int = 2, drain_s: float = 180.0,
        seed: int = 1) -> Outcome:
    from bloom.embedded_postgres import import_pgserver

    chance = random.Random(seed)
    outcome = Outcome()
    scratch = Path(tempfile.mkdtemp(prefix="bloom-fault-run-"))
    pg = import_pgserver().get_server(scratch / "pgdata", cleanup_mode="delete")
    database_url, plain_url = pg.get_uri(driver="psycopg2"), pg.get_uri()
    ledger = scratch / "pulled.jsonl"
    runner = scratch / "runner.py"
    runner.write_text(_RUNNER)
    served = GunicornServer({"DATABASE_URL": database_url, "MEMBRIDGE_AGENT_KEY": AGENT_KEY,
                             "WORKER_SYNC_INTERVAL_S": "600", "LEASE_SWEEP_INTERVAL_S": "2"},
                            workers=3, threads=8, public=True)
    fleet = [FakeAgent(f"agent-{n}", run_seconds=0.05, max_concurrency=CAPACITY) for n in range(agents)]
    pullers: list[psutil.Popen] = []
    stop = threading.Event()
    acknowledged: list[str] = []
    try:
        for agent in fleet:
            assert agent.register(served.base_url).status_code in (200, 201)
        for n in range(pull_workers):
            pullers.append(psutil.Popen(
                [sys.executable, "-m", "bloom.worker", "--server", served.base_url, "--name", f"puller-{n}",
                 "--concurrency", str(CAPACITY), "--wait", "2", "--ttl", "15", "--", sys.executable, str(runner), str(ledger)],
                cwd=REPO_ROOT, stdout=open(scratch / f"puller-{n}.log", "wb"), stderr=subprocess.STDOUT,
            ))
        clients = [_Producer(served, stop, acknowledged, seed * 100 + n, tasks_per_s / producers)
                   for n in range(producers)]
        started = time.monotonic()
        for client in clients:
            client.start()
        stops_at = [seconds * (n + 1) / (database_stops + 1) for n in range(database_stops)]
        master = psutil.Process(served.process.pid)
        next_kill = kill_every_s
        while (elapsed := time.monotonic() - started) < seconds:
            if stops_at and elapsed >= stops_at[0]:
                stops_at.pop(0)
                os.kill(_postmaster_pid(scratch / "pgdata"), signal.SIGQUIT)  # immediate shutdown
                outcome.database_stops += 1
                time.sleep(chance.uniform(1.5, 3.5))
                pg.ensure_postgres_running()
            elif elapsed >= next_kill:
                next_kill += kill_every_s
                victims = master.children()
                if victims:
                    os.kill(chance.choice(victims).pid, signal.SIGKILL)
                    outcome.worker_kills += 1
            time.sleep(0.1)
        stop.set()
        for client in clients:
            client.join(timeout=60)
        outcome.seconds = time.monotonic() - started
        drain_started = time.monotonic()
        try:
            _drain(plain_url, drain_s)
            outcome.drain_seconds = time.monotonic() - drain_started
        except AssertionError:
            raise AssertionError(_stuck(plain_url, pullers, served)) from None
        _check(outcome, plain_url, acknowledged, fleet, ledger)
        return outcome
    finally:
        stop.set()
        for puller in pullers:
            puller.send_signal(signal.SIGTERM)
        for puller in pullers:
            try:
                puller.wait(10)
            except psutil.TimeoutExpired:
                puller.kill()
        for agent in fleet:
            agent.kill()
        served.stop()
        pg.cleanup()


def _drain(database_url: str, drain_s: float) -> None:
    def drained() -> bool:
        try:
            with closing(psycopg2.connect(database_url)) as connection, connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM llm_tasks WHERE status IN ('queued', 'leased', 'running')")
                return cursor.fetchone()[0] == 0
        except psycopg2.OperationalError:
            return False

    wait_until(drained, timeout=drain_s, interval=0.5, what="the queue to drain")


def _stuck(database_url: str, pullers: list[psutil.Popen], served: GunicornServer) -> str:
    """What a queue that did not drain looks like."""
    with closing(psycopg2.connect(database_url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT status, count(*) FROM llm_tasks GROUP BY status")
        tasks = dict(cursor.fetchall())
        cursor.execute("SELECT id, status, url IS NOT NULL, capabilities FROM workers ORDER BY id")
        workers = cursor.fetchall()
        cursor.execute("SELECT worker_id, count(*), min(expires_at) - extract(epoch from now()) * 1000 "
                       "FROM leases WHERE status = 'active' GROUP BY worker_id")
        leases = cursor.fetchall()
    return (f"the queue did not drain: tasks {tasks}; workers {workers}; active leases (worker, count, "
            f"ms to first expiry) {leases}; pull workers' exit codes {[p.poll() for p in pullers]}\n"
            f"gunicorn log ends:\n{served.log()[-3000:]}")


def _check(outcome: Outcome, database_url: str, acknowledged: list[str], fleet: list[FakeAgent],
           ledger: Path) -> None:
    outcome.acknowledged = len(acknowledged)
    outcome.stored_twice = [task for task, times in Counter(acknowledged).items() if times > 1]
    with closing(psycopg2.connect(database_url)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT id, status FROM llm_tasks")
        status_of = dict(cursor.fetchall())
        cursor.execute("SELECT task_id, count(*) FROM llm_results WHERE status = 'success' GROUP BY task_id")
        successes = dict(cursor.fetchall())
    outcome.not_stored = [task for task in acknowledged if task not in status_of]
    outcome.not_completed = {task: status_of[task] for task in acknowledged
                             if task in status_of and status_of[task] != "completed"}
    outcome.results_not_one = {task: successes.get(task, 0) for task in acknowledged if successes.get(task, 0) != 1}
    runs: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for agent in fleet:
        for task, started, ended in agent.state.runs:
            runs[task].append((started, ended, agent.name))
        if agent.state.most_running > CAPACITY:
            outcome.over_capacity[agent.name] = agent.state.most_running
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            task, started, ended = json.loads(line)
            runs[task].append((started, ended, "a pull worker"))
    for task, spans in runs.items():
        spans.sort()
        if len(spans) > 1:
            outcome.ran_twice[task] = [runner for _, _, runner in spans]
        if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)):
            outcome.overlapping_runs.append(task)
    with closing(psycopg2.connect(database_url)) as connection, connection.cursor() as cursor:
        for task in outcome.ran_twice:
            cursor.execute("SELECT timestamp, action, actor, detail FROM audit_logs WHERE entity_id = %s "
                           "ORDER BY timestamp", (task,))
            outcome.histories[task] = cursor.fetchall()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--pull-workers", type=int, default=2)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--tasks-per-s", type=float, default=80.0, help="creation rate, about what the fleet runs")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between SIGKILLs of a gunicorn process")
    parser.add_argument("--database-stops", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    outcome = run(args.seconds, agents=args.agents, pull_workers=args.pull_workers, producers=args.producers,
                  tasks_per_s=args.tasks_per_s, kill_every_s=args.kill_every, database_stops=args.database_stops, seed=args.seed)
    print(outcome.summary())
    for task, runners in outcome.ran_twice.items():
        print(f"ran twice: {task} on {', '.join(runners)}")
        for entry in outcome.histories[task]:
            print("   ", *entry)
    return 1 if outcome.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
