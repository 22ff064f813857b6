"""A2CR: Attention-Aware Cache Replacement.

Each block ``b`` keeps, with ``lam = time_decay_factor`` (per second of ``now``):

* decayed attention ``A_b(t) = sum_i m_i exp(-lam (t - t_i))`` over the masses ``m_i``
  reported by ``feedback(b, m_i, t_i)``;
* decayed reference count ``F_b(t) = sum_j exp(-lam (t - s_j))`` over its accesses ``s_j``;
* its first access ``t0_b`` and last access ``last_b``.

Decayed sums are biased low for young blocks (a block read every step for 1 s
has a smaller ``F`` than one read every step for 1 min). As in Adam's bias
correction they are divided by the weight of the window the block has been
observed for, which turns them into decayed per-second *rates*::

    W_b = (1 - exp(-lam (now - t0_b + g))) / lam        (now - t0_b + g when lam = 0)
    a_b = A_b(now) / W_b,    f_b = F_b(now) / W_b

``g`` is the tier's mean re-reference gap (an EMA, rate 0.01, of ``now - last``
over every re-reference of a known block; 1 s until one is seen): a block seen
once is assumed to have been watched for one typical gap. Rates are normalised
by their maximum over the resident blocks (0 if that maximum is 0, e.g. when no
attention is reported), and recency is the rank of the last access among the
residents, ``r_b = rank(last_b) / (n - 1)`` (1 = most recent; 1 when n = 1). Ranks
make recency scale-free: ``exp(-lam * age)`` would be ~1 for every block whenever
the ages are much shorter than ``1/lam`` (10 s by default), leaving its weight
without effect. The score is

    score_b = wa * a_b / max_r a_r + wf * f_b / max_r f_r + wr * r_b,   in [0, wa + wf + wr]

(``wa, wf, wr = attention_weight, frequency_weight, recency_weight``) and the
victim is the resident block with the lowest score (ties: least recently used).
One evaluation is O(n log n) numpy over the n resident blocks.

Adaptive admission (``adaptive_threshold=True``): on every miss in a full tier the
policy takes the lower ``threshold_quantile`` quantile ``q`` of the resident scores
and moves a running threshold towards it, ``theta += threshold_lr * (q - theta)``
(the first sets ``theta = q``). Evicted blocks leave a ghost record (the state
above) in an LRU history of ``max(4096, 4 * peak resident blocks)`` entries. A
missed block that does not fit without an eviction and has a ghost record gets
an *expected score*: the score above computed from its record at ``now``, as if
it had stayed resident, before counting this access (normalised and ranked
together with the residents). If it is below ``theta`` the block is not admitted
(bypass: read from the lower tier, not stored); the access and later feedback
still update its ghost record, so a block that keeps coming back earns a place.
Blocks without history are always admitted. ``adaptive_threshold=False`` admits
every block.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from wicore.errors import ConfigError
from wicore.memory.policies.base import Key, ReplacementPolicy

# columns of the per-block state: A and its time, F and its time, last access,
# logical tick of the last access (tie-breaks), first access
_A, _TA, _F, _TF, _LAST, _TICK, _FIRST = range(7)
_GAP_LR = 0.01


class A2CRPolicy(ReplacementPolicy):
    name = "a2cr"

    def __init__(self, capacity: int, attention_weight: float = 0.5, frequency_weight: float = 0.3,
                 recency_weight: float = 0.2, time_decay_factor: float = 0.1,
                 adaptive_threshold: bool = True, threshold_quantile: float = 0.25,
                 threshold_lr: float = 0.05) -> None:
        super().__init__(capacity)
        numbers = {"attention_weight": attention_weight, "frequency_weight": frequency_weight,
                   "recency_weight": recency_weight, "time_decay_factor": time_decay_factor}
        for field_name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"memory.a2cr.{field_name}: must be a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"memory.a2cr.{field_name}: must be >= 0, got {value}")
        if attention_weight + frequency_weight + recency_weight <= 0:
            raise ConfigError("memory.a2cr.attention_weight: attention_weight, frequency_weight and "
                              "recency_weight are all 0; give at least one a positive weight")
        if not isinstance(adaptive_threshold, bool):
            raise ConfigError(f"memory.a2cr.adaptive_threshold: must be true or false, got {adaptive_threshold!r}")
        if not isinstance(threshold_quantile, (int, float)) or not 0.0 <= threshold_quantile <= 1.0:
            raise ConfigError(f"memory.a2cr.threshold_quantile: must be in [0, 1], got {threshold_quantile!r}")
        if not isinstance(threshold_lr, (int, float)) or not 0.0 < threshold_lr <= 1.0:
            raise ConfigError(f"memory.a2cr.threshold_lr: must be in (0, 1], got {threshold_lr!r}")
        self.wa, self.wf, self.wr = float(attention_weight), float(frequency_weight), float(recency_weight)
        self.decay = float(time_decay_factor)
        self.adaptive_threshold = adaptive_threshold
        self.threshold_quantile = float(threshold_quantile)
        self.threshold_lr = float(threshold_lr)
        self.threshold: float | None = None
        self.mean_gap: float | None = None
        self.bypassed = 0
        self._pos: dict[Key, int] = {}  # resident key -> row of self._state
        self._keys: list[Key] = []  # row -> key (rows 0..n-1 are dense)
        self._state = np.zeros((64, 7), dtype=np.float64)
        self._ghost: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._ghost_cap = 4096

    # ----- scoring ----------------------------------------------------------------
    def _scores(self, rows: np.ndarray, now: float) -> np.ndarray:
        """Scores of ``rows`` (state rows), normalised and ranked among themselves."""
        lam = self.decay
        observed = now - rows[:, _FIRST] + (self.mean_gap if self.mean_gap is not None else 1.0)
        observed = np.maximum(observed, 1e-9)  # all accesses at one instant (gap 0): avoid 0 / 0
        window = -np.expm1(-lam * observed) / lam if lam > 0 else observed
        a = rows[:, _A] * np.exp(-lam * (now - rows[:, _TA])) / window
        f = rows[:, _F] * np.exp(-lam * (now - rows[:, _TF])) / window
        n = len(rows)
        rank = np.empty(n)
        rank[np.argsort(rows[:, _TICK], kind="stable")] = np.arange(n) / max(n - 1, 1)
        score = self.wr * (rank if n > 1 else np.ones(1))
        a_max, f_max = a.max(), f.max()
        if a_max > 0:
            score += self.wa * (a / a_max)
        if f_max > 0:
            score += self.wf * (f / f_max)
        return score

    def score(self, key: Key, now: float) -> float:
        """Current score of a resident key (normalised over the resident blocks)."""
        return float(self._scores(self._state[:len(self._keys)], now)[self._pos[key]])

    # ----- hooks ------------------------------------------------------------------
    def _touch(self, row: np.ndarray, now: float) -> None:
        gap = now - row[_LAST]
        self.mean_gap = gap if self.mean_gap is None else self.mean_gap + _GAP_LR * (gap - self.mean_gap)
        self._count(row, now)

    def _count(self, row: np.ndarray, now: float) -> None:
        row[_F] = row[_F] * math.exp(-self.decay * (now - row[_TF])) + 1.0
        row[_TF] = now
        row[_LAST] = now
        row[_TICK] = self._clock

    def _on_hit(self, key: Key, now: float) -> None:
        self._touch(self._state[self._pos[key]], now)

    def _admit(self, key: Key, now: float) -> bool:
        n = len(self._keys)
        if not self.adaptive_threshold or n == 0 or self.used + self._incoming_size <= self.capacity:
            return True
        self._grow(n + 1)
        ghost = self._ghost.get(key)
        if ghost is not None:
            self._state[n] = ghost  # scratch row: scored with the residents, never resident
        scores = self._scores(self._state[:n + (ghost is not None)], now)
        k = int(self.threshold_quantile * (n - 1))
        q = float(np.partition(scores[:n], k)[k])
        theta = self.threshold
        self.threshold = q if theta is None else theta + self.threshold_lr * (q - theta)
        if ghost is None or theta is None or scores[n] >= theta:
            return True
        self._touch(ghost, now)  # the bypassed access still counts towards its history
        self._ghost.move_to_end(key)
        self.bypassed += 1
        return False

    def _grow(self, rows: int) -> None:
        if rows > len(self._state):
            self._state = np.vstack([self._state, np.zeros_like(self._state)])

    def _on_insert(self, key: Key, now: float) -> None:
        n = len(self._keys)
        self._grow(n + 1)
        ghost = self._ghost.pop(key, None)
        row = self._state[n]
        if ghost is not None:
            row[:] = ghost
            self._touch(row, now)
        else:
            row[:] = (0.0, now, 0.0, now, now, 0.0, now)
            self._count(row, now)
        self._pos[key] = n
        self._keys.append(key)
        self._ghost_cap = max(self._ghost_cap, 4 * len(self._keys))

    def _drop(self, key: Key) -> np.ndarray:
        """Remove a resident row (the last row moves into its place); return a copy of it."""
        i = self._pos.pop(key)
        row = self._state[i].copy()
        last = len(self._keys) - 1
        if i != last:
            moved = self._keys[last]
            self._state[i] = self._state[last]
            self._keys[i] = moved
            self._pos[moved] = i
        self._keys.pop()
        return row

    def _on_evict(self, key: Key, now: float) -> None:
        self._ghost[key] = self._drop(key)
        while len(self._ghost) > self._ghost_cap:
            self._ghost.popitem(last=False)

    def _on_remove(self, key: Key) -> None:
        self._drop(key)

    def feedback(self, key: Key, attention_mass: float, now: float) -> None:
        if not math.isfinite(attention_mass) or attention_mass < 0:
            raise ValueError(f"attention_mass must be a finite number >= 0, got {attention_mass!r}")
        i = self._pos.get(key)
        row = self._state[i] if i is not None else self._ghost.get(key)
        if row is None:
            return
        row[_A] = row[_A] * math.exp(-self.decay * (now - row[_TA])) + attention_mass
        row[_TA] = now

    def _victim(self, now: float) -> Key:
        rows = self._state[:len(self._keys)]
        scores = self._scores(rows, now)
        low = np.flatnonzero(scores == scores.min())
        return self._keys[int(low[np.argmin(rows[low, _TICK])])]
