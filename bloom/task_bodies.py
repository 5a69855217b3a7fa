"""Task bodies the common way written, loaded without marshmallow's per-field machinery.

A 1,000-task batch spent about half of its time in the service in marshmallow: 100,000
field loads, each through several layers of calls (docs/PERFORMANCE.md); a lease,
heartbeat or completion spends a few per cent of its CPU there. These loaders accept only
a body that the schemas of the task routes and of the worker API in bloom/schemas.py
(CreateTaskSchema, CreateTasksSchema, LeaseTaskSchema, FencingSchema, CompleteTaskSchema,
WorkerHeartbeatSchema, ClaimSchema) would accept, and
return what they would return; anything else, or anything unusual (a float where an
integer goes, a null where a list goes), they leave to marshmallow by returning None, so
every error message still comes from the schemas. Kept equal to them by
tests/test_task_bodies.py, which loads thousands of generated bodies both ways.
"""
from __future__ import annotations

import math
from typing import Any

from .bounds import (
    ARTIFACT_TYPE_LENGTH,
    COMPLETION_STATUSES,
    COUNT_RANGE,
    DEFAULT_ARTIFACT_TYPE,
    DEFAULT_FORMAT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    DEFAULT_TIMEOUT_SEC,
    DEFAULT_TTL_SECONDS,
    KEY_TEXT_MAX,
    MAX_ARTIFACT_TAGS,
    MAX_ATTEMPTS_RANGE,
    MAX_CLAIM_AGENT_SLUGS,
    MAX_HEARTBEAT_LEASE_IDS,
    MAX_RUNNING_PER_KEY_RANGE,
    MAX_TASKS_PER_BATCH,
    MAX_TASKS_PER_CLAIM,
    PRIORITY_RANGE,
    RUN_AT_RANGE,
    TASK_FORMATS,
    TIMEOUT_SEC_RANGE,
    TTL_SECONDS_RANGE,
    WAIT_SECONDS_RANGE,
)
from .schemas import _CONTROL_CHARACTER, printable_key

_MISSING = object()


