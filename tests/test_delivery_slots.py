"""A process's delivery slots are shared fairly between agents (bloom/agents/delivery_slots.py)."""
from __future__ import annotations

import pytest

from bloom.agents.delivery_slots import DeliverySlots


def _fill(slots: DeliverySlots, address: str, count: int) -> None:
    for _ in range(count):
        assert slots.reserve()
        slots.assign(address)


def test_nobody_is_left_out_while_the_pool_has_room():
    slots = DeliverySlots(fair_pool=8, hard_limit=10)
    _fill(slots, "http://big", 7)
    assert slots.reserve()
    assert slots.full_addresses() == []  # the 8th slot: still inside the pool


def test_past_the_pool_the_agents_holding_their_share_are_left_out_and_a_newcomer_is_not():
    slots = DeliverySlots(fair_pool=8, hard_limit=10)
    _fill(slots, "http://a", 4)
    _fill(slots, "http://b", 3)
    _fill(slots, "http://c", 1)
    assert slots.reserve()  # the 9th
    # share = 8 // (3 holders + 1) = 2: a and b hold more, c holds less
    assert slots.full_addresses() == ["http://a", "http://b"]
    slots.assign("http://newcomer")
    assert slots.reserve()  # the 10th, the last
    assert not slots.reserve()
    slots.release(None)
    slots.release("http://a")
    assert slots.held() == {"http://a": 3, "http://b": 3, "http://c": 1, "http://newcomer": 1}


def test_every_slot_comes_back():
    slots = DeliverySlots(fair_pool=2, hard_limit=3)
    _fill(slots, "http://a", 3)
    assert not slots.reserve()
    for _ in range(3):
        slots.release("http://a")
    assert slots.held() == {} and slots.full_addresses() == []
    assert slots.reserve()


def test_a_hard_limit_below_the_pool_is_refused():
    with pytest.raises(ValueError):
        DeliverySlots(fair_pool=4, hard_limit=3)
