"""GET /metrics against gunicorn with several workers: the counts add up to what a
client did, whichever process served it, and survive a process being killed."""
from __future__ import annotations

import os
import signal

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .helpers import DONE, TASK
from .support import GunicornServer, wait_until


def scrape(server, **headers) -> dict[tuple[str, tuple], float]:
    response = requests.get(server.url("/metrics"), headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served(database_url):
    server = GunicornServer({"DATABASE_URL": database_url, "BLOOM_METRICS_KEY": "scrape-secret"}, workers=3)
    wait_until(lambda: len(psutil.Process(server.process.pid).children()) == 3, timeout=20, what="three workers")
    yield server
    server.stop()


def test_metrics_count_what_the_clients_did_across_workers_and_survive_a_killed_worker(served):
    api = served.url("/api/runtime")
    assert requests.get(served.url("/metrics"), timeout=10).status_code == 401  # BLOOM_METRICS_KEY is set
    requests.post(f"{api}/workers", json={"name": "w1", "capabilities": {"max_concurrency": 8}}, timeout=10)
    created = [requests.post(f"{api}/llm-tasks", json=TASK, timeout=10, headers={"Connection": "close"}).json()
               for _ in range(12)]
    for task in created[:5]:
        lease = requests.post(f"{api}/llm-tasks/{task['id']}/lease", json={}, timeout=10).json()["lease"]
        status = "success" if task is not created[4] else "error"
        requests.post(f"{api}/llm-tasks/{task['id']}/complete",
                      json={**DONE, "status": status, "lease_id": lease["id"]}, timeout=10)
    claimed = requests.post(f"{api}/workers/w1/claim", json={}, timeout=10)
    assert claimed.status_code == 201

    samples = scrape(served, Authorization="Bearer scrape-secret")
    assert value(samples, "bloom_http_requests_total", route="/api/runtime/llm-tasks", method="POST", status="201") == 12
    # Every route parameter is written alike in the labels (no converter syntax).
    assert value(samples, "bloom_http_requests_total", route="/api/runtime/workers/<worker_id>/claim", method="POST",
                 status="201") == 1
    assert value(samples, "bloom_leases_granted_total", via="lease") == 5
    assert value(samples, "bloom_leases_granted_total", via="claim") == 1
    assert value(samples, "bloom_completions_total", result="success") == 4
    assert value(samples, "bloom_completions_total", result="error") == 1
    # The failed one went back to the queue for a retry, but not yet claimable.
    assert value(samples, "bloom_queue_depth") == 12 - 5 - 1 + 1
    assert value(samples, "bloom_tasks_in_flight", status="leased") == 1
    assert value(samples, "bloom_leases_active") == 1
    assert value(samples, "bloom_workers", status="online") == 1
    assert value(samples, "bloom_queue_oldest_age_seconds") > 0
    assert value(samples, "bloom_http_request_duration_seconds_count",
                 route="/api/runtime/llm-tasks", method="POST") == 12

    victim = sorted(child.pid for child in psutil.Process(served.process.pid).children())[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len({c.pid for c in psutil.Process(served.process.pid).children()} - {victim}) == 3,
               timeout=20, what="the worker to be replaced")
    after = scrape(served, Authorization="Bearer scrape-secret")
    assert value(after, "bloom_http_requests_total", route="/api/runtime/llm-tasks", method="POST", status="201") == 12
    assert value(after, "bloom_completions_total", result="success") == 4


def test_a_hostile_method_does_not_mint_time_series(served):
    for n in range(5):
        requests.request(f"BREW{n}", served.url("/api/runtime/stats"), timeout=10)
    samples = scrape(served, Authorization="Bearer scrape-secret")
    methods = {dict(labels).get("method") for (name, labels) in samples if name == "bloom_http_requests_total"}
    assert not any(method and method.startswith("BREW") for method in methods)
