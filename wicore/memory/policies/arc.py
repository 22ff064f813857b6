"""ARC, the Adaptive Replacement Cache (Megiddo & Modha, FAST 2003).

Resident keys are split into T1 (seen once recently) and T2 (seen at least twice);
the ghost lists B1 and B2 remember keys recently evicted from T1 and T2 (keys
only, no data). The target size ``p`` of T1 adapts: a miss that hits ghost B1
means T1 was too small (``p`` grows), a ghost hit in B2 means T2 was too small
(``p`` shrinks). The victim is T1's LRU key when ``|T1| > p`` (or ``|T1| == p`` and
the missed key is in B2), else T2's LRU key. A ghost hit re-enters in T2, a cold
miss in T1.

Variable sizes: every list is measured in size *units* (the same units as
``capacity``), ghosts remember the size their key had, ``p`` is in units and the
adaptation step is ``max(|B2|/|B1|, 1) * size`` (units). The directory bounds
``|T1| + |B1| <= c`` and ``|T1| + |T2| + |B1| + |B2| <= 2c`` are enforced after each
insertion by dropping the oldest ghosts (B1 first for the first bound, B2 first
for the second). With unit sizes this is the original algorithm: it evicts the
same keys in the same order (the original deletes the B1/B2 ghost before the
replacement rather than after, which does not change any decision).
Keys removed with ``remove()`` leave no ghost.
"""

from __future__ import annotations

from collections import OrderedDict

from wicore.memory.policies.base import Key, ReplacementPolicy


class ARCPolicy(ReplacementPolicy):
    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p: float = 0.0
        self._t1: OrderedDict[Key, int] = OrderedDict()  # LRU first
        self._t2: OrderedDict[Key, int] = OrderedDict()
        self._b1: OrderedDict[Key, int] = OrderedDict()
        self._b2: OrderedDict[Key, int] = OrderedDict()
        self._size = {"t1": 0, "t2": 0, "b1": 0, "b2": 0}

    def lists(self) -> dict[str, list[Key]]:
        """The four lists, LRU first (for inspection and tests)."""
        return {"t1": list(self._t1), "t2": list(self._t2), "b1": list(self._b1), "b2": list(self._b2)}

    def _od(self, name: str) -> OrderedDict[Key, int]:
        return {"t1": self._t1, "t2": self._t2, "b1": self._b1, "b2": self._b2}[name]

    def _add(self, name: str, key: Key, size: int) -> None:
        self._od(name)[key] = size
        self._size[name] += size

    def _pop(self, name: str, key: Key) -> int:
        size = self._od(name).pop(key)
        self._size[name] -= size
        return size

    def _on_hit(self, key: Key, now: float) -> None:
        size = self._pop("t1", key) if key in self._t1 else self._pop("t2", key)
        self._add("t2", key, size)

    def _on_miss(self, key: Key, now: float, size: int) -> None:
        b1, b2 = self._size["b1"], self._size["b2"]
        if key in self._b1:
            self.p = min(float(self.capacity), self.p + max(b2 / b1, 1.0) * size)
        elif key in self._b2:
            self.p = max(0.0, self.p - max(b1 / b2, 1.0) * size)

    def _victim(self, now: float) -> Key:
        t1 = self._size["t1"]
        if self._t1 and (not self._t2 or t1 > self.p or (self._incoming in self._b2 and t1 == self.p)):
            return next(iter(self._t1))
        return next(iter(self._t2))

    def _on_evict(self, key: Key, now: float) -> None:
        if key in self._t1:
            self._add("b1", key, self._pop("t1", key))
        else:
            self._add("b2", key, self._pop("t2", key))

    def _on_remove(self, key: Key) -> None:
        self._pop("t1", key) if key in self._t1 else self._pop("t2", key)

    def _on_insert(self, key: Key, now: float) -> None:
        size = self._sizes[key]
        if key in self._b1:
            self._pop("b1", key)
            self._add("t2", key, size)
        elif key in self._b2:
            self._pop("b2", key)
            self._add("t2", key, size)
        else:
            self._add("t1", key, size)
        c, s = self.capacity, self._size
        while s["t1"] + s["b1"] > c and self._b1:
            self._pop("b1", next(iter(self._b1)))
        while sum(s.values()) > 2 * c and (self._b1 or self._b2):
            self._pop("b2" if self._b2 else "b1", next(iter(self._b2 or self._b1)))
