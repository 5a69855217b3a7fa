"""docs/API.md, the API reference the project owns, written from the OpenAPI document.

    .venv/bin/python -m bloom.api_reference > docs/API.md      (make api-docs)

Every route, its body and query fields, its answers, and every object's fields come
from the same schemas the service validates and answers with, so the reference cannot
drift from the service: a test compares docs/API.md with what this writes.
"""
from __future__ import annotations

import sys
from typing import Any

from flask import Flask

from .api import register_blueprints
from .api.converters import WorkerIdConverter
from .web.openapi import build_openapi

PREFACE = """# BLOOM Runtime API reference

Written by `python -m bloom.api_reference` from the service's own OpenAPI document
(`GET /api/runtime/openapi.json`); a test keeps the two equal. README.md says how to run
the service and how to use it; this file says what every route takes and answers.

## Conventions

- JSON in and out; times are epoch **milliseconds**; ids are text (UUIDs; a worker's id
  is its name, percent-encoded as one path segment: `rack/1` → `/workers/rack%2F1`).
- Integers are strict (`"300"`, `2.5` or `true` where an integer is expected are 400).
- Errors: `{"error": "<message>"}`; validation errors (400) are
  `{"error": {"formErrors": [...], "fieldErrors": {"field": ["...", ...]}}}`.
- Auth: `X-Runtime-API-Key` on every `/api/runtime/*` and `/api/membridge/*` route but
  the open ones (health, ready, openapi.json, test-connection); with `BLOOM_OPERATOR_KEY`
  set, the runtime key opens only the workers' routes (register, claim, heartbeats,
  completions, delivery callbacks) and the operator key everything (README, "Security").
- Lists take `limit` (1..1000, default 100) and `offset`, newest first.

## Life cycle of a task

```
queued --lease / claim / dispatch--> leased --heartbeat--> running --complete--> completed
   ^                                   |                     |          \\--error, attempts left--> queued (retry_at)
   |                                   |                     |          \\--error, last attempt---> failed --requeue--> queued
   +--- lease expired (sweep), worker dead or removed -------+--> queued, or dead when its attempts are spent
queued / leased / running --cancel--> cancelled
```

A task has at most one active lease. A lease is renewed by a heartbeat (task or worker)
before `expires_at`; one past it is lost (409). `complete` is accepted once, from the
holder of the current lease when `lease_id` is given (or the delivery URL an agent was
given); a second completion is 409. A task is granted only when due (`run_at`,
`retry_at`), only to an online worker with `claude_cli` and free capacity (one capacity
per agent url).

## The queue's order: fair shares

Claims and dispatch take queued tasks by `priority` (higher first), then in turns across
fairness keys: a task's `concurrency_key`, or its `context_id` when it has none. Each
key's tasks take consecutive turns from the head of the queue on, so a key that adds ten
tasks behind another's thousand is served one task in two, not after the thousand; within
a turn, older first. A key may be capped: `policy.max_running_per_key` on a task (or
`BLOOM_MAX_RUNNING_PER_KEY` for all) holds its tasks queued while the key has that many
leased or running, and workers take other keys' tasks meanwhile; a lease of such a task
answers 409. `GET /stats` counts the keys with queued tasks and lists the busiest.

## Routes
"""

_ERROR_STATUSES = {"400", "401", "413", "414", "429", "500", "503"}


def reference_app() -> Flask:
    """The routes alone (no database): what the OpenAPI document is built from."""
    app = Flask("bloom-reference")
    app.url_map.converters["worker_id"] = WorkerIdConverter
    register_blueprints(app)
    return app


def _name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if schema.get("type") == "array" and "items" in schema:
        return f"{_name(schema['items'])}[]"
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _name(schema["allOf"][0])
    return schema.get("type", "any")


def _notes(schema: dict[str, Any]) -> str:
    notes = []
    if "enum" in schema:
        notes.append(" \\| ".join(f"`{value}`" for value in schema["enum"] if value is not None))
    for key, word in (("minimum", "min"), ("maximum", "max"), ("minLength", "min length"),
                      ("maxLength", "max length"), ("maxItems", "max items")):
        if key in schema:
            notes.append(f"{word} {schema[key]}")
    if schema.get("default") is not None:
        notes.append(f"default `{schema['default']}`")
    if schema.get("nullable"):
        notes.append("may be null")
    if schema.get("description"):
        notes.append(schema["description"])
    return "; ".join(notes)


def _fields(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    rows = ["| field | type | required | notes |", "|---|---|---|---|"]
    for name, field in schema.get("properties", {}).items():
        rows.append(f"| `{name}` | {_name(field)} | {'yes' if name in required else 'no'} | {_notes(field)} |")
    return rows


def render(spec: dict[str, Any]) -> str:
    components = spec["components"]["schemas"]
    lines = [PREFACE.rstrip()]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            lines += ["", f"### {method.upper()} `{path}`", "", operation["summary"] + "."]
            lines += ["", "Auth: " + ("`X-Runtime-API-Key`" if operation.get("security") else "open") + "."]
            queries = [p for p in operation.get("parameters", []) if p["in"] == "query"]
            if queries:
                lines += ["", "Query:", "", "| parameter | type | notes |", "|---|---|---|"]
                lines += [f"| `{p['name']}` | {_name(p['schema'])} | {_notes(p['schema'])} |" for p in queries]
            body = operation.get("requestBody")
            if body is not None:
                schema = body["content"]["application/json"]["schema"]
                name = _name(schema)
                lines += ["", f"Body (`{name}`{'' if body.get('required') else ', optional'}):", ""]
                lines += _fields(components.get(name, schema))
            answers = [
                f"`{status}` {answer['description']}" + (
                    f" → `{_name(answer['content']['application/json']['schema'])}`"
                    if "application/json" in answer.get("content", {}) and status not in _ERROR_STATUSES else "")
                for status, answer in sorted(operation["responses"].items()) if status not in _ERROR_STATUSES
            ]
            lines += ["", "Answers: " + "; ".join(answers) + ". Errors as above (400, 401, 413, 429, 500, 503)."]
    lines += ["", "## Objects"]
    for name, schema in components.items():
        if "properties" not in schema:
            continue
        lines += ["", f"### {name}", ""] + _fields(schema)
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render(build_openapi(reference_app())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
