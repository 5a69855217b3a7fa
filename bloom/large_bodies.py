"""Memory for large bodies: how many this process holds at once (a request's body, an
agent's answer to a delivery), and handing the memory back after each."""
from __future__ import annotations

import ctypes
import gc
import threading


class LargeBodies:
    """How many large bodies (over LARGE_BODY_BYTES, or of unknown length) this process
    reads and handles at once. Parsed, validated and encoded again for SQL, a JSON body
    costs several times its size in memory for the whole request: a dozen 14 MiB batches
    at once would take most of a gigabyte per process. Past the limit a request waits a
    little, then gets 503 with Retry-After; after each large request the process hands the
    memory back (a full collection and malloc_trim), so its size does not stay at the peak."""

    LARGE_BODY_BYTES = 1 << 20
    WAIT_S = 10.0

    def __init__(self, at_once: int) -> None:
        self._slots = threading.BoundedSemaphore(at_once)

    def take(self, timeout: float = WAIT_S) -> bool:
        return self._slots.acquire(timeout=timeout)

    def give_back(self) -> None:
        self._slots.release()

    @staticmethod
    def hand_memory_back() -> None:
        """After the answer went out (the last big buffer of the request is gone with it)."""
        gc.collect()
        _libc_call("malloc_trim", 0)


# glibc's mallopt parameter: allocations from this size up always get pages of their own
# (mmap), handed back to the system when freed. Left dynamic, the threshold rises after the
# first large free (up to 32 MiB), and a large body's buffers then stay in the heap.
_M_MMAP_THRESHOLD = -3
_MMAP_FROM_BYTES = 1 << 20


def keep_large_buffers_out_of_the_heap() -> None:
    _libc_call("mallopt", _M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)


def _libc_call(name: str, *args: int) -> None:
    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):  # not glibc: the collection alone
        pass
