"""A synthetic attention model: the attention mass each KV page receives.

What a real model reports through ``StepResult.attention_mass`` (the torch
backend measures it), the simulator draws from a documented model of what
H2O / StreamingLLM observed:

* global layers: 45% of the mass goes to the sequence's *heavy hitters* (page 0,
  the attention sink, plus ``heavy_frac`` of its prompt pages chosen once per
  sequence), 35% to the last ``recent_pages`` pages, 20% to the rest with a
  fixed long-tail weight per page times log-normal noise each step;
* local (sliding-window) layers see only the last ``window`` tokens: their mass
  is spread over the pages in the window, the newest weighted most;
* a page's mass is the layer-weighted mix: ``n_global / L`` of the global
  distribution plus ``n_local / L`` of the local one, so it sums to 1 per query.

Deterministic: every draw comes from a generator seeded by (seed, sequence).
"""

from __future__ import annotations

import numpy as np

from wicore.memory.trace import page_masses


class SyntheticAttention:
    def __init__(self, num_layers: int, num_global: int, window: int, page_tokens: int, seed: int = 0,
                 heavy_frac: float = 0.1, recent_pages: int = 2) -> None:
        self.global_share = num_global / num_layers
        self.window_pages = -(-window // page_tokens) if window else 0
        self.page_tokens = page_tokens
        self.seed = seed
        self.heavy_frac = heavy_frac
        self.recent_pages = recent_pages
        self._seqs: dict[int, tuple[np.random.Generator, np.ndarray, np.ndarray]] = {}

    def _state(self, seq: int, n_pages: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
        st = self._seqs.get(seq)
        if st is None:
            rng = np.random.default_rng((self.seed, seq))
            k = max(0, int(round(self.heavy_frac * n_pages)))
            heavy = np.union1d([0], rng.choice(n_pages, size=min(k, n_pages), replace=False))
            tail = 1.0 / (1.0 + rng.permutation(4096)) ** 0.8
            st = self._seqs[seq] = (rng, heavy.astype(int), tail)
        return st

    def masses(self, seq: int, kv_tokens: int) -> np.ndarray:
        """Mass per page (sums to 1) for the newest query of ``seq`` with ``kv_tokens`` keys."""
        n = -(-kv_tokens // self.page_tokens)
        if n <= 0:
            return np.zeros(0)
        rng, heavy, tail = self._state(seq, n)
        if n > len(tail):
            tail = np.concatenate([tail, np.full(n - len(tail), tail.min())])
        out = self.global_share * page_masses(rng, n, heavy, self.recent_pages, tail)
        if self.global_share < 1.0:
            w = min(self.window_pages, n) if self.window_pages else n
            local = np.zeros(n)
            local[n - w:] = np.linspace(1.0, 2.0, w)
            out += (1.0 - self.global_share) * local / local.sum()
        return out

    def forget(self, seq: int) -> None:
        self._seqs.pop(seq, None)
