"""Every route answers as its OpenAPI document says: one source for each JSON shape
(bloom/shapes.py) feeds both, and this walk through the API checks each answer, errors
included, against the document, with no field missing and none undocumented."""
from __future__ import annotations

import re

import jsonschema_rs
import pytest

from .helpers import DONE, TASK

_DROPPED = {"nullable", "example", "readOnly", "writeOnly", "deprecated", "discriminator", "xml", "externalDocs"}


def _json_schema(node, components):
    """An OpenAPI 3.0 schema as JSON Schema: references inlined, `nullable` as a null type,
    and objects closed (a field the document does not name is an error)."""
    if isinstance(node, list):
        return [_json_schema(item, components) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _json_schema(components[node["$ref"].rsplit("/", 1)[1]], components)
    converted = {key: (value if key in ("required", "enum") else _json_schema(value, components))
                 for key, value in node.items() if key not in _DROPPED}
    if "properties" in node:
        converted["properties"] = {name: _json_schema(value, components) for name, value in node["properties"].items()}
        converted.setdefault("additionalProperties", False)
    if node.get("nullable"):
        if "type" in converted:
            converted["type"] = [converted["type"], "null"]
        else:
            converted = {"anyOf": [converted, {"type": "null"}]}
    return converted


class Document:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.components = spec["components"]["schemas"]
        self.paths = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path)
                      for path in spec["paths"]]
        self.checked: set[tuple[str, str, int]] = set()

    def check(self, response, method: str, url: str):
        path = url.split("?", 1)[0]
        # The most literal template that matches and has the method (/llm-tasks/batch, not /llm-tasks/{task_id}).
        matching = sorted((t.count("{"), t) for pattern, t in self.paths
                          if pattern.match(path) and method.lower() in self.spec["paths"][t])
        assert matching, f"{method} {path} is not in the document"
        template = matching[0][1]
        operation = self.spec["paths"][template][method.lower()]
        documented = operation["responses"].get(str(response.status_code))
        assert documented is not None, f"{method} {template} answered {response.status_code}, not documented"
        content = documented.get("content", {}).get("application/json")
        if content is not None and response.is_json:
            schema = _json_schema(content["schema"], self.components)
            errors = [str(error) for error in jsonschema_rs.validator_for(schema).iter_errors(response.get_json())]
            assert not errors, f"{method} {template} {response.status_code}: {errors[:3]}"
        self.checked.add((method.upper(), template, response.status_code))
        return response


@pytest.fixture
def api(client):
    document = Document(client.get("/api/runtime/openapi.json").get_json())

    def call(method: str, url: str, **kwargs):
        return document.check(getattr(client, method)(url, **kwargs), method, url)

    call.document = document
    return call


