"""The `memory://` rate-limit store: fixed-window counters in this process's memory.

A storage backend for the `limits` library (which Flask-Limiter runs on), registered
under its own scheme. The library's own MemoryStorage expires keys from a timer thread
that lives 10 ms and is started again by the next hit, so under traffic each gunicorn
worker starts ~100 threads a second, and every `Thread.start()` waits for the new thread
to get the GIL. That cost 20-30 % of task-creation throughput in bench/run.py
(docs/PERFORMANCE.md). This store expires a key when it is next touched and drops every
expired key at most once a second, inline: no threads, and memory bounded by the client
addresses seen in the last window.

Under gunicorn, `memory://` means this host instead (HostSharedStorage below): the
master sets up a small shared-memory table before it forks its processes, so a client's
limit holds whichever worker serves it, without a network round trip. Set
RATELIMIT_STORAGE_URI to a Redis URI for limits that hold across hosts.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import multiprocessing
import os
import struct
import threading
import time
from collections.abc import Callable

from limits.storage import Storage

from ..pids import alive

log = logging.getLogger(__name__)

SCHEME = "bloom-memory"
HOST_SCHEME = "bloom-host"
SWEEP_INTERVAL_S = 1.0


class _LocalStorage(Storage):
    """What the stores of this module share: a clock (a fake one in tests), no server."""

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        clock: Callable[[], float] = time.time,
        **options: str,
    ) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._clock = clock

    def check(self) -> bool:
        return True


class ProcessMemoryStorage(_LocalStorage):
    STORAGE_SCHEME = [SCHEME]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._expires_at: dict[str, float] = {}
        self._next_sweep_at = 0.0

    @property
    def base_exceptions(self) -> type[Exception]:
        return ValueError  # nothing here talks to a server

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        with self._lock:
            now = self._clock()
            if now >= self._next_sweep_at:
                self._drop_expired(now)
            if self._expires_at.get(key, 0.0) <= now:
                self._counts[key] = 0
                self._expires_at[key] = now + expiry
            self._counts[key] += amount
            return self._counts[key]

    def get(self, key: str) -> int:
        with self._lock:
            if self._expires_at.get(key, 0.0) <= self._clock():
                return 0
            return self._counts.get(key, 0)

    def get_expiry(self, key: str) -> float:
        with self._lock:
            return self._expires_at.get(key, self._clock())

    def clear(self, key: str) -> None:
        with self._lock:
            self._counts.pop(key, None)
            self._expires_at.pop(key, None)

    def reset(self) -> int:
        with self._lock:
            cleared = len(self._counts)
            self._counts.clear()
            self._expires_at.clear()
            return cleared

    def counters_held(self) -> int:
        """How many counters are held (for tests and curiosity)."""
        with self._lock:
            return len(self._counts)

    def _drop_expired(self, now: float) -> None:
        expired = [key for key, expires_at in self._expires_at.items() if expires_at <= now]
        for key in expired:
            del self._counts[key]
            del self._expires_at[key]
        self._next_sweep_at = now + SWEEP_INTERVAL_S


class SharedCountersBusy(Exception):
    """A stripe lock of the host table could not be taken in time (its holder died?)."""


class _StripeLock:
    """One of the table's process-shared locks, with its holder's pid beside it in shared
    memory: a process killed while holding it (SIGKILL, OOM) must not wedge its stripe, so
    a waiter that times out and finds the holder gone releases the lock for it."""

    def __init__(self, lock, holders: mmap.mmap, index: int) -> None:
        self._lock, self._holders, self._offset = lock, holders, index * 8

    CHECK_HOLDER_EVERY_S = 0.05

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._lock.acquire(timeout=min(self.CHECK_HOLDER_EVERY_S, max(0.0, deadline - time.monotonic()))):
            holder = struct.unpack_from("<q", self._holders, self._offset)[0]
            if holder > 0 and not alive(holder):
                try:
                    self._lock.release()  # for the dead holder
                except ValueError:  # another waiter did it first
                    pass
            elif time.monotonic() >= deadline:
                return False
        struct.pack_into("<q", self._holders, self._offset, os.getpid())
        return True

    def release(self) -> None:
        struct.pack_into("<q", self._holders, self._offset, 0)
        self._lock.release()


class HostCounters:
    """Fixed-window counters in anonymous shared memory, inherited by forked processes.

    A hash table of SLOTS slots in groups of GROUP: a key lives in the group its digest
    names. A slot holds the key's digest, its window's end and a generation, and one
    count per process (a column: up to COLUMNS processes share the table, each adding
    only to its own column). A hit on a key whose window is live takes no lock other
    processes can hold: this process adds to its column (under a lock of its own
    threads) and sums the columns of the slot's generation. Only giving a slot to a key
    (its first hit) and starting a key's next window (once per window) take one of
    LOCKS process-shared stripe locks, and bump the generation, which retires every
    column's count at once. So no request waits for a lock held by a thread of another
    process that is itself waiting for its process's GIL (under load, that wait passed
    50 ms and Flask-Limiter fell back to per-process counts: docs/PERFORMANCE.md).

    A count may be off by the hits in flight as a window turns. A live window is never
    given up for another key: when every slot of a group holds one (a flood of distinct
    addresses), a new key finds no room (NO_ROOM) until a window ends, and the store
    (HostSharedStorage) counts it in its own process instead: a flood never resets the
    clients already counted, nor makes a newcomer over its limit (crafted addresses that
    fill one group used to lock a chosen client out for a whole window).
    """

    HEAD = struct.Struct("<Qdq")  # key digest (0 = empty), window end (epoch s), generation
    COLUMN = struct.Struct("<qq")  # generation the count belongs to, count
    COLUMNS = 64
    SLOT_SIZE = HEAD.size + COLUMNS * COLUMN.size
    SLOTS = 16384
    GROUP = 16
    LOCKS = 64
    LOCK_TIMEOUT_S = 1.0  # only first hits and window turns wait, and only for each other
    # The count of a key that found no room: over any configured limit.
    NO_ROOM = 2**62

    def __init__(self) -> None:
        # MAP_SHARED: survives fork(). 8.6 MiB of address space; pages are touched (and
        # cost memory) only where keys land.
        self._memory = mmap.mmap(-1, self.SLOTS * self.SLOT_SIZE)
        holders = mmap.mmap(-1, (self.LOCKS + 1) * 8)
        self._locks = [_StripeLock(multiprocessing.Lock(), holders, index) for index in range(self.LOCKS)]
        # The pid owning each column (0: free), then how many columns were ever claimed
        # (only those are summed). Claimed under a lock of its own, which a process killed
        # while holding it does not wedge either.
        self._columns = mmap.mmap(-1, (self.COLUMNS + 1) * 8)
        self._columns_lock = _StripeLock(multiprocessing.Lock(), holders, self.LOCKS)
        self._column_of: tuple[int, int] | None = None  # (pid, column) of this process
        self._own_writes = threading.Lock()  # this process's threads, adding to its column
        self._patterns = [struct.Struct(f"<{2 * used}q") for used in range(self.COLUMNS + 1)]

    # Where things are -------------------------------------------------------------------

    def _group(self, key: str) -> tuple[int, int]:
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1
        return digest, digest % (self.SLOTS // self.GROUP)

    def _column(self) -> int:
        """This process's column, claimed at its first hit (a dead process's is reused:
        its counts stand, they were real hits)."""
        pid = os.getpid()
        if self._column_of is not None and self._column_of[0] == pid:
            return self._column_of[1]
        if not self._columns_lock.acquire(timeout=self.LOCK_TIMEOUT_S):
            raise SharedCountersBusy("rate-limit table busy")
        try:
            owners = struct.unpack_from(f"<{self.COLUMNS}q", self._columns)
            free = next((i for i, owner in enumerate(owners) if owner == pid), None)
            if free is None:
                free = next((i for i, owner in enumerate(owners) if owner <= 0 or not alive(owner)), None)
            if free is None:
                raise SharedCountersBusy(f"more than {self.COLUMNS} processes share the rate-limit table")
            struct.pack_into("<q", self._columns, free * 8, pid)
            used = struct.unpack_from("<q", self._columns, self.COLUMNS * 8)[0]
            struct.pack_into("<q", self._columns, self.COLUMNS * 8, max(used, free + 1))
        finally:
            self._columns_lock.release()
        self._column_of = (pid, free)
        return free

    def _locked(self, group: int) -> _StripeLock:
        lock = self._locks[group % self.LOCKS]
        if not lock.acquire(timeout=self.LOCK_TIMEOUT_S):
            raise SharedCountersBusy("rate-limit table busy")
        return lock

    def _find(self, digest: int, group: int, now: float) -> tuple[int | None, int | None, int]:
        """(offset of the key's slot, offset of a free or ended slot, offset of the slot ending first)."""
        own = reusable = None
        soonest, soonest_end = group * self.GROUP * self.SLOT_SIZE, float("inf")
        for index in range(group * self.GROUP, (group + 1) * self.GROUP):
            offset = index * self.SLOT_SIZE
            slot_digest, window_end, _ = self.HEAD.unpack_from(self._memory, offset)
            if slot_digest == digest:
                own = offset
            elif reusable is None and (slot_digest == 0 or window_end <= now):
                reusable = offset
            if window_end < soonest_end:
                soonest, soonest_end = offset, window_end
        return own, reusable, soonest

    def _total(self, offset: int, generation: int) -> int:
        used = struct.unpack_from("<q", self._columns, self.COLUMNS * 8)[0]
        values = self._patterns[used].unpack_from(self._memory, offset + self.HEAD.size)
        return sum(count for column_generation, count in zip(values[::2], values[1::2], strict=True)
                   if column_generation == generation)

    # What the store asks --------------------------------------------------------------

    def incr(self, key: str, expiry: float, amount: int, now: float) -> tuple[int, float]:
        """Count a hit; (count, window end) after it."""
        column = self._column()
        digest, group = self._group(key)
        own, _, _ = self._find(digest, group, now)
        if own is not None:
            slot_digest, window_end, generation = self.HEAD.unpack_from(self._memory, own)
            if slot_digest == digest and window_end > now:  # the usual case: no lock another process holds
                return self._add(own, column, generation, amount), window_end
        lock = self._locked(group)  # a first hit, or the key's next window
        try:
            own, reusable, soonest = self._find(digest, group, now)
            slot = own if own is not None else reusable
            if slot is None:  # every slot holds a live window: no room, refused
                _, soonest_end, _ = self.HEAD.unpack_from(self._memory, soonest)
                return self.NO_ROOM, soonest_end
            _, window_end, generation = self.HEAD.unpack_from(self._memory, slot)
            if slot != own or window_end <= now:  # someone else may have turned it meanwhile
                window_end, generation = now + expiry, generation + 1
                self.HEAD.pack_into(self._memory, slot, digest, window_end, generation)
            return self._add(slot, column, generation, amount), window_end
        finally:
            lock.release()

    def _add(self, slot: int, column: int, generation: int, amount: int) -> int:
        where = slot + self.HEAD.size + column * self.COLUMN.size
        with self._own_writes:
            column_generation, count = self.COLUMN.unpack_from(self._memory, where)
            count = count + amount if column_generation == generation else amount
            self.COLUMN.pack_into(self._memory, where, generation, count)
        return self._total(slot, generation)

    def read(self, key: str, now: float) -> tuple[int, float]:
        """(count, window end) of a key; (0, now) when it has no live window."""
        digest, group = self._group(key)
        own, _, _ = self._find(digest, group, now)
        if own is None:
            return 0, now
        _, window_end, generation = self.HEAD.unpack_from(self._memory, own)
        return (self._total(own, generation), window_end) if window_end > now else (0, now)

    def clear(self, key: str, now: float) -> None:
        digest, group = self._group(key)
        lock = self._locked(group)
        try:
            own, _, _ = self._find(digest, group, now)
            if own is not None:
                _, _, generation = self.HEAD.unpack_from(self._memory, own)
                self.HEAD.pack_into(self._memory, own, 0, 0.0, generation + 1)
        finally:
            lock.release()

    def reset(self) -> None:
        self._memory[:] = bytes(len(self._memory))


_host_counters: HostCounters | None = None


def share_counters_across_workers() -> None:
    """Called by the gunicorn master before it forks: `memory://` then means this host."""
    global _host_counters
    if _host_counters is None:
        _host_counters = HostCounters()


def host_counters() -> HostCounters | None:
    """The table this process shares with the host's other processes, if any."""
    return _host_counters


def adopt_host_counters(counters: HostCounters) -> None:
    """Use a table made before the fork (by a copy of this module that was imported in
    gunicorn's master and forgotten since, so that the process imports the code on disk)."""
    global _host_counters
    _host_counters = counters


def memory_scheme() -> str:
    """The storage scheme `memory://` stands for in this process."""
    return HOST_SCHEME if _host_counters is not None else SCHEME


class HostSharedStorage(_LocalStorage):
    STORAGE_SCHEME = [HOST_SCHEME]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if _host_counters is None:
            raise RuntimeError("no host counters: share_counters_across_workers() was not called before the fork")
        self._counters = _host_counters
        # Keys that found no room in the host's table (a flood filled their group): counted
        # in this process, so they are limited, per process, and never refused for it.
        self._overflow = ProcessMemoryStorage(clock=self._clock)
        self._overflowed = False
        # Flask-Limiter reads the window back right after its hit, for the X-RateLimit
        # headers of the same response (a count and an expiry: two more trips through the
        # table's locks). The window this thread's last hit left answers those reads.
        self._last_hit = threading.local()

    @property
    def base_exceptions(self) -> type[Exception]:
        return SharedCountersBusy

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        count, window_end = self._counters.incr(key, expiry, amount, self._clock())
        if count == HostCounters.NO_ROOM:
            if not self._overflowed:  # once per process: a flood of distinct clients
                self._overflowed = True
                log.warning("rate-limit table: a group is full of live windows (a flood of distinct clients?); "
                            "keys that find no room are counted per process")
            count = self._overflow.incr(key, expiry, amount)
            window_end = self._overflow.get_expiry(key)
        self._last_hit.window = (key, count, window_end)
        return count

    def get(self, key: str) -> int:
        return self._window(key)[0]

    def get_expiry(self, key: str) -> float:
        return self._window(key)[1]

    def _window(self, key: str) -> tuple[int, float]:
        now = self._clock()
        last = getattr(self._last_hit, "window", None)
        if last is not None and last[0] == key and last[2] > now:
            return last[1], last[2]
        count, window_end = self._counters.read(key, now)
        if count == 0 and self._overflow.get(key):
            return self._overflow.get(key), self._overflow.get_expiry(key)
        return count, window_end

    def clear(self, key: str) -> None:
        self._last_hit.window = None
        self._counters.clear(key, self._clock())
        self._overflow.clear(key)

    def reset(self) -> int:
        self._last_hit.window = None
        self._counters.reset()
        self._overflow.reset()
        return 0