def _key_text(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= KEY_TEXT_MAX and not _CONTROL_CHARACTER.search(value)


def _integer(value: Any, bounds: tuple[int, int]) -> bool:
    return type(value) is int and bounds[0] <= value <= bounds[1]


def _policy(value: Any) -> dict[str, Any] | None:
    if value is _MISSING:
        return {"timeout_sec": DEFAULT_TIMEOUT_SEC, "budget": 0}
    if type(value) is not dict:
        return None
    timeout_sec = value.get("timeout_sec", DEFAULT_TIMEOUT_SEC)
    budget = value.get("budget", _MISSING)
    if not _integer(timeout_sec, TIMEOUT_SEC_RANGE):
        return None
    if budget is _MISSING:
        return _with_key_cap(value, {"timeout_sec": timeout_sec, "budget": 0})
    if type(budget) not in (int, float):
        return None
    try:
        budget = float(budget)
    except OverflowError:  # an integer past float's range
        return None
    if not math.isfinite(budget) or budget < 0:
        return None
    loaded = {"timeout_sec": timeout_sec, "budget": budget}
    return _with_key_cap(value, loaded)


def _with_key_cap(value: dict[str, Any], loaded: dict[str, Any]) -> dict[str, Any] | None:
    """policy.max_running_per_key, when given (no default)."""
    if "max_running_per_key" not in value:
        return loaded
    cap = value["max_running_per_key"]
    if not _integer(cap, MAX_RUNNING_PER_KEY_RANGE):
        return None
    return {**loaded, "max_running_per_key": cap}


def task(item: Any, *, with_idempotency_key: bool = False) -> dict[str, Any] | None:
    """One task body as CreateTaskSchema (BatchTaskSchema with with_idempotency_key)
    loads it, or None: then marshmallow decides."""
    if type(item) is not dict:
        return None
    get = item.get
    context_id, agent_slug, prompt = get("context_id"), get("agent_slug"), get("prompt")
    if not (_key_text(context_id) and _key_text(agent_slug) and type(prompt) is str and prompt):
        return None
    hints = get("context_hints", _MISSING)
    if hints is _MISSING:
        hints = []
    elif type(hints) is list and all(type(hint) is str for hint in hints):
        hints = list(hints)
    else:
        return None
    policy = _policy(get("policy", _MISSING))
    desired_format = get("desired_format", DEFAULT_FORMAT)
    max_attempts = get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    priority = get("priority", DEFAULT_PRIORITY)
    run_at = get("run_at")
    if (policy is None or desired_format not in TASK_FORMATS or type(desired_format) is not str
            or not _integer(max_attempts, MAX_ATTEMPTS_RANGE) or not _integer(priority, PRIORITY_RANGE)
            or not (run_at is None or _integer(run_at, RUN_AT_RANGE))):
        return None
    loaded = {
        "context_id": context_id, "agent_slug": agent_slug, "prompt": prompt, "context_hints": hints,
        "policy": policy, "desired_format": desired_format, "max_attempts": max_attempts,
        "priority": priority, "run_at": run_at,
    }
    if "concurrency_key" in item:  # no default: absent stays absent
        concurrency_key = item["concurrency_key"]
        if not (concurrency_key is None or printable_key(concurrency_key)):
            return None
        loaded["concurrency_key"] = concurrency_key
    if with_idempotency_key:
        key = get("idempotency_key")
        if not (key is None or _key_text(key)):
            return None
        loaded["idempotency_key"] = key
    return loaded


def single_task(body: Any) -> dict[str, Any] | None:
    """POST /llm-tasks."""
    return task(body)


def task_batch(body: Any) -> dict[str, Any] | None:
    """POST /llm-tasks/batch: {"tasks": [...]} as CreateTasksSchema loads it, or None."""
    if type(body) is not dict:
        return None
    items = body.get("tasks")
    if type(items) is not list or not 1 <= len(items) <= MAX_TASKS_PER_BATCH:
        return None
    loaded = []
    for item in items:
        one = task(item, with_idempotency_key=True)
        if one is None:
            return None
        loaded.append(one)
    return {"tasks": loaded}


def _optional_key_text(value: Any) -> bool:
    return value is None or _key_text(value)


def lease(body: Any) -> dict[str, Any] | None:
    """POST /llm-tasks/<id>/lease as LeaseTaskSchema loads it, or None."""
    if type(body) is not dict:
        return None
    worker_id, ttl_seconds = body.get("worker_id"), body.get("ttl_seconds", DEFAULT_TTL_SECONDS)
    if not (_optional_key_text(worker_id) and _integer(ttl_seconds, TTL_SECONDS_RANGE)):
        return None
    return {"worker_id": worker_id, "ttl_seconds": ttl_seconds}


def fencing(body: Any) -> dict[str, Any] | None:
    """A task heartbeat's body as FencingSchema loads it, or None."""
    if type(body) is not dict:
        return None
    lease_id, worker_id = body.get("lease_id"), body.get("worker_id")
    if not (_optional_key_text(lease_id) and _optional_key_text(worker_id)):
        return None
    return {"lease_id": lease_id, "worker_id": worker_id}


def _metrics(value: Any) -> dict[str, Any] | None:
    if type(value) is not dict or not _integer(value.get("duration_ms"), COUNT_RANGE):
        return None
    loaded = {"duration_ms": value["duration_ms"]}
    if "tokens_used" in value:  # no default: absent stays absent
        tokens_used = value["tokens_used"]
        if not (tokens_used is None or _integer(tokens_used, COUNT_RANGE)):
            return None
        loaded["tokens_used"] = tokens_used
    return loaded


def completion(body: Any) -> dict[str, Any] | None:
    """POST /llm-tasks/<id>/complete as CompleteTaskSchema loads it, or None."""
    if type(body) is not dict:
        return None
    get = body.get
    fence = fencing(body)
    status, output, error_message = get("status"), get("output"), get("error_message")
    metrics = _metrics(get("metrics"))
    artifact_type = get("artifact_type", DEFAULT_ARTIFACT_TYPE)
    tags = get("artifact_tags", _MISSING)
    if tags is _MISSING:
        tags = []
    else:
        tags = _key_texts(tags, MAX_ARTIFACT_TAGS)
        if tags is None:
            return None
    if (fence is None or metrics is None or status not in COMPLETION_STATUSES or type(status) is not str
            or not (output is None or type(output) is str)
            or not (error_message is None or type(error_message) is str)
            or not (artifact_type is None or (type(artifact_type) is str
                                              and ARTIFACT_TYPE_LENGTH[0] <= len(artifact_type) <= ARTIFACT_TYPE_LENGTH[1]))):
        return None
    return {**fence, "status": status, "output": output, "error_message": error_message, "metrics": metrics,
            "artifact_type": artifact_type, "artifact_tags": tags}


def _key_texts(value: Any, most: int) -> list[str] | None:
    if type(value) is list and len(value) <= most and all(_key_text(item) for item in value):
        return list(value)
    return None


def worker_heartbeat(body: Any) -> dict[str, Any] | None:
    """POST /workers/<id>/heartbeat as WorkerHeartbeatSchema loads it, or None."""
    if type(body) is not dict:
        return None
    lease_ids = body.get("lease_ids")
    if lease_ids is None:
        return {"lease_ids": None}
    lease_ids = _key_texts(lease_ids, MAX_HEARTBEAT_LEASE_IDS)
    return None if lease_ids is None else {"lease_ids": lease_ids}


def claim(body: Any) -> dict[str, Any] | None:
    """POST /workers/<id>/claim as ClaimSchema loads it, or None."""
    if type(body) is not dict:
        return None
    get = body.get
    ttl_seconds, wait_seconds = get("ttl_seconds", DEFAULT_TTL_SECONDS), get("wait_seconds", _MISSING)
    agent_slugs, max_tasks = get("agent_slugs"), get("max_tasks")
    if wait_seconds is _MISSING:
        wait_seconds = 0
    elif type(wait_seconds) in (int, float) and WAIT_SECONDS_RANGE[0] <= wait_seconds <= WAIT_SECONDS_RANGE[1]:
        wait_seconds = float(wait_seconds)  # NaN fails the range
    else:
        return None
    if agent_slugs is not None:
        agent_slugs = _key_texts(agent_slugs, MAX_CLAIM_AGENT_SLUGS)
        if agent_slugs is None:
            return None
    if not (_integer(ttl_seconds, TTL_SECONDS_RANGE)
            and (max_tasks is None or (type(max_tasks) is int and 1 <= max_tasks <= MAX_TASKS_PER_CLAIM))):
        return None
    return {"ttl_seconds": ttl_seconds, "wait_seconds": wait_seconds, "agent_slugs": agent_slugs,
            "max_tasks": max_tasks}
