"""Replacement policies: the shared contract, reference implementations, oracle bounds, A2CR."""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wicore.errors import ConfigError
from wicore.memory.policies import (
    POLICY_CLASSES,
    A2CRPolicy,
    ARCPolicy,
    BeladyPolicy,
    LFUPolicy,
    LRFUPolicy,
    LRUPolicy,
    ReplacementPolicy,
)
from wicore.memory.trace import Access, kv_trace, recency_trace, replay, weight_trace
from wicore.model.spec import ModelSpec

NAMES = sorted(POLICY_CLASSES)


def make(name: str, capacity: int, keys: Sequence[Hashable] = ()) -> ReplacementPolicy:
    if name == "belady":
        return BeladyPolicy(capacity=capacity, future=list(keys))
    return POLICY_CLASSES[name](capacity=capacity)


def random_trace(seed: int, n: int = 400, alphabet: int = 30, max_size: int = 1) -> list[Access]:
    rng = random.Random(seed)
    hot = list(range(alphabet // 4))
    out = []
    for i in range(n):
        key = rng.choice(hot) if rng.random() < 0.5 else rng.randrange(alphabet)
        size = 1 + key % max_size  # a key always has the same size
        out.append(Access(i * 0.01, key, size, rng.random() if rng.random() < 0.3 else 0.0))
    return out


def run(policy: ReplacementPolicy, trace: Sequence[Access]) -> list[tuple[bool, bool, list[Hashable]]]:
    outs = []
    for a in trace:
        o = policy.access(a.key, a.time, a.size)
        outs.append((o.hit, o.admitted, list(o.evicted)))
        if a.attention:
            policy.feedback(a.key, a.attention, a.time)
    return outs


@pytest.mark.parametrize("name", NAMES)
class TestContract:
    @pytest.mark.parametrize(("seed", "max_size", "capacity"), [(0, 1, 7), (1, 4, 12), (2, 3, 5)])
    def test_bookkeeping(self, name: str, seed: int, max_size: int, capacity: int) -> None:
        trace = random_trace(seed, max_size=max_size)
        policy = make(name, capacity, [a.key for a in trace])
        sizes = {a.key: a.size for a in trace}
        misses = 0
        for a in trace:
            before = set(policy.resident())
            out = policy.access(a.key, a.time, a.size)
            after = set(policy.resident())
            assert out.hit == (a.key in before)
            assert set(out.evicted) <= before and len(set(out.evicted)) == len(out.evicted)
            assert a.key not in out.evicted
            assert (a.key in after) == out.admitted
            assert after == (before - set(out.evicted)) | ({a.key} if out.admitted else set())
            assert policy.used == sum(sizes[k] for k in after) <= capacity
            assert len(policy) == len(after)
            misses += not out.hit
            if a.attention:
                policy.feedback(a.key, a.attention, a.time)
        assert 0 < misses < len(trace)

    def test_deterministic(self, name: str) -> None:
        trace = random_trace(3, max_size=3)
        keys = [a.key for a in trace]
        p1, p2 = make(name, 9, keys), make(name, 9, keys)
        assert run(p1, trace) == run(p2, trace)
        assert p1.resident() == p2.resident()

    def test_remove(self, name: str) -> None:
        trace = [Access(float(i), k) for i, k in enumerate("abcdab")]
        policy = make(name, 3, [a.key for a in trace])
        for a in trace[:3]:
            policy.access(a.key, a.time)
        policy.remove("b")
        assert "b" not in policy and policy.used == 2 and len(policy) == 2
        policy.remove("zzz")  # absent: no-op
        assert policy.used == 2
        out = policy.access("d", 3.0)  # fits in the freed space: no eviction
        assert out.admitted and out.evicted == [] and policy.used == 3
        assert policy.access("a", 4.0).hit
        assert not policy.access("b", 5.0).hit

    def test_too_large_is_not_admitted(self, name: str) -> None:
        keys = ["a", "big", "a"]
        policy = make(name, 4, keys)
        policy.access("a", 0.0, 2)
        out = policy.access("big", 1.0, 5)
        assert (out.hit, out.admitted, out.evicted) == (False, False, [])
        assert "big" not in policy and policy.used == 2
        assert policy.access("a", 2.0, 2).hit

    def test_bad_capacity(self, name: str) -> None:
        for bad in (0, -3, 2.5):
            with pytest.raises(ConfigError, match="capacity"):
                make(name, bad)  # type: ignore[arg-type]


def test_keyword_construction_for_hydra() -> None:
    hydra_utils = pytest.importorskip("hydra.utils")
    policy = hydra_utils.instantiate({"_target_": "wicore.memory.policies.lru.LRUPolicy", "capacity": 10})
    assert isinstance(policy, LRUPolicy) and policy.capacity == 10
    a2cr = hydra_utils.instantiate({"_target_": "wicore.memory.policies.a2cr.A2CRPolicy", "capacity": 5,
                                    "attention_weight": 0.7})
    assert isinstance(a2cr, A2CRPolicy) and a2cr.wa == 0.7
    assert {cls.name for cls in POLICY_CLASSES.values()} == {"lru", "lfu", "arc", "lrfu", "a2cr", "belady"}


class ReferenceLRU:
    def __init__(self, capacity: int) -> None:
        self.capacity, self.items = capacity, OrderedDict[Hashable, int]()

    def access(self, key: Hashable, size: int) -> bool:
        if key in self.items:
            self.items.move_to_end(key)
            return True
        if size <= self.capacity:
            while sum(self.items.values()) + size > self.capacity:
                self.items.popitem(last=False)
            self.items[key] = size
        return False


@pytest.mark.parametrize(("seed", "max_size"), [(s, m) for s in range(6) for m in (1, 3)])
def test_lru_matches_reference(seed: int, max_size: int) -> None:
    trace = random_trace(seed, n=600, max_size=max_size)
    policy, ref = LRUPolicy(capacity=8), ReferenceLRU(8)
    for a in trace:
        assert policy.access(a.key, a.time, a.size).hit == ref.access(a.key, a.size)
        assert policy.resident() and set(policy.resident()) == set(ref.items)


@pytest.mark.parametrize("seed", range(6))
def test_lrfu_extremes_match_lfu_and_lru(seed: int) -> None:
    trace = random_trace(seed, n=600)
    for lam, other in ((0.0, LFUPolicy(capacity=6)), (1.0, LRUPolicy(capacity=6))):
        lrfu_hits = [o[0] for o in run(LRFUPolicy(capacity=6, lam=lam), trace)]
        assert lrfu_hits == [o[0] for o in run(other, trace)], lam
    middle = [o[0] for o in run(LRFUPolicy(capacity=6, lam=0.3), trace)]
    assert sum(middle) > 0


def test_lfu_keeps_frequent_keys_and_breaks_ties_by_recency() -> None:
    policy = LFUPolicy(capacity=3)
    for t, k in enumerate("aabcd"):  # a:2, b:1, c:1 -> d evicts b (least recent of the count-1 keys)
        policy.access(k, float(t))
    assert set(policy.resident()) == {"a", "c", "d"}


def test_arc_is_scan_resistant_and_adapts() -> None:
    arc, lru = ARCPolicy(capacity=4), LRUPolicy(capacity=4)
    seq = ["a", "b", "a", "b"] + [f"s{i}" for i in range(10)] + ["a", "b"]
    arc_hits = [arc.access(k, float(t)).hit for t, k in enumerate(seq)]
    lru_hits = [lru.access(k, float(t)).hit for t, k in enumerate(seq)]
    assert arc_hits[-2:] == [True, True] and lru_hits[-2:] == [False, False]
    assert arc.lists()["b1"] == ["s6", "s7"]  # |T1| + |B1| <= c keeps the two newest ghosts
    p_before = arc.p
    out = arc.access("s7", 21.0)  # a ghost hit in B1: T1 was too small
    assert not out.hit and arc.p > p_before and "s7" in arc.lists()["t2"]


def _optimal_hits(keys: Sequence[Hashable], capacity: int) -> int:
    """Brute force: the most hits any demand policy (bypass allowed) can get."""
    best: dict[frozenset[Hashable], int] = {frozenset(): 0}
    for key in keys:
        nxt: dict[frozenset[Hashable], int] = {}
        for cache, hits in best.items():
            if key in cache:
                options = [(cache, hits + 1)]
            else:
                options = [(cache, hits)]
                if len(cache) < capacity:
                    options.append((cache | {key}, hits))
                else:
                    options += [((cache - {v}) | {key}, hits) for v in cache]
            for c, h in options:
                nxt[c] = max(nxt.get(c, -1), h)
        best = nxt
    return max(best.values())


@pytest.mark.parametrize("seed", range(25))
def test_belady_is_optimal_on_small_traces(seed: int) -> None:
    rng = random.Random(seed)
    keys = [rng.randrange(5) for _ in range(14)]
    cap = 1 + seed % 3
    hits = sum(o[0] for o in run(BeladyPolicy(cap, keys), [Access(float(i), k) for i, k in enumerate(keys)]))
    assert hits == _optimal_hits(keys, cap)


def test_belady_rejects_a_different_trace() -> None:
    policy = BeladyPolicy(capacity=2, future=["a", "b"])
    policy.access("a", 0.0)
    with pytest.raises(ValueError, match="future sequence says 'b'"):
        policy.access("c", 1.0)
    policy.access("b", 1.0)
    with pytest.raises(ValueError, match="past the end"):
        policy.access("a", 2.0)


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(0, 9), min_size=1, max_size=200), capacity=st.integers(1, 8))
def test_belady_bounds_every_policy(keys: list[int], capacity: int) -> None:
    trace = [Access(i * 0.05, k, 1, 0.1 * (k % 3)) for i, k in enumerate(keys)]
    best = sum(o[0] for o in run(BeladyPolicy(capacity, keys), trace))
    for name in NAMES:
        assert sum(o[0] for o in run(make(name, capacity, keys), trace)) <= best, name


