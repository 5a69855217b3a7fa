"""Worker sync: Membridge's agents become (or update) local workers (README, "Membridge").

An upstream failure of any kind (unreachable, 401, 5xx, not JSON, not a list)
changes nothing locally. Inside a list, entries without a usable name or with wrong
types are skipped and logged; the others are applied.
"""
from __future__ import annotations

import json
import logging
import numbers
from dataclasses import dataclass
from typing import Any

from ..bounds import WORKER_STATUSES
from ..db import Database
from ..membridge.client import SYNC_TIMEOUT_S, MembridgeClient, UpstreamUnreachable
from ..shapes import DEFAULT_CAPABILITIES
from ..stamps import now_ms

log = logging.getLogger(__name__)



class SyncFailed(Exception):
    pass


@dataclass(frozen=True)
class SyncOutcome:
    inserted: int
    updated: int
    skipped: int
    offlined: int


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def parse_agent(agent: Any, now: int) -> dict[str, Any]:
    """One upstream agent as a worker row; absent fields are None (keep stored value).

    Raises ValueError naming the first thing wrong with the entry.
    """
    if not isinstance(agent, dict):
        raise ValueError("entry is not an object")
    name = next((agent[key] for key in ("name", "node_id", "id") if agent.get(key) is not None), None)
    if not isinstance(name, str) or not name.strip() or len(name) > 128:
        raise ValueError("no usable name")
    url = agent.get("url")
    if url is not None and not isinstance(url, str):
        raise ValueError("url is not a string")
    status = agent.get("status", "unknown")
    if not isinstance(status, str):
        raise ValueError("status is not a string")
    last_seen = agent.get("last_seen")
    if last_seen is not None and not _is_number(last_seen):
        raise ValueError("last_seen is not a number")
    return {
        "id": name,
        "url": url,
        "status": status if status in WORKER_STATUSES else "unknown",
        "capabilities": _capabilities(agent),
        "ip_addrs": _optional(agent, "ip_addrs", _string_list, "a list of strings"),
        "obs_count": _optional(agent, "obs_count", _is_int, "an integer"),
        "db_sha": _optional(agent, "db_sha", lambda v: isinstance(v, str), "a string"),
        # Membridge speaks epoch seconds; every time here is milliseconds.
        "last_heartbeat": int(last_seen * 1000) if last_seen is not None else now,
    }


def _optional(agent: dict[str, Any], key: str, valid, expected: str) -> Any:
    value = agent.get(key)
    if value is not None and not valid(value):
        raise ValueError(f"{key} is not {expected}")
    return value


def _capabilities(agent: dict[str, Any]) -> dict[str, Any] | None:
    source = agent.get("capabilities")
    if source is None:
        if agent.get("max_concurrency") is None and agent.get("labels") is None:
            return None
        source = {"max_concurrency": agent.get("max_concurrency"), "labels": agent.get("labels")}
    if not isinstance(source, dict):
        raise ValueError("capabilities is not an object")
    capabilities = dict(DEFAULT_CAPABILITIES)
    claude_cli = source.get("claude_cli")
    if claude_cli is not None:
        if not isinstance(claude_cli, bool):
            raise ValueError("claude_cli is not a boolean")
        capabilities["claude_cli"] = claude_cli
    max_concurrency = source.get("max_concurrency")
    if max_concurrency is not None:
        if not _is_int(max_concurrency) or not 1 <= max_concurrency <= 32:
            raise ValueError("max_concurrency is not an integer from 1 to 32")
        capabilities["max_concurrency"] = max_concurrency
    labels = source.get("labels")
    if labels is not None:
        if not _string_list(labels):
            raise ValueError("labels is not a list of strings")
        capabilities["labels"] = labels
    return capabilities


def fetch_agents(client: MembridgeClient) -> list[Any]:
    try:
        response = client.get("/agents", timeout=SYNC_TIMEOUT_S)
    except UpstreamUnreachable as error:
        raise SyncFailed(str(error)) from None
    if not response.ok:
        raise SyncFailed(f"Membridge answered {response.status} to /agents")
    if not isinstance(response.body, list):
        message = "Membridge /agents answer is not a JSON list"
        client.health.failure(message)
        raise SyncFailed(message)
    return response.body


def sync_workers(client: MembridgeClient, database: Database, *, liveness_s: float = 60.0) -> SyncOutcome:
    """Apply upstream's agents. Upstream's status counts only for workers of which the
    runtime has had no evidence of its own for `liveness_s` (see queries.sql)."""
    agents = fetch_agents(client)
    now = now_ms()
    rows: dict[str, dict[str, Any]] = {}
    skipped = 0
    for index, agent in enumerate(agents):
        try:
            row = parse_agent(agent, now)
        except ValueError as problem:
            skipped += 1
            log.warning("worker sync: skipped agent #%d: %s", index, problem)
            continue
        rows[row["id"]] = row  # a name listed twice: the last entry wins
    evidence_since = now - int(liveness_s * 1000)
    with database.transaction() as tx:
        counts = tx.one(
            "upsert_synced_workers",
            agents=json.dumps(list(rows.values())),
            default_capabilities=json.dumps(DEFAULT_CAPABILITIES),
            evidence_since=evidence_since,
            now=now,
        )
        offlined = tx.all(
            "offline_stale_workers", seen_ids=list(rows), stale_before=evidence_since,
            evidence_since=evidence_since,
        )
    outcome = SyncOutcome(int(counts["inserted"]), int(counts["updated"]), skipped, len(offlined))
    log.log(
        logging.INFO if outcome.inserted or outcome.skipped or outcome.offlined else logging.DEBUG,
        "worker sync: %d new, %d updated, %d skipped, %d marked offline",
        outcome.inserted, outcome.updated, outcome.skipped, outcome.offlined,
    )
    return outcome


def offline_silent_workers(database: Database, *, liveness_s: float) -> int:
    """Without an answer from Membridge (down, or none configured), the runtime's own
    evidence still counts: an online worker that has not called for `liveness_s` goes
    offline, and its next call or registration brings it back. Its leases are left to
    their own expiry: a long run may heartbeat rarely."""
    silent_since = now_ms() - int(liveness_s * 1000)
    with database.autocommit() as tx:
        offlined = tx.all(
            "offline_stale_workers", seen_ids=[], stale_before=silent_since, evidence_since=silent_since,
        )
    if offlined:
        log.info("worker sync: %d silent worker(s) marked offline", len(offlined))
    return len(offlined)


def run_worker_sync(client: MembridgeClient, database: Database, *, liveness_s: float = 60.0) -> None:
    """The scheduled job. Its outcome reaches every process's health through the
    client's status, which the runtime config store shares."""
    try:
        sync_workers(client, database, liveness_s=liveness_s)
    except SyncFailed as failure:
        # The client logs the start and the end of an outage; not every failed round.
        log.debug("worker sync failed, nothing changed upstream's way: %s", failure)
        offline_silent_workers(database, liveness_s=liveness_s)
