"""Marshmallow schemas for every request body and query string (docs/API.md).

Integers are strict (no "300", 2.5 or true), booleans are JSON booleans only, numbers
are JSON numbers only. Unknown keys are dropped, as the Express service's zod schemas
did, so existing clients that send extra fields keep working.
"""
from __future__ import annotations

import ipaddress
import json
import numbers
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from . import bounds
from .bounds import AGENT_INFO_MAX, KEY_TEXT_MAX, MAX_OFFSET, URL_MAX, WORKER_STATUSES
from .errors import ValidationFailed

TASK_STATUSES = ("queued", "leased", "running", "completed", "failed", "dead", "cancelled")
LEASE_STATUSES = ("active", "expired", "released", "failed")


class StrictBoolean(fields.Boolean):
    def _deserialize(self, value: Any, attr, data, **kwargs) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StrictNumber(fields.Float):
    def _deserialize(self, value: Any, attr, data, **kwargs) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def NonEmptyString(**kwargs: Any) -> fields.String:
    return fields.String(validate=validate.Length(min=1), **kwargs)


def KeyText(**kwargs: Any) -> fields.String:
    """A non-empty text of at most KEY_TEXT_MAX characters, without control characters."""
    return fields.String(validate=[validate.Length(min=1, max=KEY_TEXT_MAX), _no_control_characters], **kwargs)


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def printable_key(value: Any) -> bool:
    """A concurrency_key: text of printable characters, of the allowed length."""
    low, high = bounds.CONCURRENCY_KEY_LENGTH
    return type(value) is str and low <= len(value) <= high and value.isprintable()


def _printable_key(value: str) -> None:
    if not printable_key(value):
        low, high = bounds.CONCURRENCY_KEY_LENGTH
        raise ValidationError(f"Must be {low} to {high} printable characters.")


def _no_control_characters(value: str) -> None:
    if _CONTROL_CHARACTER.search(value):
        raise ValidationError("Must not contain control characters.")


def _http_url(value: str) -> None:
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or any(c.isspace() for c in value):
        raise ValidationError("Must be an http:// or https:// URL.")
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port == 0:  # out of range, or not a number: no agent listens there
        raise ValidationError("Must have a port from 1 to 65535.")
    if _odd_ipv4_spelling(parsed.hostname):
        raise ValidationError("Must write an IPv4 address as four decimal numbers (a.b.c.d).")


def _odd_ipv4_spelling(host: str) -> bool:
    """2130706433, 0x7f000001, 127.1, 0177.0.0.1: what a resolver reads as an IPv4 address
    but is not written a.b.c.d (refused at every call later; refused here at once)."""
    try:
        ipaddress.IPv4Address(host)
        return False
    except ValueError:
        pass
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        return False


class OsInfo(fields.Raw):
    """What the agent says of its OS: a string or an object, kept as it came (bounded)."""

    def _deserialize(self, value: Any, attr, data, **kwargs) -> Any:
        if not isinstance(value, (str, dict)):
            raise ValidationError("Must be a string or an object.")
        if len(json.dumps(value)) > AGENT_INFO_MAX:
            raise ValidationError(f"Must be at most {AGENT_INFO_MAX} characters as JSON.")
        return value


class _Body(Schema):
    class Meta:
        unknown = EXCLUDE


class CapabilitiesSchema(_Body):
    claude_cli = StrictBoolean(load_default=True)
    max_concurrency = fields.Integer(strict=True, validate=validate.Range(*bounds.MAX_CONCURRENCY_RANGE), load_default=1)
    labels = fields.List(KeyText(), load_default=list, validate=validate.Length(max=64))


class RegisterWorkerSchema(_Body):
    # Any character Membridge accepts in an agent name ('/' included) except control
    # characters: every /workers/<id> route takes the id percent-encoded.
    name = fields.String(required=True, validate=[validate.Length(min=1, max=128), _no_control_characters])
    url = fields.String(load_default=None, allow_none=True, validate=[validate.Length(max=URL_MAX), _http_url])
    status = fields.String(load_default="online", validate=validate.OneOf(WORKER_STATUSES))
    capabilities = fields.Nested(CapabilitiesSchema, load_default=None, allow_none=True)
    ip_addrs = fields.List(KeyText(), load_default=None, allow_none=True, validate=validate.Length(max=64))
    agent_version = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=KEY_TEXT_MAX))
    os_info = OsInfo(load_default=None, allow_none=True)
    install_method = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=KEY_TEXT_MAX))


