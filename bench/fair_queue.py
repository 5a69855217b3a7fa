"""The queue's hot paths at a million queued tasks over many fairness keys, one revision
against another, in alternating runs on one machine (README, "Fair shares").

    python bench/fair_queue.py 2f86b72                   # that commit against the working tree
    python bench/fair_queue.py 2f86b72 HEAD --tasks 1000000 --keys 10000 --pairs 1

For each revision and each distribution of the queue over its keys (`uniform`: KEYS
keys with TASKS/KEYS each; `skewed`: one key with all but KEYS-1 tasks, the others one
each), in A B B A order: an embedded PostgreSQL of its own, gunicorn serving that
revision (4 processes x 8 threads), the queue filled by SQL as that revision's creates
would have written it (its turns, where it has them) and ANALYZEd, then, from 8 client
threads of this process:
- claims: CLAIMS claims of one task each by 100 workers with room for all of them;
- leases: LEASES leases of named tasks (random ones of the queue) to named workers;
- creates: CREATES single creates, each of a random existing key;
- the push dispatcher's candidate query (dispatch_candidates), timed in SQL;
- GET /stats (which counts the live tasks per key where the revision has keys).
Prints each figure's runs side by side with the ratio of the medians (B/A): the p50 and
p99 latency of each call, and CPU per call (gunicorn's and PostgreSQL's processes).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import WORKING_TREE, checkout  # noqa: E402
from run import (  # noqa: E402
    REPO_ROOT,
    TASK,
    Client,
    Service,
    percentile,
    plain_dsn,
    run_clients,
    scratch_postgres,
    split,
)

CLIENTS = 8
CLAIMING_WORKERS = 100


def fill_queue(database_url: str, tasks: int, keys: int, distribution: str) -> None:
    """TASKS queued tasks (context_id = their key) by SQL. A revision with turns
    (fair_rank) gets those its creates would have given: each key's tasks take turns
    0, 1, 2, ... (as when the keys' tasks arrive while the queue is short)."""
    if distribution == "uniform":
        key_of, turn_of = f"g % {keys}", f"g / {keys}"
    else:  # one key with all but keys - 1 tasks, keys - 1 keys with one each
        key_of = f"CASE WHEN g <= {tasks - keys + 1} THEN 0 ELSE g END"
        turn_of = f"CASE WHEN g <= {tasks - keys + 1} THEN g - 1 ELSE 1 END"
    with closing(psycopg2.connect(plain_dsn(database_url))) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM information_schema.columns "
                           "WHERE table_name = 'llm_tasks' AND column_name = 'fair_rank'")
            has_turns = cursor.fetchone() is not None
            columns, values = "", ""
            if has_turns:
                columns, values = ", fair_rank", f", {turn_of}"
            base = int(time.time() * 1000) - 3_600_000
            cursor.execute(
                f"""INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at{columns})
                    SELECT 'q-' || g, 'nb-' || ({key_of}), 'summarizer', 'p', 'queued', {base} + g, {base} + g{values}
                      FROM generate_series(1, {tasks}) g""")
            cursor.execute("VACUUM ANALYZE llm_tasks")


def candidates_query(root: Path) -> str:
    """The revision's own dispatch_candidates, as it sends it."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from bloom.sql import QUERIES; sys.stdout.write(QUERIES['dispatch_candidates'])"],
        cwd=root, check=True, capture_output=True, text=True).stdout


def time_candidates(database_url: str, query: str, runs: int = 30) -> float:
    """Median ms of the push dispatcher's candidate query, with one push worker with room."""
    with closing(psycopg2.connect(plain_dsn(database_url))) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO workers (id, url, status, registered_at, capabilities) VALUES "
                           "('bench-agent', 'http://127.0.0.1:9', 'online', 0, "
                           "'{\"max_concurrency\": 32}') ON CONFLICT DO NOTHING")
            timings = []
            for _ in range(runs):
                started = time.perf_counter()
                cursor.execute(query, {"limit": 32, "now": int(time.time() * 1000), "max_running_per_key": None})
                cursor.fetchall()
                timings.append((time.perf_counter() - started) * 1000)
            cursor.execute("DELETE FROM workers WHERE id = 'bench-agent'")
    return statistics.median(timings)


def measure(root: Path, tasks: int, keys: int, distribution: str, calls: dict[str, int]) -> dict[str, float]:
    with scratch_postgres("bloom-fair-") as (database_url, postgres_pid):
        service = Service(database_url, workers=4, threads=8, postgres_pid=postgres_pid, root=root)
        try:
            return _measure(service, database_url, root, tasks, keys, distribution, calls)
        finally:
            service.stop()


