"""The fast loaders of task bodies (bloom/task_bodies.py) accept only what the marshmallow
schemas accept, and return exactly what they return: thousands of generated bodies,
valid and not, loaded both ways. Each field's values come from the schema's own
validators (edge_values: every bound, one past it, the wrong types), so a bound added
to a schema and not to the fast loaders fails here; the hand-written pools add the odd
values JSON can carry (NaN, 10**400, control characters, unknown keys)."""
from __future__ import annotations

import json
import random

import pytest
from marshmallow import Schema, ValidationError, fields, validate

from bloom import task_bodies
from bloom.schemas import (
    BatchTaskSchema,
    ClaimSchema,
    CompleteTaskSchema,
    CreateTaskSchema,
    CreateTasksSchema,
    FencingSchema,
    LeaseTaskSchema,
    WorkerHeartbeatSchema,
)

MISSING = object()

KEY_TEXTS = ["c", "a" * 255, "ünï-\u2028", "a" * 256, "", "x\ny", "x\x7f", 5, None, True, ["a"]]
FIELDS = {
    "context_id": KEY_TEXTS,
    "agent_slug": KEY_TEXTS,
    "prompt": ["p", "x" * 5000, "", None, 3, ["p"]],
    "context_hints": [MISSING, [], ["a", "b"], ["a", 1], None, "ab", [None], {"a": 1}],
    "policy": [MISSING, {}, {"timeout_sec": 60}, {"timeout_sec": 3600, "budget": 2.5}, {"budget": 0}, {"budget": 7},
               {"timeout_sec": 0}, {"timeout_sec": 3601}, {"timeout_sec": True}, {"timeout_sec": 60.0},
               {"budget": -1}, {"budget": float("nan")}, {"budget": float("inf")}, {"budget": 10**400},
               {"budget": True}, {"budget": "1"}, {"budget": None}, {"timeout_sec": None}, None, [], {"extra": 1},
               {"max_running_per_key": 2}, {"timeout_sec": 5, "budget": 1, "max_running_per_key": 1_000_000},
               {"max_running_per_key": 0}, {"max_running_per_key": 1_000_001}, {"max_running_per_key": True},
               {"max_running_per_key": 2.0}, {"max_running_per_key": None}, {"max_running_per_key": "2"}],
    "desired_format": [MISSING, "json", "text", "JSON", None, 1, ["json"]],
    "max_attempts": [MISSING, 1, 10, 0, 11, True, 3.0, "3", None, 2**70],
    "priority": [MISSING, 0, -(2**31), 2**31 - 1, 2**31, -(2**31) - 1, False, 1.5, None],
    "run_at": [MISSING, None, 0, 2**62, 2**62 + 1, -1, True, 1.0, "1"],
    "idempotency_key": [MISSING, None, "k", "", "k" * 256, "a\tb", 1],
    "concurrency_key": [MISSING, "notebook-1", "k" * 128, None, "k" * 129, "", "a\u200bb", "x\ny", "a\u2028b",
                        "ü ö", 5, True, ["k"]],
    "id": [MISSING, "x", None],  # unknown keys are dropped
}


def _bounds(field, kind) -> tuple:
    """(min, max) of the field's Range or Length validator, (None, None) without one."""
    for validator in field.validators:
        if isinstance(validator, kind):
            return validator.min, validator.max
    return None, None


def _checks_control_characters(field) -> bool:
    return any(getattr(validator, "__name__", "") == "_no_control_characters" for validator in field.validators)


def edge_values(field) -> list:
    """Values for one schema field, read off its validators: three valid ones first (the
    generator takes mostly those), then every edge just outside, and wrong types."""
    valid, invalid = _edges(field)
    if field.required:
        invalid.append(MISSING)
    else:
        valid.insert(0, MISSING)
    valid = (valid * 3)[:max(3, len(valid))]  # at least three
    return valid + invalid