class PolicySchema(_Body):
    timeout_sec = fields.Integer(strict=True, validate=validate.Range(*bounds.TIMEOUT_SEC_RANGE),
                                 load_default=bounds.DEFAULT_TIMEOUT_SEC)
    budget = StrictNumber(validate=validate.Range(min=0), load_default=0)
    # No default: absent, BLOOM_MAX_RUNNING_PER_KEY applies (README, "Fair shares").
    max_running_per_key = fields.Integer(strict=True, validate=validate.Range(*bounds.MAX_RUNNING_PER_KEY_RANGE),
                                         metadata={"description": "the task's key runs at most this many at once"})


class CreateTaskSchema(_Body):
    context_id = KeyText(required=True)
    agent_slug = KeyText(required=True)
    prompt = NonEmptyString(required=True)
    context_hints = fields.List(fields.String(), load_default=list)
    policy = fields.Nested(PolicySchema, load_default=lambda: {"timeout_sec": bounds.DEFAULT_TIMEOUT_SEC, "budget": 0})
    desired_format = fields.String(load_default=bounds.DEFAULT_FORMAT, validate=validate.OneOf(bounds.TASK_FORMATS))
    max_attempts = fields.Integer(strict=True, validate=validate.Range(*bounds.MAX_ATTEMPTS_RANGE),
                                  load_default=bounds.DEFAULT_MAX_ATTEMPTS)
    priority = fields.Integer(strict=True, validate=validate.Range(*bounds.PRIORITY_RANGE),
                              load_default=bounds.DEFAULT_PRIORITY)
    # Not to be claimed or dispatched before this time (epoch ms).
    run_at = fields.Integer(strict=True, validate=validate.Range(*bounds.RUN_AT_RANGE), load_default=None,
                            allow_none=True)
    # The key the task shares the queue under (README, "Fair shares"); absent or null: its
    # context_id. No default, so a body without it loads as it did (and keeps the
    # fingerprint its Idempotency-Key was used with).
    concurrency_key = fields.String(validate=_printable_key, allow_none=True, metadata={
        "description": "1 to 128 printable characters; the key it takes turns under (default: its context_id)"})


class BatchTaskSchema(CreateTaskSchema):
    idempotency_key = KeyText(load_default=None, allow_none=True)


class CreateTasksSchema(_Body):
    tasks = fields.List(fields.Nested(BatchTaskSchema), required=True, validate=validate.Length(1, bounds.MAX_TASKS_PER_BATCH))


class LeaseTaskSchema(_Body):
    worker_id = KeyText(load_default=None, allow_none=True)
    ttl_seconds = fields.Integer(strict=True, validate=validate.Range(*bounds.TTL_SECONDS_RANGE),
                                 load_default=bounds.DEFAULT_TTL_SECONDS)


class DispatchTaskSchema(_Body):
    """Like a lease; without ttl_seconds the lease lasts policy.timeout_sec + 60 s."""

    worker_id = KeyText(load_default=None, allow_none=True)
    ttl_seconds = fields.Integer(strict=True, validate=validate.Range(*bounds.TTL_SECONDS_RANGE), load_default=None,
                                 allow_none=True)


class ClaimSchema(_Body):
    ttl_seconds = fields.Integer(strict=True, validate=validate.Range(*bounds.TTL_SECONDS_RANGE),
                                 load_default=bounds.DEFAULT_TTL_SECONDS)
    wait_seconds = StrictNumber(validate=validate.Range(*bounds.WAIT_SECONDS_RANGE), load_default=0)
    agent_slugs = fields.List(KeyText(), load_default=None, allow_none=True,
                              validate=validate.Length(max=bounds.MAX_CLAIM_AGENT_SLUGS))
    # Given: up to this many tasks, answered as {tasks, leases}; absent: one, as {task, lease}.
    max_tasks = fields.Integer(strict=True, validate=validate.Range(1, bounds.MAX_TASKS_PER_CLAIM), load_default=None)


class WorkerHeartbeatSchema(_Body):
    """The leases the worker believes it holds: only those are renewed (all of its
    leases when the field is absent), and those not renewed come back as lost."""

    lease_ids = fields.List(KeyText(), load_default=None, validate=validate.Length(max=bounds.MAX_HEARTBEAT_LEASE_IDS))


class WorkerReleaseSchema(_Body):
    """Leases the worker gives back (it will not run their tasks to the end)."""

    lease_ids = fields.List(KeyText(), required=True,
                            validate=validate.Length(min=1, max=bounds.MAX_HEARTBEAT_LEASE_IDS))


class FencingSchema(_Body):
    """Optional lease and worker a caller claims to hold; a mismatch is a 409."""

    lease_id = KeyText(load_default=None, allow_none=True)
    worker_id = KeyText(load_default=None, allow_none=True)


