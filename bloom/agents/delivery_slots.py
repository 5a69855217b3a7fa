"""The delivery slots of one process, shared fairly between agents (bloom/agents/dispatch.py).

Every delivery holds a slot (a thread waiting for its agent's answer) from its grant until
the agent answers, which a real agent does only when its run ends. An agent's own
capacity bounds how many slots it holds, but agents with large capacities and long runs
(or that hold every task until its deadline) could still take every slot of the process
and stop dispatch for everyone else. So:

- Up to `fair_pool` slots are taken by whoever comes: no agent waits while there is room.
- Beyond it, an agent gets another slot only while it holds fewer than its fair share,
  `fair_pool // (agents holding slots + 1)`: the agents that hold the most are left out
  of the next grants (dispatch passes them to the lease statement as `full_addresses`),
  and an agent that holds none always has a share. Slots come back as runs end, so the
  holders converge on equal shares (max-min fairness) within one run's length.
- `hard_limit` is the most there can ever be (the room newcomers get beyond the pool).

Agents are counted by address (workers.address: one agent under several names is one).
"""
from __future__ import annotations

import threading
from collections import Counter


class DeliverySlots:
    def __init__(self, fair_pool: int, hard_limit: int) -> None:
        if not 0 < fair_pool <= hard_limit:
            raise ValueError("need 0 < fair_pool <= hard_limit")
        self.fair_pool = fair_pool
        self.hard_limit = hard_limit
        self._lock = threading.Lock()
        self._taken = 0  # reserved slots, assigned to an address or not yet
        self._held: Counter[str] = Counter()  # address -> slots its deliveries hold

    def reserve(self) -> bool:
        """Take a slot before a grant (its agent is not known yet); False when none is left."""
        with self._lock:
            if self._taken >= self.hard_limit:
                return False
            self._taken += 1
            return True

    def full_addresses(self) -> list[str]:
        """The agents that may not have the slot just reserved: none while the pool has
        room, else those holding at least their fair share."""
        with self._lock:
            if self._taken <= self.fair_pool:
                return []
            share = max(1, self.fair_pool // (len(self._held) + 1))
            return sorted(address for address, held in self._held.items() if held >= share)

    def assign(self, address: str) -> None:
        """The reserved slot went to a delivery to this agent."""
        with self._lock:
            self._held[address] += 1

    def release(self, address: str | None) -> None:
        """A reserved slot is free again (address: the agent it was assigned to, if any)."""
        with self._lock:
            self._taken -= 1
            if address is not None:
                self._held[address] -= 1
                if self._held[address] <= 0:
                    del self._held[address]

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)
