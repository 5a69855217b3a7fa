"""Memory of large bodies: many clients send ~14 MiB batches at once; how large do the
gunicorn processes grow, and how large do they stay afterwards?

    .venv/bin/python bench/large_batches.py [--clients 12] [--mib 14] [--at-once 2]

Prints each worker's peak RSS during the burst and its RSS a few seconds after, and the
answers' statuses (201, or 503 with Retry-After when a worker already handles
BLOOM_LARGE_BODIES_AT_ONCE large bodies and the wait ran out).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Service, scratch_postgres  # noqa: E402


def batch_body(mib: float) -> bytes:
    per_task = 14_000  # characters of prompt each
    count = min(1000, max(1, int(mib * 1024 * 1024 / per_task)))
    tasks = [{"context_id": "bench", "agent_slug": "bench", "prompt": f"{n} " + "x" * per_task} for n in range(count)]
    return json.dumps({"tasks": tasks}).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--mib", type=float, default=14.0)
    parser.add_argument("--at-once", type=int, default=2, help="BLOOM_LARGE_BODIES_AT_ONCE")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    import http.client

    body = batch_body(args.mib)
    print(f"{args.clients} clients x {len(body) / 2**20:.1f} MiB batch, {args.workers} workers, "
          f"{args.at_once} large bodies at once per worker")
    with scratch_postgres("bloom-bench-large-") as (database_url, _):
        service = Service(database_url, workers=args.workers, threads=16,
                          extra_env={"BLOOM_LARGE_BODIES_AT_ONCE": str(args.at_once)})
        try:
            master = psutil.Process(service.process.pid)
            before = {child.pid: child.memory_info().rss for child in master.children()}
            statuses: Counter = Counter()
            lock = threading.Lock()

            def send() -> None:
                connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)
                connection.request("POST", "/api/runtime/llm-tasks/batch", body=body,
                                   headers={"Content-Type": "application/json", "Connection": "close"})
                status = connection.getresponse().status
                with lock:
                    statuses[status] += 1

            started = time.monotonic()
            threads = [threading.Thread(target=send) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            took = time.monotonic() - started
            time.sleep(3.0)
            after = {child.pid: child.memory_info().rss for child in master.children()}
            mib = 2 ** 20
            for pid in sorted(after):
                print(f"worker {pid}: before {before.get(pid, 0) / mib:.0f} MiB, peak "
                      f"{service.peak_rss.get(pid, 0) / mib:.0f} MiB, 3 s after {after[pid] / mib:.0f} MiB")
            print(f"answers: {dict(statuses)} in {took:.1f} s")
        finally:
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