def test_a2cr_keeps_blocks_with_attention() -> None:
    a2cr, lru = A2CRPolicy(capacity=4), LRUPolicy(capacity=4)
    for t, k in enumerate("wxyz"):
        for p in (a2cr, lru):
            p.access(k, float(t))
    for k in "wx":  # the two oldest blocks get all the attention
        a2cr.feedback(k, 0.5, 3.5)
    assert a2cr.score("w", 3.6) > a2cr.score("y", 3.6)
    assert a2cr.access("u", 4.0).evicted == ["y"]
    assert a2cr.access("v", 5.0).evicted == ["z"]
    assert lru.access("u", 4.0).evicted == ["w"]  # recency alone would drop them first
    assert {"w", "x"} <= set(a2cr.resident())


def test_a2cr_admission_bypasses_a_loop() -> None:
    loop = [Access(i * 0.01, i % 10) for i in range(1000)]
    assert replay(LRUPolicy(capacity=5), loop).hits == 0
    adaptive = A2CRPolicy(capacity=5)
    assert replay(adaptive, loop).hit_rate > 0.3 and adaptive.bypassed > 0
    plain = A2CRPolicy(capacity=5, adaptive_threshold=False)
    assert replay(plain, loop).hit_rate < replay(A2CRPolicy(capacity=5), loop).hit_rate
    assert plain.bypassed == 0


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"attention_weight": -1}, "memory.a2cr.attention_weight: must be >= 0, got -1"),
    ({"frequency_weight": -0.5}, "memory.a2cr.frequency_weight"),
    ({"recency_weight": float("nan")}, "memory.a2cr.recency_weight"),
    ({"time_decay_factor": -0.1}, "memory.a2cr.time_decay_factor"),
    ({"attention_weight": 0, "frequency_weight": 0, "recency_weight": 0}, "all 0"),
    ({"threshold_quantile": 1.5}, "memory.a2cr.threshold_quantile"),
    ({"threshold_lr": 0.0}, "memory.a2cr.threshold_lr"),
    ({"adaptive_threshold": "yes"}, "memory.a2cr.adaptive_threshold"),
])
def test_a2cr_bad_params(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        A2CRPolicy(capacity=4, **kwargs)  # type: ignore[arg-type]


def test_other_bad_params() -> None:
    with pytest.raises(ConfigError, match=r"memory\.lrfu\.lam"):
        LRFUPolicy(capacity=4, lam=1.5)
    with pytest.raises(ValueError, match="attention_mass"):
        A2CRPolicy(capacity=4).feedback("a", -1.0, 0.0)
    with pytest.raises(ValueError, match="size"):
        LRUPolicy(capacity=4).access("a", 0.0, 0)


# ----- traces ------------------------------------------------------------------------------
def _spec() -> ModelSpec:
    return ModelSpec(name="t", family="gemma3", num_layers=6, hidden_size=64, intermediate_size=128,
                     num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=1000, max_context=256)


def test_weight_trace_structure() -> None:
    spec = _spec()
    trace = weight_trace(spec, steps=40, seed=1)
    assert trace == weight_trace(spec, steps=40, seed=1)
    per_pass = 2 + 2 * spec.num_layers
    full = weight_trace(spec, steps=3, partial_prob=0.0)
    order = [(a.key.layer, a.key.group) for a in full[:per_pass]]  # type: ignore[attr-defined]
    assert order == [(-1, "embed")] + [(i, g) for i in range(spec.num_layers) for g in ("attn", "mlp")] + [
        (-1, "embed")]  # tied embeddings: the LM head is the embedding block
    assert len(full) == 3 * per_pass and full[per_pass].time == pytest.approx(0.05)
    sizes = {a.key: a.size for a in trace}
    assert {s for k, s in sizes.items() if k.group == "mlp"} == {int(spec.mlp_params_per_layer * 2)}  # type: ignore[attr-defined]
    assert all(t1.time <= t2.time for t1, t2 in itertools.pairwise(trace))
    assert 38 * per_pass > len(trace) > len(weight_trace(spec, steps=40, seed=1, partial_prob=1.0))


def test_kv_trace_model() -> None:
    trace = kv_trace(num_seqs=6, pages_per_seq=16, steps=120, max_active=3, seed=2)
    assert trace == kv_trace(num_seqs=6, pages_per_seq=16, steps=120, max_active=3, seed=2)
    assert all(0 < a.attention <= 1 for a in trace)
    steps = sorted({a.time for a in trace})
    sink_reads = {(a.time, a.key.seq) for a in trace if a.key.index == 0}  # type: ignore[attr-defined]
    seq_steps = {(a.time, a.key.seq) for a in trace}  # type: ignore[attr-defined]
    assert sink_reads <= seq_steps and len(sink_reads) >= 0.95 * len(seq_steps)  # the sink: nearly always
    assert len({a.key.seq for a in trace}) == 6 and len(steps) > 60  # type: ignore[attr-defined]
    reads = len(trace) / len(seq_steps)
    assert reads < 16  # sparse: not every page every step


def test_recency_trace_and_replay_stats() -> None:
    trace = recency_trace(200, 3000, locality=0.9, seed=3)
    assert len(trace) == 3000 and trace == recency_trace(200, 3000, locality=0.9, seed=3)
    stats = replay(LRUPolicy(capacity=40), trace)
    assert stats.hits + stats.misses == stats.accesses == 3000
    assert stats.bytes_hit == stats.hits and stats.bytes_missed == stats.misses
    assert stats.hit_rate > 0.5  # strong locality: a 20% cache catches most references
    uniform = replay(LRUPolicy(capacity=40), recency_trace(200, 3000, locality=0.0, seed=3))
    assert uniform.hit_rate < 0.35