def _edges(field) -> tuple[list, list]:
    """(valid, invalid) values of a field, whether or not it may be left out."""
    valid: list = []
    invalid: list = [[1], {"a": 1}]
    if isinstance(field, fields.Integer):
        low, high = _bounds(field, validate.Range)
        low, high = (-5 if low is None else low), (5 if high is None else high)
        valid += [low, high, (low + high) // 2]
        invalid += [low - 1, high + 1, True, float(low), str(low)]
    elif isinstance(field, fields.Float):
        low, high = _bounds(field, validate.Range)
        low = 0 if low is None else low
        valid += [low, low + 0.5] + ([high] if high is not None else [low + 10**6])
        invalid += [low - 0.5, float("nan"), float("-inf"), True, str(low)]
        if high is not None:
            invalid += [high + 0.5, float("inf"), 10**400]
    elif isinstance(field, fields.String):
        choices = next((v.choices for v in field.validators if isinstance(v, validate.OneOf)), None)
        if choices:
            valid += list(choices)
            invalid += ["not-" + list(choices)[0], list(choices)[0].upper()]
        else:
            low, high = _bounds(field, validate.Length)
            valid += ["x" * max(low or 0, 1), "ü" * (high if high is not None else 300), "a b-\u2028"]
            if low:
                invalid.append("x" * (low - 1))
            if high is not None:
                invalid.append("x" * (high + 1))
            (invalid if _checks_control_characters(field) else valid).extend(["x\ny", "x\x7f"])
        invalid += [5, ["x"]]
    elif isinstance(field, fields.List):
        inner_valid, inner_invalid = _edges(field.inner)
        low, high = _bounds(field, validate.Length)
        valid += [[inner_valid[0]] * max(low or 0, 1), inner_valid[:2]]
        valid.append([inner_valid[1]] * high if high is not None else list(inner_valid))
        if low:
            invalid.append([inner_valid[0]] * (low - 1))
        if high is not None:
            invalid.append([inner_valid[0]] * (high + 1))
        invalid += [[value] for value in inner_invalid] + ["x", {}]
    elif isinstance(field, fields.Nested):
        nested = edge_pools(field.schema)
        base = {name: values[0] for name, values in nested.items() if values[0] is not MISSING}
        valid += [base, {name: values[1] for name, values in nested.items() if values[1] is not MISSING}]
        for name, values in nested.items():
            valid.append({**base, name: values[2]} if values[2] is not MISSING else base)
            invalid += [{**base, name: value} for value in values[3:] if value is not MISSING]
        invalid += ["x"]
    (valid if field.allow_none else invalid).append(None)
    return valid, invalid


def edge_pools(schema) -> dict[str, list]:
    return {name: edge_values(field) for name, field in schema.fields.items()}


def pools(schema_class: type[Schema], hand_written: dict[str, list]) -> dict[str, list]:
    """The schema's generated values, then the hand-written ones, per field."""
    generated = edge_pools(schema_class())
    merged = {name: values + hand_written.get(name, []) for name, values in generated.items()}
    return {**merged, **{name: values for name, values in hand_written.items() if name not in generated}}


def generated_body(rng: random.Random, fields: dict[str, list] = FIELDS) -> dict:
    body = {}
    for name, values in fields.items():
        # Mostly a valid value (the first three or so), so that whole batches pass too.
        value = rng.choice(values[:3]) if rng.random() < 0.9 else rng.choice(values)
        if value is not MISSING:
            body[name] = value
    return body


def marshmallow_load(schema_class, body):
    try:
        return schema_class().load(body)
    except ValidationError:
        return None


def same(fast, slow) -> bool:
    """Equal, types included (1 == 1.0 == True in Python; not in JSON text)."""
    return json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True)


def test_a_single_task_body_loads_as_the_schema_loads_it():
    rng = random.Random(23)
    fast_taken = 0
    task_pools = pools(CreateTaskSchema, FIELDS)
    for _ in range(6000):
        body = generated_body(rng, task_pools)
        body.pop("idempotency_key", None)  # not a field of a single create
        slow = marshmallow_load(CreateTaskSchema, body)
        fast = task_bodies.single_task(body)
        if fast is not None:
            fast_taken += 1
            assert slow is not None and same(fast, slow), body
    assert fast_taken > 1000  # the common bodies do take the fast path


