"""The memory:// rate-limit store: fixed windows that end, counters that are dropped,
and no timer threads, driven through the `limits` strategy Flask-Limiter uses."""
from __future__ import annotations

import os
import threading
import time

import pytest
from limits import parse
from limits.strategies import FixedWindowRateLimiter

from bloom.web.rate_limit_store import HostCounters, ProcessMemoryStorage


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_allows_its_count_then_refuses_until_it_ends():
    clock = Clock()
    limiter = FixedWindowRateLimiter(ProcessMemoryStorage(clock=clock))
    three_a_minute = parse("3 per minute")
    assert [limiter.hit(three_a_minute, "10.0.0.1") for _ in range(4)] == [True, True, True, False]
    assert limiter.hit(three_a_minute, "10.0.0.2")  # another address has its own counter
    clock.now += 59
    assert not limiter.hit(three_a_minute, "10.0.0.1")
    clock.now += 1
    assert limiter.hit(three_a_minute, "10.0.0.1")


def test_window_stats_say_what_is_left_and_when_it_resets():
    clock = Clock()
    storage = ProcessMemoryStorage(clock=clock)
    limiter = FixedWindowRateLimiter(storage)
    five_a_minute = parse("5 per minute")
    limiter.hit(five_a_minute, "10.0.0.1")
    limiter.hit(five_a_minute, "10.0.0.1")
    stats = limiter.get_window_stats(five_a_minute, "10.0.0.1")
    assert stats.remaining == 3
    assert stats.reset_time == clock.now + 60


def test_expired_counters_are_dropped_so_memory_follows_the_live_clients():
    clock = Clock()
    storage = ProcessMemoryStorage(clock=clock)
    limiter = FixedWindowRateLimiter(storage)
    per_second = parse("10 per second")
    for address in range(1000):
        limiter.hit(per_second, f"10.0.{address // 256}.{address % 256}")
    assert storage.counters_held() == 1000
    clock.now += 2
    limiter.hit(per_second, "192.0.2.1")
    assert storage.counters_held() == 1


