"""Liveness of push workers from the runtime's own evidence (README, "Running with a Membridge fleet").

Membridge changes an agent's status only when it calls the agent itself, so its
`/agents` can list a dead agent `online` for hours. The runtime therefore probes every
worker that has a url (`GET {url}/health`, each try bounded in all, in parallel): an answer brings it online, silence takes it out of the rotation at once and
sends its tasks back to the queue, without waiting for their leases to expire.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..db import Database
from ..stamps import now_ms
from .client import PROBE_DEADLINE_S, PROBE_TRIES, AgentClient, AgentUnreachable

log = logging.getLogger(__name__)

LIVENESS_ACTOR = "liveness"
MAX_PARALLEL_PROBES = 128
PROBES_PER_HOST = 4


@dataclass(frozen=True)
class ProbeOutcome:
    alive: int
    dead: int
    unprobed: int
    requeued: int


def take_workers_out(
    database: Database, worker_ids: list[str], *, reason: str, alive: bool = False, claude_cli_missing: bool = False,
    until_registered: bool = False,
) -> dict[str, int]:
    """Out of the rotation now (offline, or not leasable when its Claude CLI is missing);
    their tasks back to the queue: all of them for a worker found dead, only those that
    never started for one that is `alive` (it answered). `until_registered`: out (status
    'error') until the agent registers again, whatever its probes say. One statement: see
    take_workers_out in queries.sql."""
    if not worker_ids:
        return {"workers": 0, "requeued": 0, "dead": 0}
    with database.autocommit() as tx:
        row = tx.one(
            "take_workers_out", worker_ids=worker_ids, reason=reason, requeue_started=not alive,
            claude_cli_missing=claude_cli_missing, out_status="error" if until_registered else "offline", audit_out=True,
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


class _Prober:
    """Probes of one round, keyed by the address a url resolves to, not by its spelling
    (`localhost`, `127.0.0.1` and `LOCALHOST.` are one target): one probe per target,
    whose answer stands for every url that resolves to it, and at most PROBES_PER_HOST at
    once per resolved host."""

    def __init__(self, agents: AgentClient) -> None:
        self._agents = agents
        self._guard = threading.Lock()
        self._per_host: dict[str, threading.Semaphore] = {}
        self._per_target: dict[tuple, threading.Lock] = {}
        self._answers: dict[tuple, bool] = {}

    def once(self, url: str) -> bool:
        target = self._target(url)
        if target is None:
            return self._agents.probe(url)  # unresolvable or refused: the probe says no, as before
        with self._guard:
            one_at_a_time = self._per_target.setdefault(target, threading.Lock())
            host = self._per_host.setdefault(target[0], threading.Semaphore(PROBES_PER_HOST))
        with one_at_a_time:
            if target not in self._answers:
                with host:
                    self._answers[target] = self._agents.probe(url)
            return self._answers[target]

    def _target(self, url: str) -> tuple | None:
        try:
            _, _, address = self._agents.checked_address(url)
        except AgentUnreachable:
            return None
        return (address[4][0], address[4][1], urlsplit(url).scheme)


def probe_push_workers(database: Database, agents: AgentClient, *, budget_s: float) -> ProbeOutcome:
    """Probe every push worker within `budget_s`; apply what the answers say.

    A worker whose probe did not finish within the budget keeps its state: no evidence
    either way. No database connection is held while the probes run.
    """
    with database.autocommit() as tx:
        rows = tx.all("push_workers")
    if not rows:
        return ProbeOutcome(0, 0, 0, 0)
    # One probe per agent address however many names point at it, and a few at a time
    # per host: registered urls must not turn the runtime into an amplifier.
    names_by_address: dict[str, list[str]] = defaultdict(list)
    url_of: dict[str, str] = {}
    for row in rows:
        names_by_address[row["address"]].append(row["id"])
        url_of[row["address"]] = row["url"]
    probe = _Prober(agents)
    pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_PROBES, len(url_of)), thread_name_prefix="bloom-probe")
    try:
        futures = {pool.submit(probe.once, url): address for address, url in url_of.items()}
        done, not_done = wait(futures, timeout=budget_s)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    alive = sorted(name for future in done if future.result() for name in names_by_address[futures[future]])
    dead = sorted(name for future in done if not future.result() for name in names_by_address[futures[future]])
    if alive:
        with database.autocommit() as tx:
            tx.all("mark_workers_alive", worker_ids=alive, now=now_ms())
    counts = take_workers_out(database, dead, reason="health probe failed")
    if not_done:
        log.warning("liveness: %d of %d probes unfinished within %.1fs", len(not_done), len(url_of), budget_s)
    unprobed = sum(len(names_by_address[futures[future]]) for future in not_done)
    return ProbeOutcome(len(alive), len(dead), unprobed, counts["requeued"])
