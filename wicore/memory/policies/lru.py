"""Least recently used: evict the key whose last reference is oldest."""

from __future__ import annotations

from collections import OrderedDict

from wicore.memory.policies.base import Key, ReplacementPolicy


class LRUPolicy(ReplacementPolicy):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()  # least recent first

    def _on_hit(self, key: Key, now: float) -> None:
        self._order.move_to_end(key)

    def _on_insert(self, key: Key, now: float) -> None:
        self._order[key] = None

    def _on_remove(self, key: Key) -> None:
        del self._order[key]

    def _victim(self, now: float) -> Key:
        return next(iter(self._order))
