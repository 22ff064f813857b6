"""LRFU (Lee et al., 2001): a spectrum between LRU and LFU.

Each resident block ``b`` has a combined recency-frequency value

    CRF_t(b) = sum over past references t_i of b of F(t - t_i),   F(x) = (1/2) ** (lam * x),

with time ``t`` measured on a logical clock (the number of accesses so far, not
``now``). The victim is the block with the smallest CRF. ``lam = 0`` makes CRF the
reference count (LFU); ``lam = 1`` makes the most recent reference dominate all
older ones (F(1) = 1/2 and the whole geometric tail sums to < 1), i.e. LRU. Ties
go to the least recently referenced block, as in ``LFUPolicy``.

Because every CRF decays by the same factor between two instants, the order of
blocks at any time is the order of the time-invariant key
``log2(CRF_{t_b}(b)) + lam * t_b`` (``t_b``: the block's last reference), so a heap
with lazy deletion gives O(log n) evictions. History is kept for resident blocks
only (a block re-enters with CRF 1). The default ``lam = 0.001`` (a reference
loses half its weight after 1000 accesses) sits between the two extremes; with
``lam >= ~0.1`` the policy is already LRU for caches of more than a few blocks.
"""

from __future__ import annotations

import heapq
import math

from wicore.errors import ConfigError
from wicore.memory.policies.base import Key, ReplacementPolicy


class LRFUPolicy(ReplacementPolicy):
    name = "lrfu"

    def __init__(self, capacity: int, lam: float = 0.001) -> None:
        super().__init__(capacity)
        if not isinstance(lam, (int, float)) or not 0.0 <= float(lam) <= 1.0:
            raise ConfigError(f"memory.lrfu.lam: must be in [0, 1], got {lam!r}")
        self.lam = float(lam)
        self._state: dict[Key, tuple[float, int]] = {}  # key -> (CRF at last ref, last ref tick)
        self._heap: list[tuple[float, int, Key]] = []

    def crf(self, key: Key) -> float:
        """CRF of a resident key at the current logical time."""
        value, tick = self._state[key]
        return value * 0.5 ** (self.lam * (self._clock - tick))

    def _push(self, key: Key, value: float) -> None:
        tick = self._clock
        self._state[key] = (value, tick)
        heapq.heappush(self._heap, (math.log2(value) + self.lam * tick, tick, key))
        if len(self._heap) > 4 * len(self._state) + 64:
            self._heap = [(math.log2(v) + self.lam * t, t, k) for k, (v, t) in self._state.items()]
            heapq.heapify(self._heap)

    def _on_hit(self, key: Key, now: float) -> None:
        value, tick = self._state[key]
        self._push(key, 1.0 + value * 0.5 ** (self.lam * (self._clock - tick)))

    def _on_insert(self, key: Key, now: float) -> None:
        self._push(key, 1.0)

    def _on_remove(self, key: Key) -> None:
        del self._state[key]

    def _victim(self, now: float) -> Key:
        while True:
            _, tick, key = self._heap[0]
            state = self._state.get(key)
            if state is not None and state[1] == tick:
                return key
            heapq.heappop(self._heap)