def test_a_batch_loads_as_the_schema_loads_it():
    rng = random.Random(7)
    fast_taken = 0
    item_pools = pools(BatchTaskSchema, FIELDS)
    for _ in range(3000):
        body = {"tasks": [generated_body(rng, item_pools) for _ in range(rng.choice([1, 1, 2, 3]))]}
        slow = marshmallow_load(CreateTasksSchema, body)
        fast = task_bodies.task_batch(body)
        if fast is not None:
            fast_taken += 1
            assert slow is not None and same(fast, slow), body
        elif slow is not None:
            pass  # marshmallow alone decides the unusual (true for 1, a float budget of int type...)
    assert fast_taken > 300


def test_batch_bounds_and_shapes_are_left_to_the_schema():
    item = {"context_id": "c", "agent_slug": "a", "prompt": "p"}
    for body in ({"tasks": []}, {"tasks": [item] * 1001}, {"tasks": None}, {}, {"tasks": item}, [item]):
        assert task_bodies.task_batch(body) is None
    full = task_bodies.task_batch({"tasks": [item] * 1000, "extra": True})
    assert full is not None and same(full, marshmallow_load(CreateTasksSchema, {"tasks": [item] * 1000}))


OPTIONAL_KEY_TEXTS = [MISSING, None, "lease-1", "a" * 256, "", "x\ny", 5, True]
LIFECYCLE_FIELDS = {
    "worker_id": OPTIONAL_KEY_TEXTS,
    "lease_id": OPTIONAL_KEY_TEXTS,
    "ttl_seconds": [MISSING, 300, 1, 86400, 0, 86401, True, 30.0, "30", None],
    "status": ["success", "error", "done", None, 1, ["success"], MISSING],
    "output": [MISSING, "text", None, "", 5, {"a": 1}, ["x"]],
    "error_message": [MISSING, None, "boom", 3, ["x"]],
    "metrics": [{"duration_ms": 5}, {"duration_ms": 0, "tokens_used": None}, {"duration_ms": 7, "tokens_used": 12},
                {"duration_ms": 2**62, "extra": 1}, {}, {"duration_ms": -1}, {"duration_ms": 2**62 + 1},
                {"duration_ms": 1.0}, {"duration_ms": True}, {"duration_ms": 1, "tokens_used": -1},
                {"duration_ms": 1, "tokens_used": 1.5}, None, [], MISSING],
    "artifact_type": [MISSING, "LLM_RESULT", None, "t" * 128, "", "t" * 129, 7],
    "artifact_tags": [MISSING, [], ["a", "b"], None, ["a"] * 65, ["a"] * 64, [""], ["a\tb"], "a", [1]],
    "extra": [MISSING, "ignored"],
}

WORKER_API_FIELDS = {
    "lease_ids": [MISSING, ["l-1", "l-2"], None, [], ["l"] * 1000, ["l"] * 1001, [""], ["a\nb"], [1], "l-1", {}],
    "ttl_seconds": [MISSING, 300, 30, 0, 86401, True, 30.0, None],
    "wait_seconds": [MISSING, 0, 2.5, 30, 30.5, -1, True, "1", None, float("nan"), float("inf"), 10**400],
    "agent_slugs": [MISSING, None, ["a", "b"], [], ["a"] * 101, ["a"] * 100, [""], [5], "a"],
    "max_tasks": [MISSING, None, 8, 1, 32, 0, 33, True, 8.0, "8"],
    "extra": [MISSING, 1],
}


@pytest.mark.parametrize("schema_class, loader, fields", [
    (LeaseTaskSchema, task_bodies.lease, LIFECYCLE_FIELDS), (FencingSchema, task_bodies.fencing, LIFECYCLE_FIELDS),
    (CompleteTaskSchema, task_bodies.completion, LIFECYCLE_FIELDS),
    (WorkerHeartbeatSchema, task_bodies.worker_heartbeat, WORKER_API_FIELDS),
    (ClaimSchema, task_bodies.claim, WORKER_API_FIELDS),
])
def test_the_hot_bodies_load_as_the_schemas_load_them(schema_class, loader, fields):
    rng = random.Random(schema_class.__name__)
    fast_taken = 0
    fields = pools(schema_class, fields)
    for _ in range(6000):
        body = generated_body(rng, fields)
        slow = marshmallow_load(schema_class, body)
        fast = loader(body)
        if fast is not None:
            fast_taken += 1
            assert slow is not None and same(fast, slow), body
    assert fast_taken > 1000
    for odd in ([], None, "body", 5):
        assert loader(odd) is None
