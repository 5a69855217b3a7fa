"""Small steps a client takes, shared by the API tests."""
from __future__ import annotations

from typing import Any

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
