"""Small steps a client takes, shared by the API tests."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests

if TYPE_CHECKING:
    from .support import GunicornServer

TASK = {"context_id": "ctx-1", "agent_slug": "summarizer", "prompt": "Summarize the notebook."}
DONE = {"status": "success", "output": "A summary.", "metrics": {"duration_ms": 1200, "tokens_used": 321}}


def register_worker(client, name: str, *, max_concurrency: int = 1, **extra: Any) -> dict:
    body = {"name": name, "capabilities": {"max_concurrency": max_concurrency}, **extra}
    response = client.post("/api/runtime/workers", json=body)
    assert response.status_code in (200, 201), response.get_json()
    return response.get_json()


def create_task(client, **fields: Any) -> dict:
    response = client.post("/api/runtime/llm-tasks", json={**TASK, **fields})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def lease(client, task_id: str, **body: Any):
    return client.post(f"/api/runtime/llm-tasks/{task_id}/lease", json=body)


def audit_actions(client) -> list[str]:
    return [entry["action"] for entry in client.get("/api/runtime/audit").get_json()]


# The same steps over HTTP, against a served instance (tests.support.GunicornServer) ----


def api(server: GunicornServer, path: str) -> str:
    return server.url(f"/api/runtime{path}")


def new_task(server: GunicornServer, **fields) -> dict:
    response = requests.post(api(server, "/llm-tasks"), json={**TASK, **fields}, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def task_of(server: GunicornServer, task_id: str) -> dict:
    return requests.get(api(server, f"/llm-tasks/{task_id}"), timeout=10).json()


def worker_of(server: GunicornServer, worker_id: str) -> dict:
    return requests.get(api(server, f"/workers/{quote(worker_id, safe='')}"), timeout=10).json()


def results_of(server: GunicornServer, task_id: str) -> list[dict]:
    return requests.get(api(server, f"/artifacts?task_id={task_id}"), timeout=10).json()


def actions(server: GunicornServer) -> list[str]:
    return [entry["action"] for entry in requests.get(api(server, "/audit?limit=1000"), timeout=10).json()]