class MetricsSchema(_Body):
    duration_ms = fields.Integer(strict=True, required=True, validate=validate.Range(*bounds.COUNT_RANGE))
    # A Membridge agent always sends "tokens_used": null.
    tokens_used = fields.Integer(strict=True, allow_none=True, validate=validate.Range(*bounds.COUNT_RANGE))


class CompleteTaskSchema(FencingSchema):
    status = fields.String(required=True, validate=validate.OneOf(bounds.COMPLETION_STATUSES))
    output = fields.String(load_default=None, allow_none=True)
    error_message = fields.String(load_default=None, allow_none=True)
    metrics = fields.Nested(MetricsSchema, required=True)
    artifact_type = fields.String(load_default=bounds.DEFAULT_ARTIFACT_TYPE, allow_none=True,
                                  validate=validate.Length(*bounds.ARTIFACT_TYPE_LENGTH))
    artifact_tags = fields.List(KeyText(), load_default=list, allow_none=True,
                                validate=validate.Length(max=bounds.MAX_ARTIFACT_TAGS))


class ConfigUpdateSchema(_Body):
    membridge_server_url = fields.Url(required=True, require_tld=False, schemes={"http", "https"})
    admin_key = fields.String(required=True, validate=validate.Length(min=1, max=1024))


def _page_fields(default_limit: int) -> dict[str, fields.Field]:
    return {
        "limit": fields.Integer(load_default=default_limit, validate=validate.Range(1, 1000)),
        "offset": fields.Integer(load_default=0, validate=validate.Range(0, MAX_OFFSET)),
    }


PageQuery = Schema.from_dict(_page_fields(100), name="PageQuery")
# Without limit (and offset, status), the task and lease lists answer the overview the
# web client reads (tasks.service.list_tasks, leases.service.list_leases).
_OVERVIEW_PAGE = {
    "limit": fields.Integer(load_default=None, validate=validate.Range(1, 1000), metadata={
        "description": "without it (nor offset and status): every task or lease in flight, the newest "
                       "failed and dead tasks, and the newest others (README, 'API in brief')"}),
    "offset": fields.Integer(load_default=0, validate=validate.Range(0, MAX_OFFSET)),
}
TaskListQuery = Schema.from_dict(
    {**_OVERVIEW_PAGE, "status": fields.String(load_default=None, validate=validate.OneOf(TASK_STATUSES))},
    name="TaskListQuery",
)
LeaseListQuery = Schema.from_dict(
    {**_OVERVIEW_PAGE, "status": fields.String(load_default=None, validate=validate.OneOf(LEASE_STATUSES))},
    name="LeaseListQuery",
)
ArtifactListQuery = Schema.from_dict(
    {**_page_fields(100), "task_id": fields.String(load_default=None, validate=validate.Length(min=1))},
    name="ArtifactListQuery",
)


_INSTANCES: dict[type[Schema], Schema] = {}


