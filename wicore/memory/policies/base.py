"""The replacement-policy contract shared by every cache tier.

A policy manages one tier of ``capacity`` size units (bytes or blocks: the caller
decides). The bookkeeping (which keys are resident, their sizes, how much is
used, the eviction loop) lives here; a subclass only keeps the state it needs to
*choose* victims, in the style of ``cachetools``:

* ``_on_hit(key, now)``: a resident key was accessed again;
* ``_on_miss(key, now, size)``: a non-resident key was accessed (before admission);
* ``_admit(key, now) -> bool``: whether to store the missed key (``False``: bypass,
  the block is streamed from the lower tier and not kept);
* ``_victim(now) -> key``: a resident key to evict (called until the new key fits);
* ``_on_insert(key, now)``: the key is now resident;
* ``_on_evict(key, now)``: the key was evicted to make room (defaults to ``_on_remove``);
* ``_on_remove(key)``: the key left the tier through ``remove()`` (invalidation).

While a miss is being handled ``self._incoming`` / ``self._incoming_size`` name the
key being inserted (ARC needs it to choose between its lists). Policies never read
a clock: time is the ``now`` the caller passes in. ``self._clock`` is a logical
clock, the number of accesses so far (hits and misses), for policies that measure
time in references (LFU tie-breaks, LRFU). Every policy breaks ties by a stable
rule (insertion or access order), never by hash order or randomness.

A hit does not change a key's stored size; ``remove()`` it first to resize.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import ClassVar

from wicore.errors import ConfigError

Key = Hashable


@dataclass
class AccessOutcome:
    """What one ``access`` did: hit or miss, whether a miss was stored, what left."""

    hit: bool
    admitted: bool
    evicted: list[Key] = field(default_factory=list)


class ReplacementPolicy(ABC):
    """One cache tier of ``capacity`` units; subclasses choose the victims."""

    name: ClassVar[str] = "base"

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ConfigError(f"memory.{self.name}.capacity: must be a positive integer, got {capacity!r}")
        self.capacity: int = capacity
        self.used: int = 0
        self._sizes: dict[Key, int] = {}  # resident keys in insertion order
        self._clock: int = 0
        self._incoming: Key | None = None
        self._incoming_size: int = 0

    # ----- read-only view ----------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(capacity={self.capacity}, used={self.used}, keys={len(self)})"

    def resident(self) -> list[Key]:
        """The resident keys, in insertion order."""
        return list(self._sizes)

    def size_of(self, key: Key) -> int:
        return self._sizes[key]

    # ----- the operations ------------------------------------------------------
    def access(self, key: Key, now: float, size: int = 1) -> AccessOutcome:
        """Reference ``key`` (of ``size`` units) at time ``now``.

        A hit updates the policy's recency/frequency state. A miss of a key larger
        than the whole tier is not admitted; otherwise, if ``_admit`` agrees,
        victims are evicted until the key fits and it is inserted.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"access size must be a positive integer, got {size!r}")
        self._clock += 1
        if key in self._sizes:
            self._on_hit(key, now)
            return AccessOutcome(hit=True, admitted=True, evicted=[])
        self._incoming, self._incoming_size = key, size
        try:
            self._on_miss(key, now, size)
            if size > self.capacity or not self._admit(key, now):
                return AccessOutcome(hit=False, admitted=False, evicted=[])
            evicted: list[Key] = []
            while self.used + size > self.capacity:
                victim = self._victim(now)
                if victim not in self._sizes:
                    raise RuntimeError(f"{type(self).__name__}._victim returned non-resident key {victim!r}")
                self.used -= self._sizes.pop(victim)
                self._on_evict(victim, now)
                evicted.append(victim)
            self._sizes[key] = size
            self.used += size
            self._on_insert(key, now)
            return AccessOutcome(hit=False, admitted=True, evicted=evicted)
        finally:
            self._incoming, self._incoming_size = None, 0

    def feedback(self, key: Key, attention_mass: float, now: float) -> None:
        """The attention mass ``key`` received at ``now``. Ignored by classical policies."""
        return None

    def remove(self, key: Key) -> None:
        """Invalidate ``key`` (for example its sequence finished). A no-op if absent."""
        if key in self._sizes:
            self.used -= self._sizes.pop(key)
            self._on_remove(key)

    # ----- subclass hooks --------------------------------------------------------
    def _on_hit(self, key: Key, now: float) -> None:
        """A resident key was referenced again."""
        return None

    def _on_miss(self, key: Key, now: float, size: int) -> None:
        """A non-resident key was referenced (called before ``_admit``)."""
        return None

    def _on_insert(self, key: Key, now: float) -> None:
        """``key`` became resident."""
        return None

    def _on_evict(self, key: Key, now: float) -> None:
        """``key`` was evicted to make room; by default the same as a removal."""
        self._on_remove(key)

    def _on_remove(self, key: Key) -> None:
        """``key`` left the tier."""
        return None

    @abstractmethod
    def _victim(self, now: float) -> Key:
        """Return a resident key to evict."""

    def _admit(self, key: Key, now: float) -> bool:
        """Whether to store a missed key (``False`` bypasses the tier)."""
        return True
