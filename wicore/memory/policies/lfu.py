"""Least frequently used (in-cache counts): evict the key with the fewest
references since it was inserted; ties go to the least recently used key.

A count is forgotten when its key leaves the tier. Victims come from a heap of
``(count, last_reference_tick)`` entries with lazy deletion, so an eviction is
O(log n) amortised. Ticks are the policy's logical clock (accesses so far), which
makes the ordering deterministic.
"""

from __future__ import annotations

import heapq

from wicore.memory.policies.base import Key, ReplacementPolicy


class LFUPolicy(ReplacementPolicy):
    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._state: dict[Key, tuple[int, int]] = {}  # key -> (count, last tick)
        self._heap: list[tuple[int, int, Key]] = []

    def _push(self, key: Key, count: int) -> None:
        self._state[key] = (count, self._clock)
        heapq.heappush(self._heap, (count, self._clock, key))
        if len(self._heap) > 4 * len(self._state) + 64:  # drop stale entries
            self._heap = [(c, t, k) for k, (c, t) in self._state.items()]
            heapq.heapify(self._heap)

    def _on_hit(self, key: Key, now: float) -> None:
        self._push(key, self._state[key][0] + 1)

    def _on_insert(self, key: Key, now: float) -> None:
        self._push(key, 1)

    def _on_remove(self, key: Key) -> None:
        del self._state[key]

    def _victim(self, now: float) -> Key:
        while True:
            count, tick, key = self._heap[0]
            if self._state.get(key) == (count, tick):
                return key
            heapq.heappop(self._heap)
