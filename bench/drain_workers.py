"""Two (or more) `python -m bloom.worker` processes drain a queue; every task must be
completed exactly once.

    python bench/drain_workers.py --tasks 1000 --workers 2
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from contextlib import closing
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO_ROOT, TASK, Client, Service, plain_dsn, scratch_postgres  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with scratch_postgres("bloom-drain-") as (database_url, _):
        return drain(database_url, args)


def drain(database_url: str, args: argparse.Namespace) -> int:
    service = Service(database_url, workers=4, threads=8)
    workers = []
    try:
        client = Client(service.port, defaultdict(list), threading.Lock())
        task_ids = [client.call("create", "POST", "/api/runtime/llm-tasks", {**TASK, "prompt": f"task {i}"})["id"]
                    for i in range(args.tasks)]
        started = time.perf_counter()
        command = [sys.executable, "-c", "import sys; print(sys.stdin.read().upper(), end='')"]
        for index in range(args.workers):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "bloom.worker", "--server", f"http://127.0.0.1:{service.port}",
                 "--name", f"drain-{index}", "--wait", "2", "--", *command],
                cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        with closing(psycopg2.connect(plain_dsn(database_url))) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                while True:
                    cursor.execute("SELECT count(*) FROM llm_tasks WHERE status IN ('queued', 'leased', 'running')")
                    if cursor.fetchone()[0] == 0:
                        break
                    time.sleep(0.2)
                elapsed = time.perf_counter() - started
                cursor.execute("SELECT task_id, output FROM llm_results")
                results = cursor.fetchall()
                cursor.execute("SELECT status, count(*) FROM llm_tasks GROUP BY status")
                statuses = dict(cursor.fetchall())
                cursor.execute("SELECT worker_id, count(*) FROM llm_results GROUP BY worker_id")
                per_worker = dict(cursor.fetchall())
        per_task = Counter(task_id for task_id, _ in results)
        exactly_once = set(per_task) == set(task_ids) and set(per_task.values()) == {1}
        outputs_right = all(output.startswith("TASK ") for _, output in results)
        print(f"{args.tasks} tasks drained by {args.workers} workers in {elapsed:.1f} s "
              f"({args.tasks / elapsed:.0f} tasks/s); statuses {statuses}; per worker {per_worker}; "
              f"each task completed exactly once: {exactly_once}; outputs right: {outputs_right}")
        return 0 if exactly_once and outputs_right else 1
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=30)
        service.stop()


if __name__ == "__main__":
    sys.exit(main())