def test_concurrent_hits_are_all_counted_and_start_no_threads():
    storage = ProcessMemoryStorage()
    limiter = FixedWindowRateLimiter(storage)
    many = parse("1000000 per hour")
    threads_before = threading.active_count()
    workers = [threading.Thread(target=lambda: [limiter.hit(many, "10.0.0.1") for _ in range(500)]) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert limiter.get_window_stats(many, "10.0.0.1").remaining == 1_000_000 - 4000
    assert threading.active_count() == threads_before


def test_the_default_memory_uri_is_served_by_this_store(database_url):
    from bloom import create_app

    from .conftest import make_settings

    app = create_app(make_settings(database_url))
    assert isinstance(app.extensions["bloom.limiter"].storage, ProcessMemoryStorage)
    with_redis = create_app(make_settings(database_url, RATELIMIT_STORAGE_URI="redis://127.0.0.1:1/0"))
    assert not isinstance(with_redis.extensions["bloom.limiter"].storage, ProcessMemoryStorage)


def _colliding_keys(counters: HostCounters, count: int) -> list[str]:
    """`count` keys that all land in one group of the table (as a flood eventually does)."""
    wanted, keys, n = None, [], 0
    while len(keys) < count:
        key = f"203.0.113.{n}/flood"
        group = counters._group(key)[1]
        if wanted is None:
            wanted = group
        if group == wanted:
            keys.append(key)
        n += 1
    return keys


def test_a_flood_of_distinct_addresses_never_resets_a_counted_client():
    counters = HostCounters()
    victim, *flood = _colliding_keys(counters, HostCounters.GROUP + 20)
    for _ in range(90):
        counters.incr(victim, 60, 1, now=1000.0)
    refused = [counters.incr(key, 60, 1, now=1001.0)[0] for key in flood]
    assert refused[: HostCounters.GROUP - 1] == [1] * (HostCounters.GROUP - 1)  # room for some
    assert set(refused[HostCounters.GROUP - 1:]) == {HostCounters.NO_ROOM}  # then closed for newcomers
    assert counters.incr(victim, 60, 1, now=1002.0)[0] == 91  # the victim's window was kept
    assert counters.incr(flood[-1], 60, 1, now=1061.0)[0] == 1  # room again once windows end


@pytest.mark.slow  # starts processes of its own
def test_a_worker_killed_holding_a_stripe_lock_does_not_wedge_it():
    counters = HostCounters()
    key = "198.51.100.7/limit"
    group = counters._group(key)[1]
    child = os.fork()
    if child == 0:  # takes the lock and dies holding it, as a SIGKILLed gunicorn process would
        counters._locked(group)
        os._exit(0)
    os.waitpid(child, 0)
    started = time.monotonic()
    assert counters.incr(key, 60, 1, now=1000.0)[0] == 1
    assert time.monotonic() - started < 1.0


@pytest.mark.slow  # starts processes of its own
def test_hits_on_a_live_window_never_wait_for_a_lock_another_process_holds():
    """A stripe lock held by a thread of another process (which may itself be waiting for
    its process's GIL) once made hits wait 50 ms and fall back to per-process counts."""
    counters = HostCounters()
    key = "198.51.100.9/limit"
    assert counters.incr(key, 60, 1, now=1000.0)[0] == 1
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # holds the key's stripe lock, alive, for a long while
        counters._locked(counters._group(key)[1])
        os.write(ready_w, b"!")
        time.sleep(5)
        os._exit(0)
    try:
        os.read(ready_r, 1)
        started = time.monotonic()
        counts = [counters.incr(key, 60, 1, now=1001.0)[0] for _ in range(100)]
        assert time.monotonic() - started < 0.5
        assert counts == list(range(2, 102))
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


@pytest.mark.slow  # starts processes of its own
def test_processes_hitting_one_key_at_once_are_all_counted_in_one_window():
    counters = HostCounters()
    key = "198.51.100.10/limit"
    children = []
    for _ in range(4):
        child = os.fork()
        if child == 0:
            for _ in range(500):
                counters.incr(key, 60, 1, now=1000.0)
            os._exit(0)
        children.append(child)
    for child in children:
        os.waitpid(child, 0)
    assert counters.read(key, now=1001.0) == (2000, 1060.0)
    assert counters.incr(key, 60, 1, now=1061.0) == (1, 1121.0)  # the next window starts from nothing


@pytest.mark.slow  # starts processes of its own
def test_a_worker_killed_while_claiming_its_count_column_does_not_wedge_the_others():
    counters = HostCounters()
    child = os.fork()
    if child == 0:  # takes the column lock and dies holding it
        counters._columns_lock.acquire(timeout=1.0)
        os._exit(0)
    os.waitpid(child, 0)
    started = time.monotonic()
    assert counters.incr("198.51.100.11/limit", 60, 1, now=1000.0)[0] == 1  # this process's first hit
    assert time.monotonic() - started < 1.0


class _HangingStore(ProcessMemoryStorage):
    """A shared store that fails every hit and takes a second to answer a check (Redis
    behind a dropped route: each call waits for its timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def incr(self, *args, **kwargs):
        raise ConnectionError("store away")

    def check(self) -> bool:
        self.checks += 1
        time.sleep(1.0)
        return False


def test_while_the_shared_store_hangs_one_request_asks_it_again_and_the_others_do_not_wait():
    from bloom.web.rate_limits import ClientLimit

    store = _HangingStore()
    limit = ClientLimit(parse("100/minute"), FixedWindowRateLimiter(store))
    assert limit.hit("api", "10.0.0.1")[0]  # fails over to this process's count
    time.sleep(ClientLimit.FIRST_RETRY_S + 0.05)  # the retry is due
    waits: list[float] = []

    def one_request() -> None:
        started = time.monotonic()
        assert limit.hit("api", "10.0.0.2")[0]
        waits.append(time.monotonic() - started)

    requests_at_once = [threading.Thread(target=one_request) for _ in range(8)]
    for thread in requests_at_once:
        thread.start()
    for thread in requests_at_once:
        thread.join()
    assert store.checks == 1  # every request used to ask, each waiting for the store's timeout
    assert sorted(waits)[-2] < 0.5  # all but the one asking were served at once


def test_crafted_addresses_that_fill_a_clients_group_never_lock_it_out(monkeypatch, caplog):
    """Sixteen addresses chosen offline to land in one group of the host's table used to
    make a client whose key fell there over its limit (429) for the whole window. Now a
    key that finds no room is counted in its process: limited, never refused for it."""
    from bloom.web import rate_limit_store
    from bloom.web.rate_limit_store import HostSharedStorage

    counters = HostCounters()
    monkeypatch.setattr(rate_limit_store, "_host_counters", counters)
    limiter = FixedWindowRateLimiter(HostSharedStorage())
    limit = parse("5/minute")
    same_group, n = [], 0  # addresses whose keys, as the limiter writes them, share one group
    while len(same_group) < HostCounters.GROUP + 2:
        address = f"2001:db8::{n:x}"
        if not same_group or counters._group(limit.key_for(address))[1] == counters._group(
                limit.key_for(same_group[0]))[1]:
            same_group.append(address)
        n += 1
    counted, victim, *flood = same_group
    for _ in range(3):
        assert limiter.hit(limit, counted)  # a client counted before the flood
    with caplog.at_level("WARNING", logger="bloom.web.rate_limit_store"):
        for key in flood:  # the crafted addresses: every slot of the group now holds a live window
            assert limiter.hit(limit, key)
        assert [limiter.hit(limit, victim) for _ in range(6)] == [True] * 5 + [False]  # its own limit, no other
    assert limiter.get_window_stats(limit, victim)[1] == 0
    assert [limiter.hit(limit, counted) for _ in range(3)] == [True, True, False]  # its count was kept
    assert len([r for r in caplog.records if "full of live windows" in r.getMessage()]) == 1
