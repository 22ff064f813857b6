"""Access traces for one cache tier, and replaying them through a policy.

An ``Access`` is one reference to a block at a time, with its size and, for KV
pages, the attention mass it received in that step. ``replay`` feeds a trace to
a ``ReplacementPolicy`` (and the mass to ``feedback``) and counts hits and bytes.

The generators are pure functions of their arguments (a seeded
``numpy.random.Generator``); their models are described in their docstrings.
Keys are ``wicore.types.BlockRef`` values.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from wicore.errors import ConfigError
from wicore.memory.policies.base import ReplacementPolicy
from wicore.model.spec import ModelSpec
from wicore.types import BlockRef


@dataclass(frozen=True)
class Access:
    time: float
    key: Hashable
    size: int = 1
    attention: float = 0.0


@dataclass(frozen=True)
class ReplayStats:
    """``bytes_missed`` is the size of every missed access: what had to come from
    the lower tier (moved into this tier, or streamed past it when the policy
    bypassed it); ``bytes_admitted`` only counts what was stored."""

    accesses: int
    hits: int
    misses: int
    hit_rate: float
    bytes_hit: int
    bytes_missed: int
    bytes_admitted: int
    evictions: int


def replay(policy: ReplacementPolicy, accesses: Iterable[Access]) -> ReplayStats:
    hits = misses = bytes_hit = bytes_missed = bytes_admitted = evictions = 0
    for a in accesses:
        out = policy.access(a.key, a.time, a.size)
        if out.hit:
            hits += 1
            bytes_hit += a.size
        else:
            misses += 1
            bytes_missed += a.size
            bytes_admitted += a.size if out.admitted else 0
        evictions += len(out.evicted)
        if a.attention > 0:
            policy.feedback(a.key, a.attention, a.time)
    total = hits + misses
    return ReplayStats(total, hits, misses, hits / total if total else 0.0, bytes_hit, bytes_missed,
                       bytes_admitted, evictions)


def footprint(accesses: Sequence[Access]) -> int:
    """Sum of the sizes of the distinct keys (the last size seen of each)."""
    return sum({a.key: a.size for a in accesses}.values())


def weight_trace(spec: ModelSpec, steps: int, groups: Sequence[str] = ("attn", "mlp"), seed: int = 0,
                 step_time_s: float = 0.05, partial_prob: float = 0.3, min_exit_frac: float = 0.25
                 ) -> list[Access]:
    """Weight blocks read by ``steps`` decode passes of an offloaded model.

    A full pass reads, in order: the embedding table (``BlockRef("weight", -1,
    "embed")``), then for each layer ``i`` its ``groups`` blocks
    (``BlockRef("weight", i, g)``, ``attn`` and/or ``mlp``), then the LM head (the
    embedding block again when the embeddings are tied, else ``BlockRef("weight",
    num_layers, "lm_head")``). Sizes are bytes: ``attn_params_per_layer`` /
    ``mlp_params_per_layer`` / ``embedding_params`` / ``lm_head_params`` times
    ``bytes_per_param``. With probability ``partial_prob`` a pass is a speculative
    early-exit draft (self-speculative decoding): it stops after a depth drawn
    uniformly from ``[min_exit_frac * num_layers, num_layers)`` and goes to the LM
    head. So shallow layers are read more often than deep ones and the trace is
    not a pure cycle. A full pass lasts ``step_time_s`` seconds, a partial one in
    proportion to its depth; accesses are spread evenly over their pass.
    """
    bad = sorted(set(groups) - {"attn", "mlp"})
    if bad or not groups:
        raise ConfigError(f"trace.weight.groups: unknown group(s) {bad or list(groups)}; use 'attn' and/or 'mlp'")
    if not 0.0 <= partial_prob <= 1.0:
        raise ConfigError(f"trace.weight.partial_prob: must be in [0, 1], got {partial_prob}")
    bpp = spec.bytes_per_param
    group_bytes = {"attn": int(spec.attn_params_per_layer * bpp), "mlp": int(spec.mlp_params_per_layer * bpp)}
    embed = BlockRef("weight", -1, "embed")
    head = embed if spec.tie_embeddings else BlockRef("weight", spec.num_layers, "lm_head")
    head_bytes = int((spec.embedding_params if spec.tie_embeddings else spec.lm_head_params) * bpp)
    rng = np.random.default_rng(seed)
    lo = max(1, int(min_exit_frac * spec.num_layers))
    out: list[Access] = []
    t = 0.0
    for _ in range(steps):
        depth = spec.num_layers
        if rng.random() < partial_prob and lo < spec.num_layers:
            depth = int(rng.integers(lo, spec.num_layers))
        blocks: list[tuple[BlockRef, int]] = [(embed, int(spec.embedding_params * bpp))]
        blocks += [(BlockRef("weight", i, g), group_bytes[g]) for i in range(depth) for g in groups]
        blocks.append((head, head_bytes))
        duration = step_time_s * depth / spec.num_layers
        out += [Access(t + duration * j / len(blocks), key, size) for j, (key, size) in enumerate(blocks)]
        t += duration
    return out


@dataclass
class _Seq:
    pages: int
    tokens: int
    heavy: np.ndarray
    tail: np.ndarray


def page_masses(rng: np.random.Generator, n: int, heavy: np.ndarray, recent: int,
                 tail_w: np.ndarray) -> np.ndarray:
    """Attention mass of ``n`` pages in one step: 45% to the heavy hitters, 35% to
    the last ``recent`` pages, 20% spread over the rest by fixed long-tail weights
    with per-step log-normal noise (sums to 1)."""
    mass = np.zeros(n)
    rec = np.arange(max(0, n - recent), n)
    hh = heavy[heavy < n]
    rest = np.setdiff1d(np.arange(n), np.union1d(hh, rec), assume_unique=False)
    if len(rest):
        w = tail_w[rest] * rng.lognormal(0.0, 1.0, len(rest))
        mass[rest] += 0.20 * w / w.sum()
    mass[hh] += 0.45 * rng.dirichlet(np.full(len(hh), 2.0))
    mass[rec] += 0.35 * rng.dirichlet(np.full(len(rec), 2.0))
    return mass / mass.sum()


def kv_trace(num_seqs: int, pages_per_seq: int, steps: int, heavy_hitter_frac: float = 0.1,
             recent_window_pages: int = 4, seed: int = 0, max_active: int = 8, tokens_per_page: int = 4,
             step_time_s: float = 0.03, page_bytes: int = 1, skip_frac: float = 0.25) -> list[Access]:
    """KV pages read by decode steps of a batch of sequences (H2O-style attention).

    Up to ``max_active`` of ``num_seqs`` sequences run at once; a finished one is
    replaced by the next, so the working set moves. A sequence starts with a
    prompt of ``pages_per_seq // 4 .. pages_per_seq // 2`` pages, gains a page
    every ``tokens_per_page`` decode steps and finishes at ``pages_per_seq`` pages.
    Its heavy hitters are page 0 (the attention sink) plus ``heavy_hitter_frac``
    of its prompt pages, chosen at start. In each step (``step_time_s`` seconds)
    the page masses follow ``page_masses``: heavy hitters share 45%, the last
    ``recent_window_pages`` pages 35%, the long tail 20% (a Zipf-like fixed weight
    per page times log-normal noise). Attention is sparse: a page whose mass is
    below ``skip_frac / n`` (n: the sequence's pages) is not read that step, so
    heavy hitters and recent pages are read nearly always and tail pages now and
    then. Keys are ``BlockRef("kv", -1, seq=s, index=p)`` (layer -1: one page
    holds the K/V of every layer), sizes ``page_bytes``; the mass is attached.
    The trace stops after ``steps`` steps or when every sequence finished.
    """
    if not 0.0 <= heavy_hitter_frac <= 1.0:
        raise ConfigError(f"trace.kv.heavy_hitter_frac: must be in [0, 1], got {heavy_hitter_frac}")
    if pages_per_seq < 4 or recent_window_pages < 1:
        raise ConfigError(f"trace.kv.pages_per_seq: must be >= 4 (and recent_window_pages >= 1), got {pages_per_seq}")
    rng = np.random.default_rng(seed)
    tail_w = 1.0 / (1.0 + rng.permutation(pages_per_seq)) ** 0.8  # Zipf-like long tail, fixed per position
    active: dict[int, _Seq] = {}
    started = 0
    out: list[Access] = []
    for step in range(steps):
        while len(active) < max_active and started < num_seqs:
            prompt = int(rng.integers(pages_per_seq // 4, pages_per_seq // 2 + 1))
            k = max(1, round(heavy_hitter_frac * prompt))
            heavy = np.union1d([0], rng.choice(prompt, size=k, replace=False))
            active[started] = _Seq(prompt, 0, heavy, rng.permutation(tail_w))
            started += 1
        if not active:
            break
        t = step * step_time_s
        for s in sorted(active):
            seq = active[s]
            n = seq.pages
            mass = page_masses(rng, n, seq.heavy, recent_window_pages, seq.tail)
            for p in np.flatnonzero(mass >= skip_frac / n):
                out.append(Access(t, BlockRef("kv", -1, seq=s, index=int(p)), page_bytes, float(mass[p])))
            seq.tokens += 1
            if seq.tokens % tokens_per_page == 0:
                seq.pages += 1
                if seq.pages > pages_per_seq:
                    del active[s]
    return out


def recency_trace(num_keys: int, length: int, locality: float = 0.9, seed: int = 0,
                  mean_depth: float | None = None, step_time_s: float = 0.001, block_bytes: int = 1
                  ) -> list[Access]:
    """Keys ``BlockRef("kv", -1, seq=0, index=k)`` of ``block_bytes`` with LRU-stack locality.

    The keys sit in an LRU stack (initially a random order). Each access, with
    probability ``locality``, re-references the key at stack distance ``d`` drawn
    from a geometric law with mean ``mean_depth`` (default ``num_keys / 20``);
    otherwise a uniformly random key. The key moves to the top of the stack.
    Accesses are ``step_time_s`` apart; there is no attention signal.
    """
    if not 0.0 <= locality <= 1.0:
        raise ConfigError(f"trace.recency.locality: must be in [0, 1], got {locality}")
    rng = np.random.default_rng(seed)
    stack = [int(k) for k in rng.permutation(num_keys)]
    depth = mean_depth if mean_depth is not None else max(2.0, num_keys / 20)
    local = rng.random(length) < locality
    dists = rng.geometric(1.0 / depth, length) - 1
    uniform = rng.integers(0, num_keys, length)
    out: list[Access] = []
    for i in range(length):
        if local[i]:
            key = stack.pop(min(int(dists[i]), num_keys - 1))
        else:
            key = int(uniform[i])
            stack.remove(key)
        stack.insert(0, key)
        out.append(Access(i * step_time_s, BlockRef("kv", -1, seq=0, index=key), block_bytes))
    return out
