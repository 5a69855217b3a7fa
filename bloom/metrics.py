"""Prometheus metrics, correct across every gunicorn process.

Counters and histograms are kept by each process in prometheus_client's multiprocess
mode: gunicorn's master points PROMETHEUS_MULTIPROC_DIR at a fresh directory before it
forks (gunicorn.conf.py), each worker writes its values to files there, and a scrape sums
them; a killed process's counts stay in its files. The queue's state (depth, age of the
oldest queued task, tasks in flight, active leases, workers) is read from PostgreSQL at
scrape time in one query over small partial indexes, never by counting finished tasks.
Outside gunicorn (tests, `flask`), the values live in this process only.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HTTP_REQUESTS = Counter(
    "bloom_http_requests_total", "HTTP requests answered, by route, method and status", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "bloom_http_request_duration_seconds", "Time to answer an HTTP request, by route and method", ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# The labelled children of the two request metrics, by (route, method, status): looking a
# child up by its labels takes a lock and builds a key on every call; this dict does not.
_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple] = {}


def count_request(route: str, method: str, status: int, seconds: float) -> None:
    """One answered request: counted by route, method and status, timed by route and method.
    The label values come from bounded sets (the caller's job)."""
    children = _REQUEST_CHILDREN.get((route, method, status))
    if children is None:
        children = _REQUEST_CHILDREN.setdefault(
            (route, method, status),
            (HTTP_REQUESTS.labels(route, method, str(status)), HTTP_LATENCY.labels(route, method)),
        )
    children[0].inc()
    children[1].observe(seconds)


RATE_LIMITED = Counter("bloom_rate_limited_total", "Requests refused by a rate limit (429)")
LEASES_GRANTED = Counter("bloom_leases_granted_total", "Leases granted, by how", ["via"])
LEASES_EXPIRED = Counter("bloom_leases_expired_total", "Active leases expired by the sweep")
LEASES_RELEASED = Counter("bloom_leases_released_total", "Leases released by a completion")
COMPLETIONS = Counter("bloom_completions_total", "Completions stored, by result status", ["result"])
CLAIM_WAIT = Histogram(
    "bloom_claim_wait_seconds", "How long a long-polling claim waited, by outcome", ["outcome"],
    buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 35),
)
LONG_POLLS_WAITING = Gauge(
    "bloom_long_polls_waiting", "Long-polling claims waiting now", multiprocess_mode="livesum"
)
DISPATCHES = Counter("bloom_dispatch_total", "Deliveries to agents, by outcome", ["outcome"])
MEMBRIDGE_CALLS = Counter("bloom_membridge_calls_total", "Calls to Membridge, by outcome", ["outcome"])
ARTIFACT_UPLOAD_FAILURES = Counter(
    "bloom_artifact_upload_failures_total", "Outputs kept in the database because the object store failed"
)


class QueueCollector:
    """The queue's state, read from PostgreSQL at scrape time (one query)."""

    def __init__(self, read_queue_state) -> None:
        self._read = read_queue_state  # () -> dict, see queue_state in records/queries.sql

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = self._read()
        yield GaugeMetricFamily("bloom_queue_depth", "Tasks queued now", value=state["queued"])
        yield GaugeMetricFamily(
            "bloom_queue_oldest_age_seconds", "Age of the oldest queued task that may run now (0 when none)",
            value=state["oldest_queued_age_ms"] / 1000,
        )
        in_flight = GaugeMetricFamily("bloom_tasks_in_flight", "Tasks leased or running now", labels=["status"])
        in_flight.add_metric(["leased"], state["leased"])
        in_flight.add_metric(["running"], state["running"])
        yield in_flight
        yield GaugeMetricFamily("bloom_leases_active", "Active leases now", value=state["leases_active"])
        workers = GaugeMetricFamily("bloom_workers", "Registered workers, by status", labels=["status"])
        for status, count in sorted((state["workers_by_status"] or {}).items()):
            workers.add_metric([status], count)
        yield workers


def exposition(read_queue_state) -> bytes:
    """The text format of every metric: this deployment's processes, then the queue."""
    processes = CollectorRegistry()
    if os.environ.get(MULTIPROC_DIR_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(processes)
        process_part = generate_latest(processes)
    else:
        from prometheus_client import REGISTRY

        process_part = generate_latest(REGISTRY)
    queue = CollectorRegistry()
    queue.register(QueueCollector(read_queue_state))
    return process_part + generate_latest(queue)

