"""Liveness of push workers from the runtime's own evidence (SPEC §7).

Membridge changes an agent's status only when it calls the agent itself, so its
`/agents` can list a dead agent `online` for hours. The runtime therefore probes every
worker that has a url (`GET {url}/health`, each try bounded in all, in parallel): an answer brings it online, silence takes it out of the rotation at once and
sends its tasks back to the queue, without waiting for their leases to expire.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from .agents import PROBE_DEADLINE_S, PROBE_TRIES, AgentClient
from .db import Database
from .service import now_ms

log = logging.getLogger(__name__)

LIVENESS_ACTOR = "liveness"
MAX_PARALLEL_PROBES = 128


@dataclass(frozen=True)
class ProbeOutcome:
    alive: int
    dead: int
    unprobed: int
    requeued: int


def take_workers_out(
    database: Database, worker_ids: list[str], *, reason: str, alive: bool = False, claude_cli_missing: bool = False
) -> dict[str, int]:
    """Out of the rotation now (offline, or not leasable when its Claude CLI is missing);
    their tasks back to the queue: all of them for a worker found dead, only those that
    never started for one that is `alive` (it answered). One statement: see
    take_workers_out in queries.sql."""
    if not worker_ids:
        return {"workers": 0, "requeued": 0, "dead": 0}
    with database.autocommit() as tx:
        row = tx.one(
            "take_workers_out", worker_ids=worker_ids, reason=reason, requeue_started=not alive,
            claude_cli_missing=claude_cli_missing,
            now=now_ms(), actor=LIVENESS_ACTOR,
        )
    counts = {key: int(row[key]) for key in ("workers", "requeued", "dead")}
    if counts["requeued"] or counts["dead"]:
        log.warning("%d worker(s) out of rotation (%s): %d task(s) requeued, %d dead",
                    counts["workers"], reason, counts["requeued"], counts["dead"])
    return counts


def probe_round_budget_s(interval_s: float) -> float:
    """How long one round waits for its probes: most of the interval, and never less
    than the longest a probe can take (every try bounded in all), so that an agent that
    accepts connections and never answers is found in the round that probes it, at any
    interval."""
    return max(interval_s * 0.8, PROBE_TRIES * PROBE_DEADLINE_S + 0.5)


def probe_push_workers(database: Database, agents: AgentClient, *, budget_s: float) -> ProbeOutcome:
    """Probe every push worker within `budget_s`; apply what the answers say.

    A worker whose probe did not finish within the budget keeps its state: no evidence
    either way. No database connection is held while the probes run.
    """
    with database.autocommit() as tx:
        targets = {row["id"]: row["url"] for row in tx.all("push_workers")}
    if not targets:
        return ProbeOutcome(0, 0, 0, 0)
    pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_PROBES, len(targets)), thread_name_prefix="bloom-probe")
    try:
        futures = {pool.submit(agents.probe, url): worker_id for worker_id, url in targets.items()}
        done, not_done = wait(futures, timeout=budget_s)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    alive = sorted(futures[future] for future in done if future.result())
    dead = sorted(futures[future] for future in done if not future.result())
    if alive:
        with database.autocommit() as tx:
            tx.all("mark_workers_alive", worker_ids=alive, now=now_ms())
    counts = take_workers_out(database, dead, reason="health probe failed")
    if not_done:
        log.warning("liveness: %d of %d probes unfinished within %.1fs", len(not_done), len(targets), budget_s)
    return ProbeOutcome(len(alive), len(dead), len(not_done), counts["requeued"])
