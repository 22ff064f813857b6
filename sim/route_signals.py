"""Synthetic routing signals: what a real model reports in ``StepResult.signals``.

For every token a request emits, the simulator returns a signal dict with the
keys the real runtime measures (``confidence``, ``entropy``, ``router``,
``attention_peak``, floats in [0, 1]; see ``wicore.routing``).

Without a table, a documented Beta model that keeps the signals correlated
through a latent per-token difficulty ``d``::

    d              ~ Beta(difficulty_a, difficulty_b)             (default Beta(1, 3): most tokens easy)
    d'             = clip(d, 0.001, 0.999)
    confidence     ~ Beta(k (1 - d'), k d')                       mean 1 - d
    entropy        ~ Beta(k d', k (1 - d'))                       mean d
    router         ~ Beta(k d', k (1 - d'))                       mean d (a router trained to predict d)
    attention_peak ~ Beta(k m, k (1 - m)),  m = 0.2 + 0.6 (1 - d')  (weaker coupling)

with ``k = concentration`` (higher: signals closer to their mean). With a
table (CSV or parquet with columns ``confidence, entropy, router,
attention_peak``, e.g. measured on a trained model), whole rows are sampled
uniformly, which keeps the correlation between the signals; a NaN cell is a
signal that was not measured and is left out of the dict.

Reproducible and independent of batching: the signals of the token a request
emits at KV length ``n`` come from block ``n // 64`` of that request, drawn
by a generator seeded with ``(seed, request_id, block)``; blocks are cached
(and dropped in bulk when the cache is full, to be redrawn identically).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wicore.errors import ConfigError
from wicore.paths import resolve_config_path
from wicore.types import BatchItem

SIGNAL_NAMES = ("confidence", "entropy", "router", "attention_peak")
BLOCK = 64  # tokens per drawn block
BETA_DEFAULTS = {"difficulty_a": 1.0, "difficulty_b": 3.0, "concentration": 10.0}  # the Beta model's parameters
_TAG = 0x4D6F52  # "MoR": keeps these streams apart from other generators seeded by (seed, request)


def load_table(path: str | Path, field: str = "routing.signals_table") -> np.ndarray:
    """Rows ``[n, 4]`` (``SIGNAL_NAMES`` order) of a CSV or parquet signals table; NaN = not measured."""
    p = resolve_config_path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: no file at {p}; give a CSV or parquet table of signals or null")
    import pandas as pd

    try:
        df = pd.read_parquet(p) if p.suffix in (".parquet", ".pq") else pd.read_csv(p)
    except Exception as exc:  # noqa: BLE001 - any reader error is a bad table
        raise ConfigError(f"{field}: cannot read {p}: {exc}") from None
    missing = [c for c in SIGNAL_NAMES if c not in df.columns]
    if missing:
        raise ConfigError(f"{field}: {p} lacks column(s) {missing}; it needs {list(SIGNAL_NAMES)}")
    if not len(df):
        raise ConfigError(f"{field}: {p} has no rows")
    try:
        rows = df[list(SIGNAL_NAMES)].to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {p} has non-numeric signal values") from None
    vals = rows[~np.isnan(rows)]
    if len(vals) and (vals.min() < 0.0 or vals.max() > 1.0):
        raise ConfigError(f"{field}: {p} has signal values outside [0, 1]; signals are probabilities")
    return rows


class SyntheticSignals:
    def __init__(self, seed: int = 0, table: str | Path | None = None,
                 difficulty_a: float = BETA_DEFAULTS["difficulty_a"],
                 difficulty_b: float = BETA_DEFAULTS["difficulty_b"],
                 concentration: float = BETA_DEFAULTS["concentration"], cache_requests: int = 4096) -> None:
        for name, v in (("difficulty_a", difficulty_a), ("difficulty_b", difficulty_b),
                        ("concentration", concentration)):
            if not float(v) > 0:
                raise ConfigError(f"routing.signals.{name}={v} must be > 0 (a Beta shape parameter)")
        self.seed = int(seed)
        if self.seed < 0:
            raise ConfigError(f"seed={seed} must be >= 0")
        self.a, self.b, self.k = float(difficulty_a), float(difficulty_b), float(concentration)
        self.rows = load_table(table) if table is not None else None
        self.cache_requests = cache_requests
        self._blocks: dict[int, tuple[int, list[dict[str, float]]]] = {}

    def _draw_block(self, request_id: int, block: int) -> list[dict[str, float]]:
        rng = np.random.default_rng([self.seed, _TAG, request_id, block])
        if self.rows is not None:
            picked = self.rows[rng.integers(0, len(self.rows), BLOCK)]
            return [{k: v for k, v in zip(SIGNAL_NAMES, row) if v == v} for row in picked.tolist()]
        k = self.k
        d = np.clip(rng.beta(self.a, self.b, BLOCK), 1e-3, 1.0 - 1e-3)
        conf = rng.beta(k * (1.0 - d), k * d)
        ent = rng.beta(k * d, k * (1.0 - d))
        router = rng.beta(k * d, k * (1.0 - d))
        m = 0.2 + 0.6 * (1.0 - d)
        att = rng.beta(k * m, k * (1.0 - m))
        cols = np.stack([conf, ent, router, att], axis=1).tolist()
        return [dict(zip(SIGNAL_NAMES, row)) for row in cols]

    def draw(self, request_id: int, kv_len: int) -> dict[str, float]:
        """Signals of the token ``request_id`` emits when its KV holds ``kv_len`` tokens."""
        block, pos = divmod(kv_len, BLOCK)
        hit = self._blocks.get(request_id)
        if hit is None or hit[0] != block:
            if len(self._blocks) >= self.cache_requests:
                self._blocks.clear()
            hit = self._blocks[request_id] = (block, self._draw_block(request_id, block))
        return hit[1][pos]

    def fill(self, items: Iterable[BatchItem], out: dict[int, dict[str, float]]) -> None:
        """``out[request_id]`` = signals of every item that emits a token."""
        draw = self.draw
        for it in items:
            if it.emits_token:
                out[it.request_id] = draw(it.request_id, it.context_len + it.num_tokens)

    def forget(self, request_id: int) -> None:
        self._blocks.pop(request_id, None)
