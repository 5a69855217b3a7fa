"""Wake-ups of waiting claims (bloom/queue_events.py) through a real PostgreSQL LISTEN/NOTIFY:
tasks are announced after their commit, each task wakes one waiting claim that takes it."""
from __future__ import annotations

import time

from bloom.services import services

from .helpers import TASK
from .support import wait_until


def _line(events, slugs, count):
    return [events.enter_line(slugs) for _ in range(count)]


def test_each_created_task_wakes_one_waiting_claim_that_takes_its_slug(app, client):
    events = services(app).queue_events
    summarizers = _line(events, ["summarizer"], 3)
    others = _line(events, ["translator"], 2)
    response = client.post("/api/runtime/llm-tasks/batch", json={"tasks": [TASK, TASK]})
    assert response.status_code == 201
    wait_until(lambda: sum(t.woken.is_set() for t in summarizers) == 2, timeout=10,
               what="two of the three summarizer claims to wake")
    time.sleep(0.3)  # nothing more comes
    assert [t.woken.is_set() for t in summarizers] == [True, True, False]  # the longest waiting first
    assert not any(t.woken.is_set() for t in others)
    assert client.post("/api/runtime/llm-tasks", json=TASK).status_code == 201
    wait_until(lambda: summarizers[2].woken.is_set(), timeout=10, what="the third claim to wake")
    assert not any(t.woken.is_set() for t in others)


def test_a_slug_cannot_carry_the_count_mark_so_a_payload_means_one_thing(client):
    response = client.post("/api/runtime/llm-tasks", json={**TASK, "agent_slug": "2\x1fsummarizer"})
    assert response.status_code == 400  # control characters are refused in every key text


def test_closing_a_listening_process_stops_its_listener_at_once(app):
    """Every process closes its listener when it stops; it must not sit out the pause
    that separates reconnect tries (it did: one second per close)."""
    events = services(app).queue_events
    events.enter_line(["summarizer"])  # starts the listener thread
    wait_until(lambda: events._thread is not None and events._thread.is_alive(), timeout=5, what="the listener")
    listener = events._thread
    started = time.monotonic()
    events.close()
    assert not listener.is_alive()
    assert time.monotonic() - started < 0.5  # it took 1.0 s: the reconnect pause ran out first
    events.close()  # a second close (the app's teardown) is harmless
