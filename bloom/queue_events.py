"""Wake-ups for long-polling claims and the dispatcher: PostgreSQL LISTEN/NOTIFY, one
listener per process.

Notifications on channel `bloom_task_queued` say that tasks were queued. Their payload
is an agent_slug (one task of it), `<n>\x1f<agent_slug>` (n tasks of it), or empty
(any number, of any slug: the sweep, a worker taken out of rotation). A daemon thread
holds the only LISTEN connection of the process. For each task announced it wakes *one*
waiting claim whose agent filter takes that slug (the one waiting longest), and every
waiting claim for an empty payload: hundreds of idle long polls cost nothing when a task
arrives, instead of one claim query each. A generation counter moves on every
notification, for the dispatcher, which wants to hear of any task. Nobody holds a
database connection while waiting.

Creation does not notify in its own statement: PostgreSQL lets committing transactions
that notified through one cluster-wide lock, one at a time, and creates waited there in
37-78 % of samples under load (docs/PERFORMANCE.md). A created task is announced after
its commit (`announce`): the request thread only adds it to what is pending, and the
listener thread sends all that is pending on its own connection, in one short
transaction, then, at most every ANNOUNCE_EVERY_S, what gathered meanwhile. Under load
a process sends one notifying commit per 20 ms instead of one per task; after a quiet
spell, a task is announced one round trip after its commit. A wake-up is a hint, never
the only way to find work:
waiting claims look again at least every RECHECK_SECONDS, the dispatcher every
DISPATCHER_RECHECK_SECONDS, so an announcement lost with its process delays a task,
nothing more.
"""
from __future__ import annotations

import logging
import os
import random
import select
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from .sql import QUERIES

log = logging.getLogger(__name__)

CHANNEL = "bloom_task_queued"
# Leases ended by a worker leaving the rotation: a comma-separated list of their ids, so
# that the process delivering to one of them drops its connection (bloom/agents/dispatch.py).
LEASES_ENDED_CHANNEL = "bloom_leases_ended"
COUNT_MARK = "\x1f"  # between the count and the agent_slug of a payload announcing several tasks
# A process's announcements go out at once after a quiet spell, then at most this often
# (what gathers meanwhile goes together): under load, one notifying commit per 20 ms per
# process instead of one per task, for a wake-up at most 20 ms later.
ANNOUNCE_EVERY_S = 0.02
MOST_WAKES_PER_PAYLOAD = 1000
# Tasks written by something that does not notify (say the Express service sharing
# the database) are still found: a waiting claim looks again at least this often, the
# dispatcher more often.
RECHECK_SECONDS = 10.0
DISPATCHER_RECHECK_SECONDS = 2.0


class ClaimTicket:
    """A waiting claim's place in line; woken by a notification its filter takes."""

    def __init__(self, agent_slugs: list[str] | None) -> None:
        self.agent_slugs = frozenset(agent_slugs) if agent_slugs else None
        self.woken = threading.Event()
        self.woken_for: str | None = None  # the payload of the wake not yet acted on

    def takes(self, agent_slug: str) -> bool:
        return self.agent_slugs is None or agent_slug in self.agent_slugs


class QueueEvents:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._condition = threading.Condition()
        self._generation = 0
        self._tickets: list[ClaimTicket] = []  # oldest first
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Tasks committed and not yet announced, by agent_slug; a byte on the pipe wakes
        # the listener thread to send them.
        self._pending: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        self._closed = threading.Event()
        self._failed_tries = 0
        self._on_leases_ended: Callable[[set[str]], None] | None = None
        self._announce_r, self._announce_w = os.pipe()
        os.set_blocking(self._announce_r, False)
        os.set_blocking(self._announce_w, False)

    @property
    def generation(self) -> int:
        with self._condition:
            return self._generation

    def enter_line(self, agent_slugs: list[str] | None) -> ClaimTicket:
        """Take a place before looking at the queue, so no notification is missed between
        the look and the wait. Leave the line with `leave_line`."""
        self._ensure_listening()
        ticket = ClaimTicket(agent_slugs)
        with self._condition:
            self._tickets.append(ticket)
        return ticket

    def wait_in_line(self, ticket: ClaimTicket, timeout: float) -> bool:
        """Until a task for this ticket was queued (since it last woke), or `timeout`, or a
        recheck is due (jittered, so waiters that came together do not look together).
        True when a notification woke it."""
        woken = ticket.woken.wait(min(timeout, RECHECK_SECONDS * random.uniform(0.8, 1.2)))
        with self._condition:
            ticket.woken.clear()
            ticket.woken_for = None
            if ticket in self._tickets:  # to the back of the line: others get the next task first
                self._tickets.remove(ticket)
            self._tickets.append(ticket)
        return woken

    def leave_line(self, ticket: ClaimTicket) -> None:
        """Leave; a wake-up this ticket got and did not act on goes to the next in line."""
        with self._condition:
            if ticket in self._tickets:
                self._tickets.remove(ticket)
            if ticket.woken.is_set() and ticket.woken_for is not None:
                self._wake_one(ticket.woken_for)

    def wait_for_change(self, seen_generation: int, timeout: float) -> int:
        """Block until a notification after `seen_generation`, or `timeout` seconds."""
        self._ensure_listening()
        deadline = time.monotonic() + min(timeout, DISPATCHER_RECHECK_SECONDS)
        with self._condition:
            while self._generation == seen_generation:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            return self._generation

    def announce(self, tasks_by_slug: Counter[str]) -> None:
        """Tell every process of the deployment that these tasks (committed) are queued."""
        self._ensure_listening()
        with self._pending_lock:
            self._pending.update(tasks_by_slug)
        if self._closed.is_set():
            return
        try:
            os.write(self._announce_w, b"!")
        except OSError:  # the pipe is full (the listener has wake-ups enough), or closed at exit
            pass

    def on_leases_ended(self, callback: Callable[[set[str]], None]) -> None:
        """Call `callback(lease ids)` (on the listener thread) whenever leases are ended
        anywhere in the deployment by a worker leaving the rotation; listen from now on."""
        self._on_leases_ended = callback
        self._ensure_listening()

    def poke(self) -> None:
        """Wake the dispatcher (capacity freed up, which no NOTIFY announces)."""
        self._bump()

    def _bump(self, payloads: list[str] | None = None) -> None:
        """A notification for each payload (an agent_slug; '' or None: anything)."""
        with self._condition:
            self._generation += 1
            self._condition.notify_all()
            for payload in payloads if payloads is not None else [""]:
                if payload:
                    agent_slug, tasks = _read_payload(payload)
                    for _ in range(tasks):
                        self._wake_one(agent_slug)
                else:
                    for ticket in self._tickets:
                        ticket.woken.set()

    def _wake_one(self, agent_slug: str) -> None:
        """The longest-waiting ticket not yet woken whose filter takes this slug. Caller holds the lock."""
        chosen = next((t for t in self._tickets if not t.woken.is_set() and t.takes(agent_slug)), None)
        if chosen is not None:
            chosen.woken_for = agent_slug
            chosen.woken.set()

    def close(self) -> None:
        """Stop listening (the process is done); what is pending is sent first."""
        with self._start_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            thread = self._thread
        if thread is not None and thread.is_alive():
            os.write(self._announce_w, b"!")
            thread.join(timeout=2.0)
        if thread is None or not thread.is_alive():
            os.close(self._announce_r)
            os.close(self._announce_w)

    def _ensure_listening(self) -> None:
        with self._start_lock:
            if self._closed.is_set():
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen_forever, name="bloom-queue-listener", daemon=True)
                self._thread.start()

    def _listen_forever(self) -> None:
        while not self._closed.is_set():
            try:
                self._listen()
            except Exception as error:
                if self._closed.is_set():
                    return
                # An outage is said once when it starts, and once when it ends (_connected).
                if self._failed_tries == 0:
                    log.warning("queue listener lost its connection (%s); reconnecting every second",
                                type(error).__name__)
                self._failed_tries += 1
            self._bump()  # notifications may have been missed meanwhile
            self._closed.wait(1.0)  # a pause before reconnecting that close() ends at once

    def _connected(self) -> None:
        if self._failed_tries:
            log.warning("queue listener connected again after %d failed tries", self._failed_tries)
        self._failed_tries = 0

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        try:
            connection: Any = raw.driver_connection  # psycopg2's own connection
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}; LISTEN {LEASES_ENDED_CHANNEL}")
            self._connected()
            next_send_at = 0.0  # announcements go out at most every ANNOUNCE_EVERY_S
            while True:
                now = time.monotonic()
                holding = now < next_send_at and self._has_pending()
                readable, _, _ = select.select(
                    [connection] if holding else [connection, self._announce_r], [], [],
                    next_send_at - now if holding else 30.0,
                )
                if self._announce_r in readable:
                    self._drain_wake_ups()
                if time.monotonic() >= next_send_at and self._has_pending():
                    self._send_pending(connection)
                    next_send_at = time.monotonic() + ANNOUNCE_EVERY_S
                if self._closed.is_set():
                    self._send_pending(connection)
                    return
                connection.poll()
                if connection.notifies:
                    notices, connection.notifies[:] = list(connection.notifies), []
                    queued = [notice.payload for notice in notices if notice.channel != LEASES_ENDED_CHANNEL]
                    ended = {lease_id for notice in notices if notice.channel == LEASES_ENDED_CHANNEL
                             for lease_id in notice.payload.split(",") if lease_id}
                    if queued:
                        self._bump(queued)
                    if ended and self._on_leases_ended is not None:
                        self._on_leases_ended(ended)
                elif not readable and not holding:
                    with connection.cursor() as cursor:  # detect a dead connection while idle
                        cursor.execute("SELECT 1")
        finally:
            raw.invalidate()

    def _has_pending(self) -> bool:
        with self._pending_lock:
            return bool(self._pending)

    def _drain_wake_ups(self) -> None:
        try:
            while os.read(self._announce_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _send_pending(self, connection) -> None:
        """One NOTIFY per agent_slug pending, in one transaction (autocommit). If the
        connection fails, what was taken is lost with it: the reconnect wakes everyone."""
        with self._pending_lock:
            pending, self._pending = self._pending, Counter()
        if pending:
            with connection.cursor() as cursor:
                cursor.execute(QUERIES["announce_queued"], {"payloads": announcement_payloads(pending)})


def _read_payload(payload: str) -> tuple[str, int]:
    """(agent_slug, how many tasks of it). Slugs hold no control characters (the API
    refuses them: schemas.KeyText), so the mark means one thing."""
    count, mark, agent_slug = payload.partition(COUNT_MARK)
    if mark and count.isdigit():
        return agent_slug, max(1, min(int(count), MOST_WAKES_PER_PAYLOAD))
    return payload, 1


def announcement_payloads(tasks_by_slug: Counter[str]) -> list[str]:
    return [slug if tasks == 1 else f"{tasks}{COUNT_MARK}{slug}" for slug, tasks in tasks_by_slug.items()]


class WaitingRoom:
    """At most `capacity` long polls of this process wait at once. Each holds a gunicorn
    thread while it waits; the rest of the threads must stay free for short requests
    (health, ready, heartbeats, completions), whatever the number of idle pollers."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._lock = threading.Lock()
        self._waiting = 0

    def resize(self, capacity: int) -> None:
        with self._lock:
            self._capacity = max(1, capacity)

    def enter(self) -> bool:
        with self._lock:
            if self._waiting >= self._capacity:
                return False
            self._waiting += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._waiting -= 1
