"""Leadership: who dispatches, who runs a once-per-deployment job — a row with an expiry
and an epoch, the way River elects its leader.

The holder renews its row well before it expires (every TTL_MS / 5); a process that stops
renewing — killed, frozen (SIGSTOP, a paused VM), cut off from the database — loses it
when the row expires, and another takes it within TTL_MS plus its retry interval, whatever
PostgreSQL thinks of the old session (a session-level advisory lock outlived a lost host
for two hours: TCP keepalive, not the runtime, decided). Each change of holder adds one
to the epoch, and a leader's writes carry the epoch it holds (the dispatcher's grants:
leases/queries.sql, lease_task), so a leader that wakes after losing leadership does no
leader's work: its write finds another epoch and changes nothing.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from .db import Database
from .stamps import now_ms

# How long a leadership lasts without renewal: a takeover comes within TTL_MS and the
# other processes' retry interval (2 s) of the last renewal.
TTL_MS = 10_000
RENEW_EVERY_S = TTL_MS / 1000 / 5


def process_identity() -> str:
    """This process, unique across hosts and restarts (a pid can be reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Leadership:
    """One process's claim on one leadership (`name`)."""

    database: Database
    name: str
    holder: str
    ttl_ms: int = TTL_MS
    epoch: int | None = None  # the epoch held, while held

    def take_or_renew(self) -> bool:
        """Take the leadership if it is free or expired, or renew it if held: one
        statement. False when another process holds it (or took it from us)."""
        with self.database.autocommit() as tx:
            row = tx.one_or_none("take_leadership", name=self.name, holder=self.holder, now=now_ms(),
                                 ttl_ms=self.ttl_ms, held_epoch=self.epoch)
        self.epoch = row["epoch"] if row is not None else None
        return self.epoch is not None

    def release(self) -> None:
        """Give it up at once (a clean stop): another process takes it without waiting."""
        if self.epoch is None:
            return
        with self.database.autocommit() as tx:
            tx.execute("release_leadership", name=self.name, holder=self.holder, epoch=self.epoch)
        self.epoch = None