def _measure(service: Service, database_url: str, root: Path, tasks: int, keys: int, distribution: str,
             calls: dict[str, int]) -> dict[str, float]:
    started = time.perf_counter()
    fill_queue(database_url, tasks, keys, distribution)
    filled_s = time.perf_counter() - started
    setup = Client(service.port, defaultdict(list), threading.Lock())
    for n in range(CLAIMING_WORKERS):
        setup.call("register", "POST", "/api/runtime/workers",
                   {"name": f"claimer-{n}", "capabilities": {"max_concurrency": 32}})
    with closing(psycopg2.connect(plain_dsn(database_url))) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT id FROM llm_tasks TABLESAMPLE SYSTEM (1) WHERE status = 'queued' LIMIT %s",
                           (calls["lease"] + 100,))
            to_lease = [row[0] for row in cursor.fetchall()]
    random.Random(5).shuffle(to_lease)
    figures: dict[str, float] = {}

    def claims(client: Client, index: int) -> None:
        for n in split(calls["claim"], CLIENTS, index):
            client.call("claim", "POST", f"/api/runtime/workers/claimer-{n % CLAIMING_WORKERS}/claim", {})

    def leases(client: Client, index: int) -> None:
        for n in split(calls["lease"], CLIENTS, index):
            client.call("lease", "POST", f"/api/runtime/llm-tasks/{to_lease[n]}/lease",
                        {"worker_id": f"claimer-{n % CLAIMING_WORKERS}"}, expect=(201, 409))

    def creates(client: Client, index: int) -> None:
        rng = random.Random(index)
        for _ in split(calls["create"], CLIENTS, index):
            key = 0 if distribution == "skewed" and rng.random() < 0.5 else rng.randrange(keys)
            client.call("create", "POST", "/api/runtime/llm-tasks", {**TASK, "context_id": f"nb-{key}"})

    for name, work in (("claim", claims), ("lease", leases), ("create", creates)):
        _, requests, latencies, cpu_ms = run_clients(service, CLIENTS, work)
        values = latencies[name]
        figures[f"{name} p50 ms"] = percentile(values, 50) * 1000
        figures[f"{name} p99 ms"] = percentile(values, 99) * 1000
        figures[f"{name} CPU ms (gunicorn + postgres)"] = cpu_ms["gunicorn"] + cpu_ms["postgres"]
    figures["dispatch candidates ms (SQL)"] = time_candidates(database_url, candidates_query(root))
    stats_ms = []
    for _ in range(6):
        before = time.perf_counter()
        setup.call("stats", "GET", "/api/runtime/stats")
        stats_ms.append((time.perf_counter() - before) * 1000)
    figures["GET /stats ms"] = statistics.median(stats_ms[1:])
    with closing(psycopg2.connect(plain_dsn(database_url))) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM leases")
            granted = cursor.fetchone()[0]
    if granted < calls["claim"]:  # every claim must have taken a task, or it measured nothing
        raise SystemExit(f"only {granted} leases after {calls['claim']} claims and {calls['lease']} leases")
    print(f"    filled in {filled_s:.0f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="revision A (the one before)")
    parser.add_argument("head", nargs="?", default=WORKING_TREE, help="revision B (default: the working tree)")
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--pairs", type=int, default=1, help="A B B A rounds")
    parser.add_argument("--distributions", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--leases", type=int, default=1000)
    parser.add_argument("--creates", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the runs here as JSON")
    args = parser.parse_args()
    calls = {"claim": args.claims, "lease": args.leases, "create": args.creates}

    scratch = Path(tempfile.mkdtemp(prefix="bloom-fair-trees-"))
    roots = {"A": checkout(args.base, scratch), "B": checkout(args.head, scratch)}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {d: {"A": [], "B": []} for d in args.distributions}
    try:
        for distribution in args.distributions:
            for pair in range(args.pairs):
                for side in ("A", "B", "B", "A"):
                    print(f"{distribution}, pair {pair + 1}: {side} ({args.base if side == 'A' else args.head})",
                          flush=True)
                    runs[distribution][side].append(measure(roots[side], args.tasks, args.keys, distribution, calls))
    finally:
        for root in set(roots.values()):
            if root != REPO_ROOT:
                subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(root)], check=False)
    print(f"\n{args.tasks:,} queued tasks over {args.keys:,} keys; A = {args.base}, B = {args.head}; "
          f"{CLIENTS} client threads of this process (bench/fair_queue.py)")
    for distribution, sides in runs.items():
        print(f"\n{distribution}:")
        print(f"  {'figure':<36} {'A runs':<18} {'B runs':<18} B/A")
        for figure in sides["A"][0]:
            a = [run[figure] for run in sides["A"]]
            b = [run[figure] for run in sides["B"]]
            ratio = statistics.median(b) / statistics.median(a) if statistics.median(a) else float("nan")
            print(f"  {figure:<36} {' '.join(f'{v:.2f}' for v in a):<18} {' '.join(f'{v:.2f}' for v in b):<18} "
                  f"{ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
