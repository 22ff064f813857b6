"""Belady's MIN: the offline optimal replacement oracle.

The policy is given the whole future access sequence and checks, on every
access, that the key accessed is the next one of that sequence (it raises
``ValueError`` otherwise). On a miss in a full tier it compares the next use of
every resident key and of the missed key: if the missed key is needed no sooner
than every resident one it bypasses the tier (is not admitted); otherwise the
resident key used farthest in the future (never again counts as infinity) is
evicted. This is MIN with bypass, optimal for the hit count with unit sizes
among all demand policies, bypassing ones included, so it bounds every other
policy here from above. With variable sizes (bytes) optimal caching is NP-hard
and this rule is only a heuristic reference, not a bound.

Next-use indices are precomputed once (O(len(future))); victims come from a max
heap on next use with lazy deletion, O(log n) amortised per eviction. Ties (two
keys never used again) go to the key whose last access came first.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from wicore.memory.policies.base import AccessOutcome, Key, ReplacementPolicy


class BeladyPolicy(ReplacementPolicy):
    name = "belady"

    def __init__(self, capacity: int, future: Sequence[Key]) -> None:
        super().__init__(capacity)
        self.future = list(future)
        never = len(self.future)
        self._next_use = [never] * never
        last: dict[Key, int] = {}
        for i in range(never - 1, -1, -1):
            key = self.future[i]
            self._next_use[i] = last.get(key, never)
            last[key] = i
        self.cursor = 0
        self._now_index = -1
        self._next: dict[Key, int] = {}  # resident key -> index of its next use
        self._heap: list[tuple[int, int, Key]] = []  # (-next use, access index, key)

    def access(self, key: Key, now: float, size: int = 1) -> AccessOutcome:
        if self.cursor >= len(self.future):
            raise ValueError(f"BeladyPolicy: access {self.cursor} ({key!r}) is past the end of the "
                             f"future sequence ({len(self.future)} accesses)")
        expected = self.future[self.cursor]
        if expected != key:
            raise ValueError(f"BeladyPolicy: access {self.cursor} is {key!r} but the future sequence "
                             f"says {expected!r}; replay exactly the trace the oracle was built from")
        self._now_index = self.cursor
        self.cursor += 1
        return super().access(key, now, size)

    def next_use(self, key: Key) -> int:
        """Index of the next access of a resident key (``len(future)``: never)."""
        return self._next[key]

    def _track(self, key: Key) -> None:
        nxt = self._next_use[self._now_index]
        self._next[key] = nxt
        heapq.heappush(self._heap, (-nxt, self._now_index, key))
        if len(self._heap) > 4 * len(self._next) + 64:
            self._heap = [e for e in self._heap if self._next.get(e[2]) == -e[0] and e[2] in self._sizes]
            heapq.heapify(self._heap)

    def _top(self) -> tuple[int, int, Key]:
        while True:
            neg, idx, key = self._heap[0]
            if key in self._next and self._next[key] == -neg:
                return neg, idx, key
            heapq.heappop(self._heap)

    def _on_hit(self, key: Key, now: float) -> None:
        self._track(key)

    def _on_insert(self, key: Key, now: float) -> None:
        self._track(key)

    def _on_remove(self, key: Key) -> None:
        del self._next[key]

    def _admit(self, key: Key, now: float) -> bool:
        if self.used + self._incoming_size <= self.capacity or not self._next:
            return True
        return self._next_use[self._now_index] < -self._top()[0]

    def _victim(self, now: float) -> Key:
        return self._top()[2]
