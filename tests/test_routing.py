"""MoR token routing: scorer contract, router decisions, config checks, simulator cost and engine hook."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments.build import build_sim
from sim.route_signals import SIGNAL_NAMES, SyntheticSignals
from sim.routing_cost import RoutingCost
from tests.conftest import CONF, ROOT, make_cfg
from wicore.engine import _drop_weight_fetches
from wicore.errors import ConfigError
from wicore.hal import hardware_from_config
from wicore.metrics import STEP_COLUMNS
from wicore.model.spec import ModelSpec
from wicore.routing import (
    COLD_SCORE,
    MAX_SCORE,
    AttentionScorer,
    ConfidenceScorer,
    EntropyScorer,
    LearnedScorer,
    MoRRouter,
    RandomScorer,
    RoutingConfig,
    Scorer,
)
from wicore.types import BatchItem, BlockRef, MemoryOp, Phase, RouteDecision, StepPlan, StepResult

SCORERS = {"learned": LearnedScorer, "confidence": ConfidenceScorer, "entropy": EntropyScorer,
           "attention": AttentionScorer, "random": lambda **kw: RandomScorer(seed=3, **kw)}
SIM = ["report.enabled=false", "progress=false"]
SMALL = ["workload.num_requests=16", "workload.concurrency=8", *SIM]


def _signals(rng: np.random.Generator) -> dict[str, float]:
    return {k: float(rng.random()) for k in SIGNAL_NAMES}


def _decodes(n: int, context: int = 100) -> list[BatchItem]:
    return [BatchItem(i, Phase.DECODE, 1, context, True) for i in range(n)]


@pytest.mark.parametrize("name", sorted(SCORERS))
class TestScorerContract:
    def test_scores_in_unit_interval_and_score_many_matches(self, name):
        s: Scorer = SCORERS[name]()
        rng = np.random.default_rng(0)
        edge = [{k: 0.0 for k in SIGNAL_NAMES}, {k: 1.0 for k in SIGNAL_NAMES}, {}]
        for rid in range(40):
            s.observe(rid, edge[rid] if rid < 3 else _signals(rng))
        ids = list(range(45))  # 40..44 never observed
        many = s.score_many(ids)
        assert many == [s.score(r) for r in ids]
        assert all(0.0 <= x <= MAX_SCORE < 1.0 for x in many)
        assert s.score(44) == COLD_SCORE

    def test_reproducible_and_independent_of_interleaving(self, name):
        rng = np.random.default_rng(1)
        sigs = [[_signals(rng) for _ in range(20)] for _ in range(3)]
        a, b = SCORERS[name](), SCORERS[name]()
        seq_a, seq_b = [], []
        for t in range(20):  # a: requests interleaved; b: request 0 alone, then the others
            for rid in range(3):
                a.observe(rid, sigs[rid][t])
                seq_a.append((rid, a.score(rid)))
        for rid in range(3):
            for t in range(20):
                b.observe(rid, sigs[rid][t])
                seq_b.append((rid, b.score(rid)))
        assert sorted(seq_a) == sorted(seq_b)
        assert len({x for _, x in seq_a}) > 10  # the scores vary

    def test_forget_and_cold_score(self, name):
        s = SCORERS[name](cold_score=0.25)
        assert s.score(7) == 0.25
        s.observe(7, {k: 0.9 for k in SIGNAL_NAMES})
        assert len(s) == 1
        s.forget(7)
        s.forget(12345)  # unknown: ignored
        assert len(s) == 0 and s.score(7) == 0.25
        assert SCORERS[name](cold_score=1.0).score(0) == MAX_SCORE  # clamped below 1
        with pytest.raises(ConfigError, match="routing.cold_score"):
            SCORERS[name](cold_score=1.5)

    def test_threshold_zero_all_deep_threshold_one_all_shallow(self, name):
        for thr, path in ((0.0, "deep"), (1.0, "shallow")):
            router = MoRRouter(RoutingConfig(threshold=thr, cpu_depth=4).validate(12), SCORERS[name]())
            rng = np.random.default_rng(2)
            step = StepResult(0, 0.0, 0.0, signals={i: _signals(rng) for i in range(30)})
            step.signals[0] = {k: 1.0 for k in SIGNAL_NAMES}
            step.signals[1] = {k: 0.0 for k in SIGNAL_NAMES}
            router.observe(step)
            items = _decodes(34)  # 30..33: no signals yet (cold)
            decisions = router.route(items)
            assert [d.request_id for d in decisions] == list(range(34))
            assert {d.path for d in decisions} == {path}
            assert {d.depth for d in decisions} == {12 if path == "deep" else 4}


def test_signal_to_score_mapping():
    sig = {"confidence": 0.8, "entropy": 0.3, "router": 0.6, "attention_peak": 0.9}
    expected = {"learned": 0.6, "confidence": 1 - 0.8, "entropy": 0.3, "attention": 1 - 0.9}
    for name, want in expected.items():
        s = SCORERS[name]()
        s.observe(1, sig)
        assert s.score(1) == pytest.approx(want)
        s.observe(2, {k: v for k, v in sig.items() if k != s.key})
        assert s.score(2) == COLD_SCORE  # the scorer's signal was not measured
    r0, r1 = RandomScorer(seed=0), RandomScorer(seed=1)
    for r in (r0, r1):
        r.observe(5, sig)
    assert r0.score(5) != r1.score(5)


def test_router_routes_decodes_only_and_keeps_item_order():
    router = MoRRouter(RoutingConfig(threshold=0.5, cpu_depth=2).validate(6), LearnedScorer())
    router.observe(StepResult(0, 0.0, 0.0, signals={1: {"router": 0.9}, 2: {"router": 0.1}}))
    items = [BatchItem(9, Phase.PREFILL, 50, 0, True), BatchItem(2, Phase.DECODE, 1, 10, True),
             BatchItem(1, Phase.DECODE, 1, 10, True)]
    assert router.route(items) == [RouteDecision(2, "shallow", 2, 1), RouteDecision(1, "deep", 6, 1)]
    assert router.route(items[:1]) == []
    router.release(1)
    assert router.route(items)[1] == RouteDecision(1, "deep", 6, 1)  # cold again: deep


@pytest.mark.parametrize("fields, needle", [
    ({"threshold": -0.1}, "routing.threshold"), ({"threshold": 1.5}, "routing.threshold"),
    ({"cpu_depth": 0}, "routing.cpu_depth"), ({"cpu_depth": 10, "gpu_depth": 6}, "routing.cpu_depth=10"),
    ({"gpu_depth": 70}, "routing.gpu_depth=70 exceeds model.num_layers=62"),
    ({"shallow_device": "npu"}, "routing.shallow_device"), ({"cpu_depth": 2.5}, "routing.cpu_depth"),
])
def test_routing_config_validation(fields, needle):
    with pytest.raises(ConfigError) as e:
        RoutingConfig(**fields).validate(62)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert RoutingConfig().validate(62).gpu_depth == 62


@pytest.mark.parametrize("override, needle", [
    ("routing.cpu_depth=40 routing.gpu_depth=30", "routing.cpu_depth=40"),
    ("routing.gpu_depth=70", "routing.gpu_depth=70 exceeds model.num_layers=62"),
    ("routing.threshold=-0.1", "routing.threshold"),
    ("routing.threshold=1.5", "routing.threshold"),
    ("routing.scorer=oracle", "routing.scorer: unknown 'oracle'"),
    ("routing.signals_table=/nonexistent/signals.csv", "routing.signals_table"),
])
def test_bad_routing_config_fails_at_build_with_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        build_sim(make_cfg("routing=mor", *override.split(), *SIM))
    msg = str(e.value)
    assert msg.startswith("routing.") and needle in msg and "\n" not in msg


def test_bad_routing_config_cli_prints_one_error_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), "routing=mor", "routing.cpu_depth=40",
                          "routing.gpu_depth=30", "progress=false", f"hydra.run.dir={tmp_path}/run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: routing.cpu_depth=40"), res.stderr
    assert not (tmp_path / "run" / "requests.parquet").exists()


# ----- simulator -----------------------------------------------------------------------------
def _run(*overrides: str):
    setup = build_sim(make_cfg(*overrides))
    plans: list[StepPlan] = []
    for b in setup.driver.backends:
        inner = b.execute

        def execute(plan, cost=None, _inner=inner):
            plans.append(plan)
            return (yield from _inner(plan, cost))
        b.execute = execute  # type: ignore[method-assign]
    setup.driver.run()
    return setup, setup.recorder.frames()[1], plans


def test_threshold_zero_reproduces_no_routing_exactly():
    _, base, _ = _run(*SMALL)
    _, mor, _ = _run("routing=mor", "routing.threshold=0", *SMALL)
    assert (base["deep_tokens"] == 0).all() and (base["shallow_tokens"] == 0).all()
    assert (mor["shallow_tokens"] == 0).all() and (mor["deep_tokens"] == mor["decode_tokens"]).all()
    cols = [c for c in STEP_COLUMNS if c not in ("deep_tokens", "shallow_tokens")]
    pd.testing.assert_frame_equal(base[cols], mor[cols], check_exact=True)


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_all_shallow_is_faster_when_weights_stream(device):
    """Reference (27B on 2x T10): the weights do not fit, every deep step streams ~14 GiB per GPU;
    shallow-only decode steps skip that."""
    _, deep, _ = _run("routing=mor", "routing.threshold=0", f"routing.shallow_device={device}", *SMALL)
    _, shallow, _ = _run("routing=mor", "routing.threshold=1", f"routing.shallow_device={device}", *SMALL)
    assert (shallow["deep_tokens"] == 0).all() and shallow["shallow_tokens"].sum() == shallow["decode_tokens"].sum()
    dec_d = deep[deep["prefill_tokens"] == 0]["duration"].mean()
    dec_s = shallow[shallow["prefill_tokens"] == 0]["duration"].mean()
    assert dec_s < 0.3 * dec_d, (dec_s, dec_d)
    assert shallow["end"].max() < deep["end"].max()


def test_early_exit_of_the_deep_path_is_faster_when_weights_fit():
    base = ["hardware=h100", "model=llama3.1-8b", *SMALL]
    _, full, _ = _run("routing=mor", "routing.threshold=0", *base)
    _, half, _ = _run("routing=mor", "routing.threshold=0", "routing.gpu_depth=16", *base)
    assert half["duration"].sum() < 0.8 * full["duration"].sum()
    assert full["link_bytes"].sum() == 0


def test_engine_drops_weight_fetches_when_no_token_is_deep():
    for device, check in (("cpu", lambda blocks: not blocks), ("gpu", lambda blocks: blocks and
                                                                  max(b.layer for b in blocks) < 8)):
        _, _, plans = _run("routing=mor", "routing.threshold=1", f"routing.shallow_device={device}", *SMALL)
        decode_only = [p for p in plans if p.routing and len(p.routing) == len(p.items)]
        with_prefill = [p for p in plans if len(p.routing) < len(p.items)]
        assert decode_only and with_prefill
        for p in decode_only:
            blocks = [b for op in p.memory_ops if op.op == "fetch" for b in op.blocks if b.kind == "weight"]
            assert check(blocks), device
        for p in with_prefill:  # a prefill chunk is deep: every streamed layer is fetched
            assert max(b.layer for op in p.memory_ops for b in op.blocks) > 8
    _, _, plans = _run("routing=mor", "routing.threshold=0", *SMALL)
    assert all(p.memory_ops for p in plans)


def test_drop_weight_fetches_trims_blocks_and_keeps_other_ops():
    w = tuple(BlockRef("weight", layer, "layer") for layer in (2, 5, 9, 12))
    kv = tuple(BlockRef("kv", layer) for layer in range(4))
    ops = [MemoryOp("fetch", "cpu", "gpu0", 100, layer=2, blocks=w, block_bytes=(10, 20, 30, 40), convert_bytes=50),
           MemoryOp("fetch", "cpu", "gpu0", 80, layer=0, blocks=kv),
           MemoryOp("fetch", "cpu", "gpu0", 8, layer=-1),
           MemoryOp("fetch", "cpu", "gpu0", 7, layer=11),
           MemoryOp("swap_in", "cpu", "gpu0", 9),
           MemoryOp("evict", "gpu0", "cpu", 6, layer=3)]
    trimmed = _drop_weight_fetches(ops, 8)
    assert [o.nbytes for o in trimmed] == [30, 80, 8, 9, 6]
    assert [b.layer for b in trimmed[0].blocks] == [2, 5] and trimmed[0].block_bytes == (10, 20)
    assert trimmed[0].convert_bytes == 15
    assert [o.nbytes for o in _drop_weight_fetches(ops, 0)] == [80, 8, 9, 6]
    assert _drop_weight_fetches(ops, 100) == ops


def test_cpu_part_equals_hand_roofline():
    """One shallow Llama-3.1-8B token on the H100 host CPU, by hand from the profile."""
    hw = hardware_from_config(yaml.safe_load((CONF / "hardware" / "h100.yaml").read_text()))
    spec = ModelSpec.from_config({**yaml.safe_load((CONF / "model" / "llama3.1-8b.yaml").read_text()),
                                  "dtype": "bf16"})
    from sim.cost_model import CostModel
    cost = CostModel(spec, hw)
    rc = RoutingCost(cost, cpu_depth=4, gpu_depth=32, shallow_device="cpu")
    ctx = 300
    plan = StepPlan(1, 0, 0.0, [BatchItem(0, Phase.DECODE, 1, ctx, True)], [RouteDecision(0, "shallow", 4, 1)])
    step = rc.step(plan)
    assert step is not None
    cpu = hw.cpu
    peak = cpu.peak_gflops * 1e9 * cpu.compute_efficiency
    bw = cpu.dram_bandwidth_gbps * 1e9 * cpu.bandwidth_efficiency
    h, inter, q, kvd = 4096, 14336, 4096, 1024
    params = 2 * h * q + 2 * h * kvd + 3 * h * inter
    layer_bytes = (params + 2 * h) * 2
    act = 2 * (6 * h + 2 * q + 2 * kvd + 3 * inter)
    keys = ctx + 1
    per_layer = max(2 * params / peak, (layer_bytes + act) / bw) + max(4 * 32 * 128 * keys / peak,
                                                                      2 * kvd * 2 * (keys + 1) / bw)
    assert step.cpu_s == pytest.approx(4 * per_layer, rel=1e-12)
    xfer = hw.pcie.latency_us * 1e-6 + (2 * h + 4 * 2 * kvd * 2) / (hw.pcie.bandwidth_gbps * 1e9)
    assert step.xfer_s == pytest.approx(xfer, rel=1e-12)
    assert step.layers_s == 0.0 and step.deep_tokens == 0 and step.shallow_tokens == 1
    assert step.end(0.0, 0.0) == pytest.approx(step.cpu_s + step.xfer_s + step.fill_s + step.tail_s)
    gpu = RoutingCost(cost, cpu_depth=4, gpu_depth=32, shallow_device="gpu").step(plan)
    assert gpu is not None and gpu.cpu_s == 0.0 and gpu.xfer_s == 0.0
    one = cost.layer(plan.items)
    assert gpu.layer_s == [one.global_s + one.comm_s] * 4 + [0.0] * 28
    assert gpu.end(0.0, gpu.layers_s) == pytest.approx(gpu.layers_s + gpu.fill_s + gpu.tail_s)


def test_routed_steps_run_with_layer_lookahead():
    _, gated, _ = _run("routing=mor", "routing.shallow_device=gpu", "memory.lookahead=2", *SMALL)
    assert gated["shallow_tokens"].sum() > 0 and gated["deep_tokens"].sum() > 0
    assert np.isfinite(gated["duration"]).all() and (gated["duration"] > 0).all()


def test_synthetic_signals_reproducible_in_range_and_from_a_table(tmp_path):
    a, b = SyntheticSignals(seed=4), SyntheticSignals(seed=4, cache_requests=1)
    draws = [a.draw(r, n) for r in range(5) for n in range(1, 150)]
    # b: another order (requests interleaved) and a cache of one request, so blocks are redrawn
    by_b = {(r, n): b.draw(r, n) for n in range(1, 150) for r in range(5)}
    assert draws == [by_b[(r, n)] for r in range(5) for n in range(1, 150)]
    vals = np.array([[d[k] for k in SIGNAL_NAMES] for d in draws])
    assert vals.min() >= 0.0 and vals.max() <= 1.0
    corr = np.corrcoef(vals.T)
    assert corr[0, 1] < -0.3 and corr[1, 2] > 0.3  # confidence vs entropy, entropy vs router
    assert SyntheticSignals(seed=5).draw(0, 1) != a.draw(0, 1)
    rows = pd.DataFrame({"confidence": [0.9, 0.2], "entropy": [0.1, 0.8], "router": [0.05, float("nan")],
                         "attention_peak": [0.7, 0.3]})
    rows.to_csv(tmp_path / "sig.csv", index=False)
    t = SyntheticSignals(seed=0, table=tmp_path / "sig.csv")
    seen = {tuple(sorted(t.draw(r, n).items())) for r in range(3) for n in range(40)}
    assert seen == {tuple(sorted({"confidence": 0.9, "entropy": 0.1, "router": 0.05, "attention_peak": 0.7}.items())),
                    tuple(sorted({"confidence": 0.2, "entropy": 0.8, "attention_peak": 0.3}.items()))}
    rows.drop(columns=["router"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="routing.signals_table.*router"):
        SyntheticSignals(table=tmp_path / "bad.parquet")


def test_summary_and_report_carry_the_deep_fraction(tmp_path):
    from experiments.run import run_sim
    from wicore.report import _reading, fmt, pct
    off = run_sim(make_cfg(*SMALL), tmp_path / "off")
    assert math.isnan(off["deep_token_fraction"])
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["deep_token_fraction"] is None
    on = run_sim(make_cfg("routing=mor", *SMALL), tmp_path / "on")
    steps = pd.read_parquet(tmp_path / "on" / "steps.parquet")
    frac = steps["deep_tokens"].sum() / (steps["deep_tokens"].sum() + steps["shallow_tokens"].sum())
    assert 0.0 < on["deep_token_fraction"] < 1.0 and on["deep_token_fraction"] == pytest.approx(frac)
    line = _reading(on, steps, None, None, "sim")
    assert f"Token routing (MoR) sent {pct(frac)} of {fmt(float(steps['decode_tokens'].sum()))}" in line
    assert "Token routing" not in _reading(off, pd.read_parquet(tmp_path / "off" / "steps.parquet"), None, None, "sim")
