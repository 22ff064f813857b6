"""Token scorers: how much the next token of a request needs the deep path.

A scorer keeps the last signals each request's emitted token reported
(``StepResult.signals``) and turns them into a score in ``[0, MAX_SCORE]``;
the router sends a token deep when its score reaches the threshold. The base
class does the bookkeeping (last signals per request, the cold score of a
request with no signals yet, clamping); a subclass only maps one signal dict to
a raw score (``_score_signals``), as a replacement policy only picks a victim.

Scorers (high score -> deep):

* ``LearnedScorer``: ``signals["router"]``, the learned linear router's sigmoid;
* ``ConfidenceScorer``: ``1 - signals["confidence"]`` (an unsure prediction needs depth);
* ``EntropyScorer``: ``signals["entropy"]`` (normalised next-token entropy);
* ``AttentionScorer``: ``1 - signals["attention_peak"]`` (concentrated attention -> easy token);
* ``RandomScorer``: a seeded uniform per emitted token, ignoring the signals (ablation).

Pure policy code: no simpy, no torch, no clock, no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from wicore.errors import ConfigError

MAX_SCORE = 1.0 - 2.0**-24  # largest score: a score is < 1, so threshold 1 sends every token shallow
COLD_SCORE = MAX_SCORE  # default score of a request with no signals yet: deep


def _clamp(x: float, cold: float) -> float:
    """Clamp a raw score to [0, MAX_SCORE]; NaN (a missing signal) becomes the cold score."""
    if x != x:
        return cold
    return 0.0 if x < 0.0 else MAX_SCORE if x > MAX_SCORE else x


class Scorer:
    """Base scorer: per-request bookkeeping; subclasses implement ``_score_signals``.

    ``cold_score`` (in [0, 1], clamped to ``MAX_SCORE``) is the score of a
    request that has reported no signals yet, or whose signals lack the one this
    scorer reads; the default sends such a token deep.
    """

    name = "base"

    def __init__(self, cold_score: float = COLD_SCORE) -> None:
        cold = float(cold_score)
        if not 0.0 <= cold <= 1.0:
            raise ConfigError(f"routing.cold_score={cold_score} is outside [0, 1]; use a score in [0, 1] "
                              "(1 sends a request's first routed token deep, 0 shallow)")
        self.cold_score = min(cold, MAX_SCORE)
        self._last: dict[int, dict[str, float]] = {}

    def observe(self, request_id: int, signals: dict[str, float]) -> None:
        """Record the signals of the token ``request_id`` just emitted; they score its next token.

        The dict is kept by reference and must not be changed afterwards.
        """
        self._last[request_id] = signals

    def score(self, request_id: int) -> float:
        """Score of the next token of ``request_id``, in [0, MAX_SCORE]; no state changes.

        A request with no recorded signals gets ``cold_score``.
        """
        sig = self._last.get(request_id)
        if sig is None:
            return self.cold_score
        return _clamp(self._score_signals(sig), self.cold_score)

    def score_many(self, request_ids: Iterable[int]) -> list[float]:
        """``[score(r) for r in request_ids]``, without the per-call overhead (a batch at once)."""
        last = self._last
        cold = self.cold_score
        f = self._score_signals
        out: list[float] = []
        append = out.append
        for rid in request_ids:
            sig = last.get(rid)
            if sig is None:
                append(cold)
                continue
            x = f(sig)
            append(cold if x != x else 0.0 if x < 0.0 else MAX_SCORE if x > MAX_SCORE else x)
        return out

    def forget(self, request_id: int) -> None:
        """Drop everything kept for ``request_id`` (it finished or was cancelled); unknown ids are ignored."""
        self._last.pop(request_id, None)

    def __len__(self) -> int:
        """Number of requests with recorded signals."""
        return len(self._last)

    def _score_signals(self, signals: dict[str, float]) -> float:
        """Raw score of one signal dict (clamped by the caller); NaN when a needed signal is missing."""
        raise NotImplementedError


class _OneSignal(Scorer):
    """Score = ``signals[key]`` or ``1 - signals[key]`` (``invert``)."""

    key = ""
    invert = False

    def _score_signals(self, signals: dict[str, float]) -> float:
        x = signals.get(self.key, math.nan)
        return 1.0 - x if self.invert else x

    def score_many(self, request_ids: Iterable[int]) -> list[float]:
        """Same scores as the base class, with the one-key lookup inlined (the router's hot path)."""
        last = self._last
        cold = self.cold_score
        key, inv = self.key, self.invert
        nan = math.nan
        out: list[float] = []
        append = out.append
        for rid in request_ids:
            sig = last.get(rid)
            x = nan if sig is None else sig.get(key, nan)
            if inv:
                x = 1.0 - x
            append(cold if x != x else 0.0 if x < 0.0 else MAX_SCORE if x > MAX_SCORE else x)
        return out


class LearnedScorer(_OneSignal):
    """The learned linear router's output (sigmoid over the final hidden state)."""

    name = "learned"
    key = "router"


class ConfidenceScorer(_OneSignal):
    """``1 - max softmax probability``: a confident prediction marks an easy context."""

    name = "confidence"
    key = "confidence"
    invert = True


class EntropyScorer(_OneSignal):
    """Normalised entropy of the next-token distribution."""

    name = "entropy"
    key = "entropy"


class AttentionScorer(_OneSignal):
    """``1 - largest per-page attention mass``: concentrated attention marks an easy token."""

    name = "attention"
    key = "attention_peak"
    invert = True


class RandomScorer(Scorer):
    """A uniform draw per emitted token, ignoring the signals (ablation baseline).

    Each request has its own ``random.Random`` seeded by ``(seed, request_id)``,
    advanced once per ``observe``, so a request's scores do not depend on which
    other requests share its steps; no global random state is touched.
    """

    name = "random"

    def __init__(self, seed: int = 0, cold_score: float = COLD_SCORE) -> None:
        super().__init__(cold_score)
        self.seed = int(seed)
        self._rngs: dict[int, random.Random] = {}

    def observe(self, request_id: int, signals: dict[str, float]) -> None:
        rng = self._rngs.get(request_id)
        if rng is None:
            rng = self._rngs[request_id] = random.Random(f"mor-random:{self.seed}:{request_id}")
        super().observe(request_id, {"random": rng.random()})

    def forget(self, request_id: int) -> None:
        super().forget(request_id)
        self._rngs.pop(request_id, None)

    def _score_signals(self, signals: dict[str, float]) -> float:
        return signals["random"]