def load(schema_class: type[Schema], data: Any, *, check_text: bool = True,
         fast: Callable[[Any], dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """Validate `data`; raise ValidationFailed in the formErrors/fieldErrors shape of
    docs/API.md. Without check_text, the caller knows no text in it holds what PostgreSQL
    cannot store (http.load_body). `fast`: a loader that returns what the schema would
    for the bodies it knows, and None for any other (bloom/task_bodies.py)."""
    if not isinstance(data, Mapping):
        raise ValidationFailed(["Expected an object"], {})
    loaded = fast(data) if fast is not None else None
    if loaded is None:
        schema = _INSTANCES.get(schema_class)
        if schema is None:  # building a schema costs more than loading with it: once per class
            schema = _INSTANCES.setdefault(schema_class, schema_class())
        try:
            loaded = schema.load(data)
        except ValidationError as error:
            raise _flatten(error.normalized_messages()) from None
    unstorable = check_text and _unstorable_text(loaded)  # unknown keys are dropped by now: only what we keep counts
    if unstorable:
        raise ValidationFailed([unstorable], {})
    return loaded


def _flatten(messages: Mapping[str, Any]) -> ValidationFailed:
    form_errors: list[str] = []
    field_errors: dict[str, list[str]] = {}
    for field_name, detail in messages.items():
        if field_name == "_schema":
            form_errors.extend(_messages(detail))
        else:
            field_errors[str(field_name)] = _messages(detail)
    return ValidationFailed(form_errors, field_errors)


def _messages(detail: Any, path: str = "") -> list[str]:
    """Nested messages become 'sub.path: message' under their top-level field."""
    if isinstance(detail, str):
        return [f"{path}: {detail}" if path else detail]
    if isinstance(detail, Mapping):
        out: list[str] = []
        for key, sub in detail.items():
            out.extend(_messages(sub, f"{path}.{key}" if path else str(key)))
        return out
    out = []
    for item in detail:
        out.extend(_messages(item, path))
    return out


def unstorable_reason(text: str) -> str | None:
    """Why PostgreSQL could not store this text, if it could not."""
    if "\x00" in text:
        return "Text must not contain NUL (\\u0000) characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "Text must be valid Unicode (no unpaired surrogates)"
    return None


def _unstorable_text(value: Any) -> str | None:
    if isinstance(value, str):
        return unstorable_reason(value)
    if isinstance(value, Mapping):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        reason = _unstorable_text(item)
        if reason:
            return reason
    return None


def _repository_url(value: str) -> None:
    if not (value.startswith(("http://", "https://", "git@")) and len(value) <= 1024) or any(
            c.isspace() for c in value):
        raise ValidationError("Must be an http(s):// or git@ repository URL of at most 1024 characters.")
    host = urlsplit(value).hostname if value.startswith("http") else value[4:].partition(":")[0].partition("/")[0]
    if host and _is_link_local(host):
        raise ValidationError("Must not point at a link-local address (where cloud metadata services answer).")


def _is_link_local(host: str) -> bool:
    """169.254.0.0/16 and fe80::/10, in any spelling a resolver takes (2852039166, 0xa9fea9fe, 169.254.43518)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_link_local
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host)).is_link_local
    except OSError:
        return False


class AgentUpdateSchema(_Body):
    repo_url = fields.String(load_default=None, allow_none=True, validate=_repository_url)
    branch = fields.String(load_default=None, allow_none=True,
                           validate=validate.Regexp(r"^[A-Za-z0-9._/-]{1,255}$", error="Must be a branch name."))


# What goes into the install script, and from there into files a shell reads on the node:
# a hostname's alphabet, and URLs of URL characters less those a shell makes anything of
# inside or around quotes (` $ ' " \\ and the like are refused, not escaped).
_HOSTNAME = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                            error="A hostname: letters, digits, '.', '_' and '-', at most 128.")
_SCRIPT_SAFE_URL = validate.Regexp(r"^[A-Za-z0-9._~:/?#\[\]@!&+,;=%-]+$",
                                   error="Only URL characters, without ` $ ' \" \\ ( ) * or spaces.")

InstallScriptQuery = Schema.from_dict({
    "server_url": fields.String(load_default=None, validate=[validate.Length(max=URL_MAX), _http_url,
                                                             _SCRIPT_SAFE_URL], metadata={
        "description": "the runtime's address as the node reaches it; default BLOOM_PUBLIC_URL"}),
    "node_id": fields.String(load_default=None, validate=_HOSTNAME,
                             metadata={"description": "default: the node's hostname"}),
    "port": fields.Integer(load_default=bounds.DEFAULT_AGENT_PORT, validate=validate.Range(1, 65535)),
    "repo_url": fields.String(load_default=None, validate=[_repository_url, _SCRIPT_SAFE_URL]),
}, name="InstallScriptQuery")


def _no_dot_dot(value: str) -> None:
    if ".." in value:
        raise ValidationError("Must not hold '..'.")


def _not_only_dots(value: str) -> None:
    if not value.strip(". "):
        raise ValidationError("Must hold a letter or digit ('.' and '..' name directories).")


def _in_the_agents_home(value: str) -> None:
    """Relative, or under the agent's own home (~/…, as the web client sends it): never an
    absolute path, nor another user's home (~user/…)."""
    if value.startswith("/") or (value.startswith("~") and not value.startswith("~/")):
        raise ValidationError("Must be relative or under the agent's home (~/…): not /… nor ~user/….")


class CreateProjectSchema(_Body):
    name = fields.String(required=True, validate=[validate.Regexp(
        r"^[A-Za-z0-9_.\- ]{1,256}$", error="1 to 256 letters, digits, '_', '-', '.' or spaces."), _not_only_dots])
    repo_url = fields.String(required=True, validate=_repository_url)
    target_path = fields.String(load_default=None, allow_none=True, validate=[
        validate.Regexp(r"^[A-Za-z0-9_.\-/~]{1,512}$", error="1 to 512 letters, digits, '_', '-', '.', '/' or '~'."),
        _no_dot_dot, _in_the_agents_home])
    primary_node_id = fields.String(load_default=None, allow_none=True,
                                    validate=[validate.Length(min=1, max=128), _no_control_characters])


class CloneSchema(_Body):
    node_id = fields.String(load_default=None, allow_none=True, validate=[validate.Length(min=1, max=128),
                                                                          _no_control_characters])


class SyncMemorySchema(_Body):
    direction = fields.String(load_default="push", validate=validate.OneOf(["push", "pull"]))
    node_id = fields.String(load_default=None, allow_none=True, validate=[validate.Length(min=1, max=128),
                                                                          _no_control_characters])
