"""GET /stats with many finished tasks and an ordinary queue, over HTTP.

    python bench/stats_at_scale.py --finished 10000000 --live 2000

Fills llm_tasks with FINISHED finished tasks (completed, failed, dead, cancelled) and LIVE
queued/leased/running ones, runs ANALYZE as autovacuum would, and times 20 calls of
/stats against gunicorn. (bench/run.py --rows fills a sixth of its rows as *queued*, a
queue of that size costs an exact count of its own.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Client, Service, plain_dsn, scratch_postgres  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finished", type=int, default=10_000_000)
    parser.add_argument("--live", type=int, default=2000)
    args = parser.parse_args()

    with scratch_postgres("bloom-stats-") as (database_url, _):
        service = Service(database_url, workers=2, threads=8)  # applies the schema
        try:
            measure(service, database_url, args)
        finally:
            service.stop()
    return 0


def measure(service: Service, database_url: str, args: argparse.Namespace) -> None:
    """Fill the tasks table, ANALYZE as autovacuum would, and time /stats."""
    started = time.perf_counter()
    with closing(psycopg2.connect(plain_dsn(database_url))) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at) "
                "SELECT 'f' || g, 'c', 'a', 'p', "
                "(ARRAY['completed','completed','completed','failed','dead','cancelled'])[1 + g %% 6], g, g "
                "FROM generate_series(1, %s) g", (args.finished,))
            cursor.execute(
                "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at) "
                "SELECT 'q' || g, 'c', 'a', 'p', (ARRAY['queued','queued','leased','running'])[1 + g %% 4], "
                "%s + g, %s + g FROM generate_series(1, %s) g", (args.finished, args.finished, args.live))
            cursor.execute("VACUUM ANALYZE llm_tasks")
    print(f"filled {args.finished:,} finished and {args.live:,} live tasks in {time.perf_counter() - started:.0f} s")
    client = Client(service.port, defaultdict(list), threading.Lock())
    for _ in range(21):
        answer = client.call("stats", "GET", "/api/runtime/stats")
    values = sorted(client.latencies["stats"][1:])
    print(f"  /stats: median {statistics.median(values) * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms "
          f"over {len(values)} calls; {answer}")


if __name__ == "__main__":
    sys.exit(main())
