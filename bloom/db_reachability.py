"""Whether this process reaches PostgreSQL now, and what follows while it does not.

A host cut off from the database, or behind a pooler or proxy that takes the bytes and
never answers, gives no error: a statement on an open connection waits for TCP to give up
(minutes), or for ever when something in between acknowledges everything. PostgreSQL's
statement_timeout cannot help (it never sees the statement), and keepalives are answered
by whatever sits in between.

So each process asks for itself: a `SELECT 1` every PING_EVERY_S on a connection of its
own, bounded in all by PING_DEADLINE_S (libpq in asynchronous mode, waited on with
select(2)). When a ping gets no answer in time, the database counts as unreachable:
statements under way are cut (their sockets shut down, so libpq returns an error at
once and the request answers 503), and new units of work fail at once with 503 and
Retry-After instead of waiting. The first answered ping makes it reachable again. A
request therefore answers within about PING_EVERY_S + PING_DEADLINE_S (2.5 s) of the
database going away, whatever its pooled connections do.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time

import psycopg2
import psycopg2.extensions

log = logging.getLogger(__name__)

PING_EVERY_S = 1.0
PING_DEADLINE_S = 1.5


class Reachability:
    def __init__(self, dsn: str, *, connect_timeout_s: int) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self.reachable = True  # until a ping says otherwise
        self._in_flight: dict[int, int] = {}  # socket fd -> statements running on it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: psycopg2.extensions.connection | None = None
        self._failed_pings = 0

    def start(self) -> None:
        """Start watching (once; on the first unit of work of the process)."""
        if self._thread is not None:  # the usual case, on every unit of work: no lock
            return
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._watch, name="bloom-db-reachability", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=PING_DEADLINE_S + 1)
        self._drop_connection()

    def statement_started(self, fd: int) -> None:
        """A statement runs on the connection whose socket is `fd`: cut it if the database
        becomes unreachable before `statement_ended(fd)`."""
        with self._lock:
            self._in_flight[fd] = self._in_flight.get(fd, 0) + 1

    def statement_ended(self, fd: int) -> None:
        with self._lock:
            left = self._in_flight[fd] - 1
            if left:
                self._in_flight[fd] = left
            else:
                del self._in_flight[fd]

    # The watch ---------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(PING_EVERY_S):
            answered = self._ping()
            if answered and not self.reachable:
                log.warning("PostgreSQL answers again, after %d unanswered ping(s)", self._failed_pings)
                self._failed_pings = 0
                self.reachable = True
            elif not answered:
                self._failed_pings += 1
                if self.reachable:
                    self.reachable = False
                    cut = self._cut_statements_in_flight()
                    log.warning("PostgreSQL does not answer within %.1f s: requests answer 503 until it does "
                                "(%d statement(s) under way cut)", PING_DEADLINE_S, cut)

    def _ping(self) -> bool:
        deadline = time.monotonic() + PING_DEADLINE_S
        try:
            if self._connection is None:
                self._connection = psycopg2.connect(self._dsn, async_=True, connect_timeout=self._connect_timeout_s,
                                                    application_name="bloom-runtime reachability")
                _wait(self._connection, deadline)
            cursor = self._connection.cursor()
            cursor.execute("SELECT 1")
            _wait(self._connection, deadline)
            cursor.fetchone()
            cursor.close()
            return True
        except (psycopg2.Error, OSError, TimeoutError):
            self._drop_connection()
            return False

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except psycopg2.Error:
                pass

    def _cut_statements_in_flight(self) -> int:
        """Shut down the sockets of the statements under way (under the lock, so none of
        them can finish and have its fd closed and reused meanwhile): libpq's wait ends
        with an error, the connection is invalidated, the request answers 503."""
        with self._lock:
            for fd in self._in_flight:
                try:
                    with socket.socket(fileno=os.dup(fd)) as duplicate:
                        duplicate.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return len(self._in_flight)


def _wait(connection: psycopg2.extensions.connection, deadline: float) -> None:
    """Drive an asynchronous libpq call to its end, or raise TimeoutError at `deadline`."""
    while True:
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer in time")
        if state == psycopg2.extensions.POLL_READ:
            ready = select.select([connection.fileno()], [], [], left)[0]
        else:
            ready = select.select([], [connection.fileno()], [], left)[1]
        if not ready:
            raise TimeoutError("no answer in time")
