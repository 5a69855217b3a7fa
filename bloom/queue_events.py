"""Wake-ups for long-polling claims: PostgreSQL LISTEN/NOTIFY, one listener per process.

Statements that queue a task (create, requeue, sweep) call pg_notify('bloom_task_queued').
A daemon thread holds the only LISTEN connection of the process and bumps a generation
counter on every notification; waiting requests sleep on a condition (no database
connection held, no busy loop) until the generation moves or their time is up.
"""
from __future__ import annotations

import logging
import select
import threading
import time

from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

CHANNEL = "bloom_task_queued"
# Tasks written by something that does not notify (say the Express service sharing
# the database) are still found: a waiter looks again at least this often.
RECHECK_SECONDS = 2.0


class QueueEvents:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._condition = threading.Condition()
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def generation(self) -> int:
        with self._condition:
            return self._generation

    def wait_for_change(self, seen_generation: int, timeout: float) -> int:
        """Block until a notification after `seen_generation`, or `timeout` seconds."""
        self._ensure_listening()
        deadline = time.monotonic() + min(timeout, RECHECK_SECONDS)
        with self._condition:
            while self._generation == seen_generation:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            return self._generation

    def poke(self) -> None:
        """Wake this process's waiters (something changed that no NOTIFY announces)."""
        self._bump()

    def _bump(self) -> None:
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def _ensure_listening(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen_forever, name="bloom-queue-listener", daemon=True)
                self._thread.start()

    def _listen_forever(self) -> None:
        while True:
            try:
                self._listen()
            except Exception as error:
                log.warning("queue listener lost its connection (%s); reconnecting", type(error).__name__)
            self._bump()  # notifications may have been missed meanwhile
            time.sleep(1.0)

    def _listen(self) -> None:
        raw = self._engine.raw_connection()
        try:
            connection = raw.driver_connection
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            while True:
                readable, _, _ = select.select([connection], [], [], 30.0)
                connection.poll()
                if connection.notifies:
                    connection.notifies.clear()
                    self._bump()
                elif not readable:
                    with connection.cursor() as cursor:  # detect a dead connection while idle
                        cursor.execute("SELECT 1")
        finally:
            raw.invalidate()


class WaitingRoom:
    """At most `capacity` long polls of this process wait at once. Each holds a gunicorn
    thread while it waits; the rest of the threads must stay free for short requests
    (health, ready, heartbeats, completions), whatever the number of idle pollers."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._lock = threading.Lock()
        self._waiting = 0

    def enter(self) -> bool:
        with self._lock:
            if self._waiting >= self._capacity:
                return False
            self._waiting += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._waiting -= 1

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiting
