"""MoRRouter: one deep/shallow decision per decode token of a step.

``route(items)`` scores the next token of every decode item (``Scorer``) and
sends it deep when ``score >= threshold`` (``gpu_depth`` layers on the GPU),
shallow otherwise (``cpu_depth`` layers on ``shallow_device``, then early exit).
Prefill chunks get no decision: they always take the deep path.
``observe(result)`` feeds a step's ``StepResult.signals`` to the scorer;
``release(request_id)`` forgets a finished request.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from wicore.errors import ConfigError
from wicore.routing.scorers import Scorer
from wicore.types import BatchItem, Phase, RouteDecision, StepResult

DECODE = Phase.DECODE
SHALLOW_DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class RoutingConfig:
    """What a router needs (the ``routing`` config group, ``conf/routing/mor.yaml``).

    ``threshold``: a token goes deep iff its score >= threshold (0: all deep, 1: all shallow).
    ``cpu_depth``: layers the shallow path runs before its early exit.
    ``gpu_depth``: layers the deep path runs on the GPU (None: the model's ``num_layers``).
    ``shallow_device``: ``cpu`` (shallow layers on the host CPU) or ``gpu`` (early exit on the GPU).
    ``scorer``: the name of the scorer in the config's ``scorers`` table.
    """

    threshold: float = 0.5
    cpu_depth: int = 8
    gpu_depth: int | None = None
    shallow_device: str = "cpu"
    scorer: str = "learned"

    def validate(self, num_layers: int) -> RoutingConfig:
        """Check the fields against a model of ``num_layers`` layers; return a copy with
        ``gpu_depth`` resolved. Raises ``ConfigError`` naming the field to change."""
        try:
            threshold = float(self.threshold)
        except (TypeError, ValueError):
            raise ConfigError(f"routing.threshold={self.threshold!r} is not a number; use a value in [0, 1]"
                              ) from None
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"routing.threshold={self.threshold} is outside [0, 1]; use 0 (every token "
                              "deep) .. 1 (every token shallow)")
        cpu_depth = _as_int(self.cpu_depth, "routing.cpu_depth")
        gpu_depth = num_layers if self.gpu_depth is None else _as_int(self.gpu_depth, "routing.gpu_depth")
        if cpu_depth < 1:
            raise ConfigError(f"routing.cpu_depth={cpu_depth} must be >= 1 layer; raise it (the shallow path "
                              "runs at least the first layer)")
        if gpu_depth > num_layers:
            raise ConfigError(f"routing.gpu_depth={gpu_depth} exceeds model.num_layers={num_layers}; lower "
                              "routing.gpu_depth or set it to null (= all layers)")
        if cpu_depth > gpu_depth:
            raise ConfigError(f"routing.cpu_depth={cpu_depth} exceeds routing.gpu_depth={gpu_depth}; the "
                              "shallow path must not be deeper than the deep path: lower routing.cpu_depth")
        if self.shallow_device not in SHALLOW_DEVICES:
            raise ConfigError(f"routing.shallow_device='{self.shallow_device}' is unknown; use cpu or gpu")
        return replace(self, threshold=threshold, cpu_depth=cpu_depth, gpu_depth=gpu_depth)


def _as_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"{field}={value!r} is not a whole number of layers; use an integer")
    return int(value)


class MoRRouter:
    """Routes decode tokens deep or shallow by score; ``config`` must come from ``validate``."""

    def __init__(self, config: RoutingConfig, scorer: Scorer) -> None:
        if config.gpu_depth is None:
            raise ConfigError("routing.gpu_depth: unresolved; build the router from "
                              "RoutingConfig.validate(model.num_layers)")
        self.config = config
        self.scorer = scorer
        self.threshold = float(config.threshold)
        self.cpu_depth = int(config.cpu_depth)
        self.gpu_depth = int(config.gpu_depth)
        self.shallow_device = config.shallow_device
        self._decisions: dict[int, tuple[RouteDecision, RouteDecision]] = {}  # request -> (deep, shallow)

    def route(self, items: list[BatchItem]) -> list[RouteDecision]:
        """One decision per decode item, in item order: ``deep`` (depth ``gpu_depth``) when the
        request's score >= threshold, else ``shallow`` (depth ``cpu_depth``). Prefill items get none.

        The two possible decisions of a request are made once and reused every step (no
        allocation per token): treat them as read-only."""
        ids: list[int] = []
        ntok: list[int] = []
        for it in items:
            if it.phase is DECODE:
                ids.append(it.request_id)
                ntok.append(it.num_tokens)
        if not ids:
            return []
        scores = self.scorer.score_many(ids)
        thr, gd, cd = self.threshold, self.gpu_depth, self.cpu_depth
        cache = self._decisions
        out: list[RouteDecision] = []
        append = out.append
        for rid, n, s in zip(ids, ntok, scores):
            if n != 1:  # not a plain decode: a fresh decision
                append(RouteDecision(rid, "deep", gd, n) if s >= thr else RouteDecision(rid, "shallow", cd, n))
                continue
            pair = cache.get(rid)
            if pair is None:
                pair = cache[rid] = (RouteDecision(rid, "deep", gd, 1), RouteDecision(rid, "shallow", cd, 1))
            append(pair[0] if s >= thr else pair[1])
        return out

    def observe(self, result: StepResult) -> None:
        """Record the signals of the tokens a step emitted; they route those requests' next tokens."""
        observe = self.scorer.observe
        for rid, sig in result.signals.items():
            observe(rid, sig)

    def release(self, request_id: int) -> None:
        """A request is done: forget its state."""
        self.scorer.forget(request_id)
        self._decisions.pop(request_id, None)

    def drop_ops_layer(self) -> int:
        """Weight fetches of layers >= this are unneeded in a step with no deep token (0: all)."""
        return self.cpu_depth if self.shallow_device == "gpu" else 0