def test_every_answer_of_a_walk_through_the_api_is_as_documented(api, agents):
    r = "/api/runtime"
    api("get", f"{r}/health")
    api("get", f"{r}/ready")
    api("get", f"{r}/config")
    api("post", f"{r}/config", json={"membridge_server_url": "http://127.0.0.1:9", "admin_key": "secret-admin-key"})
    api("post", f"{r}/config", json={"membridge_server_url": "not a url"})  # 400, field errors
    api("post", f"{r}/test-connection")  # nothing listens: connected false

    api("post", f"{r}/workers", json={"name": "w1", "capabilities": {"max_concurrency": 4}, "url": "http://10.0.0.8:8001"})
    api("post", f"{r}/workers", json={"name": "w1", "capabilities": {"max_concurrency": 4}})
    api("get", f"{r}/workers")
    api("get", f"{r}/workers/w1")
    api("get", f"{r}/workers/nobody")
    api("post", f"{r}/workers/w1/approve")
    api("post", f"{r}/workers/nobody/approve")

    task = api("post", f"{r}/llm-tasks", json=TASK).get_json()
    api("post", f"{r}/llm-tasks/batch", json={"tasks": [TASK, {**TASK, "idempotency_key": "k-1"}]})
    api("get", f"{r}/llm-tasks")
    api("get", f"{r}/llm-tasks?status=queued&limit=5")
    api("get", f"{r}/llm-tasks/{task['id']}")
    api("get", f"{r}/llm-tasks/unknown")
    lease = api("post", f"{r}/llm-tasks/{task['id']}/lease", json={"worker_id": "w1"}).get_json()["lease"]
    api("post", f"{r}/llm-tasks/{task['id']}/lease", json={"worker_id": "w1"})  # 409
    api("post", f"{r}/llm-tasks/{task['id']}/heartbeat", json={"lease_id": lease["id"]})
    api("post", f"{r}/workers/w1/heartbeat", json={"lease_ids": [lease["id"], "gone"]})
    api("post", f"{r}/deliveries/other/api/runtime/llm-tasks/{task['id']}/complete", json=DONE)  # 409
    api("post", f"{r}/llm-tasks/{task['id']}/complete", json={**DONE, "lease_id": lease["id"]})
    api("post", f"{r}/llm-tasks/{task['id']}/complete", json=DONE)  # 409: once
    api("post", f"{r}/workers/w1/claim", json={})
    api("post", f"{r}/workers/w1/claim", json={"max_tasks": 2})
    api("post", f"{r}/workers/w1/claim", json={})  # 204 or 409 when full
    claimed = api("post", f"{r}/workers/w1/claim", json={"max_tasks": 1})
    if claimed.status_code == 201:
        api("post", f"{r}/workers/w1/release", json={"lease_ids": [claimed.get_json()["lease"]["id"]]})
    api("post", f"{r}/workers/w1/release", json={"lease_ids": ["gone"]})
    api("post", f"{r}/workers/nobody/release", json={"lease_ids": ["gone"]})  # 404
    api("post", f"{r}/workers/w1/release", json={})  # 400
    api("post", f"{r}/llm-tasks/{task['id']}/cancel")  # 409: completed
    queued = api("post", f"{r}/llm-tasks", json=TASK).get_json()
    api("post", f"{r}/llm-tasks/{queued['id']}/cancel")
    api("post", f"{r}/llm-tasks/{queued['id']}/requeue")  # 409: cancelled
    api("post", f"{r}/llm-tasks/{queued['id']}/dispatch")  # 409: no BLOOM_PUBLIC_URL

    api("get", f"{r}/leases")
    api("get", f"{r}/leases?status=active")
    api("get", f"{r}/runs")
    artifact = api("get", f"{r}/artifacts?task_id={task['id']}").get_json()[0]
    api("get", f"{r}/artifacts/{artifact['id']}")
    api("get", f"{r}/audit?limit=50")
    api("get", f"{r}/stats")
    api("get", f"{r}/llm-tasks?limit=abc")  # 400
    agent = agents("ops")  # this app has no agent key: the agent refuses every operation but /health
    api("post", f"{r}/workers", json={"name": "ops", "url": agent.url})
    api("get", f"{r}/workers/ops/agent-health")
    for operation in ("agent-update", "agent-restart", "agent-uninstall"):
        api("post", f"{r}/workers/ops/{operation}", json={})  # 502
        api("post", f"{r}/workers/w1/{operation}", json={})  # 400: no url
    project = api("post", f"{r}/projects", json={"name": "garden", "repo_url": "https://x.org/g.git"}).get_json()
    api("post", f"{r}/projects", json={"name": "garden", "repo_url": "https://x.org/g.git"})  # 409
    api("get", f"{r}/projects")
    api("get", f"{r}/projects/{project['id']}")
    api("get", f"{r}/projects/{project['id']}/node-status")
    api("post", f"{r}/projects/{project['id']}/clone", json={})  # 400: no node
    api("post", f"{r}/projects/{project['id']}/clone", json={"node_id": "ops"})  # 502: the agent wants its key
    api("post", f"{r}/projects/{project['id']}/propagate", json={})
    api("post", f"{r}/projects/{project['id']}/sync-memory", json={"node_id": "ops"})  # 502: nothing upstream
    api("delete", f"{r}/projects/{project['id']}")
    api("get", f"{r}/projects/{project['id']}")  # 404
    api("get", f"{r}/agent-install-script?server_url=http://10.0.0.5:3002&node_id=n1")
    api("get", f"{r}/agent-install-script?port=0")  # 400
    api("delete", f"{r}/workers/w1")
    api("get", "/api/membridge/health")  # 502: nothing listens upstream

    checked = {(method, path) for method, path, _ in api.document.checked}
    documented = {(method.upper(), path) for path, operations in api.document.spec["paths"].items()
                  for method in operations if path != "/api/runtime/openapi.json"}
    # Every route of the runtime's own is walked (the Membridge proxy's are the upstream's shapes).
    assert {route for route in documented - checked if not route[1].startswith("/api/membridge/")} == {
        ("GET", "/api/runtime/artifacts/{artifact_id}/content"), ("GET", "/metrics"),
        ("POST", "/api/runtime/deliveries/{lease_id}/api/runtime/llm-tasks/{task_id}/heartbeat"),
    }


def test_the_api_reference_in_docs_is_the_one_the_service_writes(client):
    """docs/API.md cannot drift: it is what `python -m bloom.api_reference` writes from
    the same document the running service serves (`make api-docs` writes it again)."""
    from pathlib import Path

    from bloom.api_reference import render

    served = client.get("/api/runtime/openapi.json").get_json()
    written = (Path(__file__).resolve().parent.parent / "docs" / "API.md").read_text(encoding="utf-8")
    assert render(served) == written, "docs/API.md is stale: run `make api-docs`"
