"""Receiving a request's body: never past BLOOM_MAX_BODY_BYTES, never slower than a floor
rate, and never more than a little of it in memory while it arrives.

A client that trickles its body (a byte every few seconds) would otherwise hold a thread,
and with it whatever the body's handling holds, for as long as it likes. Here each
RECEIVE_CHUNK of a body must arrive within CHUNK_WINDOW_S (a floor of FLOOR_BYTES_PER_S),
or the read is cut and the request answered 408. The body is spooled to a temporary file
past IN_MEMORY_BYTES while it arrives, so a slow upload costs disk, not memory, and takes
none of the process's large-body slots (bloom/large_bodies.py): those are taken once the
whole body is here, for the parsing and handling that cost memory.

One watchdog thread per process cuts the reads that outlive their deadline (a shutdown of
the socket's read side), instead of a timer thread per read.
"""
from __future__ import annotations

import heapq
import itertools
import socket
import tempfile
import threading
import time
from typing import Any

from ..errors import BadRequest, RequestTimeout

FLOOR_BYTES_PER_S = 16 * 1024
RECEIVE_CHUNK = 64 * 1024
CHUNK_WINDOW_S = RECEIVE_CHUNK / FLOOR_BYTES_PER_S  # 4 s for each 64 KiB
IN_MEMORY_BYTES = 1 << 20


class BodyTooLarge(Exception):
    """Over the limit (the caller answers 413)."""


class _Deadlines:
    """Reads with a deadline; the thread cuts those still armed when it passes."""

    ARMED, DONE, CUT = 0, 1, 2

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self._condition = threading.Condition()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, seconds: float) -> list[Any]:
        entry = [time.monotonic() + seconds, next(self._order), sock, self.ARMED]
        with self._condition:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, name="bloom-body-deadlines", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._condition.notify()
        return entry

    def disarm(self, entry: list[Any]) -> bool:
        """False when the read was cut (too slow)."""
        with self._condition:
            if entry[3] == self.ARMED:
                entry[3] = self.DONE
            return entry[3] == self.DONE

    def _watch(self) -> None:
        while True:
            with self._condition:
                while self._heap and self._heap[0][3] != self.ARMED:
                    heapq.heappop(self._heap)  # done: nothing to cut
                wait = self._heap[0][0] - time.monotonic() if self._heap else None
                if wait is None or wait > 0:
                    self._condition.wait(wait)
                    continue
                entry = heapq.heappop(self._heap)
                entry[3] = self.CUT
            try:
                entry[2].shutdown(socket.SHUT_RD)
            except OSError:
                pass


_deadlines = _Deadlines()


def receive(environ: dict[str, Any], length: int | None, limit: int) -> tempfile.SpooledTemporaryFile:
    """The body, spooled (rewound); `length` is the announced Content-Length (None: chunked,
    read to its end). BodyTooLarge past `limit`, RequestTimeout when it comes too slowly,
    BadRequest when it ends before its announced length."""
    if length is not None and length > limit:
        raise BodyTooLarge()
    stream = environ["wsgi.input"]
    sock = environ.get("gunicorn.socket")  # under the Flask test client: none, nothing to wait for
    spool = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_BYTES)
    wanted = length if length is not None else limit + 1
    received = 0
    while received < wanted:
        size = min(RECEIVE_CHUNK, wanted - received)
        entry = _deadlines.arm(sock, CHUNK_WINDOW_S) if sock is not None else None
        try:
            chunk = stream.read(size)
        except OSError:
            chunk = b""
        if entry is not None and not _deadlines.disarm(entry) and len(chunk) < size:
            spool.close()
            raise RequestTimeout(f"Request body too slow: under {FLOOR_BYTES_PER_S // 1024} KiB/s")
        if not chunk:
            break
        spool.write(chunk)
        received += len(chunk)
    if received > limit:
        spool.close()
        raise BodyTooLarge()
    if length is not None and received < length:
        spool.close()
        raise BadRequest("Request body shorter than its Content-Length")
    spool.seek(0)
    return spool
