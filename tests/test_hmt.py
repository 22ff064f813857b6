"""HMT tiered weights in the simulator: policies plugged in by config, tiers, formats, bad input."""

from __future__ import annotations

import pytest

from experiments.build import build_sim
from experiments.run import run_sim
from tests.conftest import make_cfg
from wicore.errors import ConfigError

REF = ["memory=hmt", "workload.num_requests=16", "workload.concurrency=8", "report.enabled=false",
       "progress=false"]


def _run(*overrides: str):
    setup = build_sim(make_cfg(*REF, *overrides))
    setup.driver.run()
    req, steps, _ = setup.recorder.frames()
    return setup, req, steps


def test_lru_thrashes_on_the_cyclic_weight_scan_and_a2cr_admission_does_not():
    lru, lru_req, lru_steps = _run("memory.policy=lru")
    a2cr, a2cr_req, a2cr_steps = _run("memory.policy=a2cr")
    lru_stats = lru.placements[0].stats
    a2cr_stats = a2cr.placements[0].stats
    # every step reads every layer in order: a cache smaller than the model never hits under LRU
    assert lru_stats.served.get("gpu", 0) == 0
    assert a2cr_stats.served["gpu"] / a2cr_stats.accesses > 0.3
    assert a2cr_steps["link_bytes"].sum() < lru_steps["link_bytes"].sum()
    assert a2cr_steps["duration"].mean() < lru_steps["duration"].mean()


def test_warm_tier_format_sets_the_bytes_moved():
    int8, _, s8 = _run("memory.policy=lru")
    fp16, _, s16 = _run("memory.policy=lru", "memory.formats.cpu=fp16")
    ratio = s8["link_bytes"].sum() / s16["link_bytes"].sum()
    assert abs(ratio - 34 / 64) < 1e-3  # int8: 34 bytes per 32 values vs 64 for fp16


def test_small_host_memory_puts_weights_on_nvme_in_the_cold_format():
    setup, _, steps = _run("memory.policy=lru", "hardware.cpu.dram_gib=24", "memory.swap_space_gib=1")
    stats = setup.placements[0].stats
    assert stats.served.get("nvme", 0) > 0 and stats.served.get("cpu", 0) > 0
    assert setup.placements[0].describe()["nvme_weights_gib"] > 0


def test_hmt_run_writes_block_residency_and_tier_stats(tmp_path):
    summary = run_sim(make_cfg(*REF, "memory.policy=lfu"), tmp_path)
    import pandas as pd
    blocks = pd.read_parquet(tmp_path / "blocks.parquet")
    assert set(blocks.columns) == {"time", "replica", "gpu", "layer", "group", "tier"}
    assert set(blocks["tier"]) <= {"gpu0", "gpu1", "cpu", "nvme"}
    mem = summary["memory"]
    assert abs(sum(v for k, v in mem.items() if k.startswith("served_from")) - 1.0) < 1e-9


@pytest.mark.parametrize("override, needle", [
    ("memory.a2cr.attention_weight=-1", "memory.a2cr.attention_weight"),
    ("memory.a2cr.attention_weight=0 memory.a2cr.frequency_weight=0 memory.a2cr.recency_weight=0", "all weights"),
    ("memory.formats.cpu=int3", "memory.formats.cpu"),
    ("memory.policy=mru", "memory.policy"),
    ("memory.lrfu.lam=2 memory.policy=lrfu", "lam"),
    ("hardware.gpu.memory_gib=3", "memory"),
])
def test_bad_memory_config_fails_at_start_up(override, needle):
    with pytest.raises(ConfigError, match=needle):
        build_sim(make_cfg(*REF, *override.split()))


# ----- KV pages in the tiers ----------------------------------------------------------------
def test_kv_tiering_admits_more_and_attention_aware_policy_keeps_more_pages_on_gpu(tmp_path):
    base = [*REF, "memory.kv.tiering=true", "workload.num_requests=24", "memory.kv_min_gib=0.3"]
    static = build_sim(make_cfg(*REF, "workload.num_requests=24", "memory.kv_min_gib=0.3"))
    tiered = build_sim(make_cfg(*base, "memory.policy=lfu"))
    assert tiered.engines[0].scheduler.pool.num_pages > static.engines[0].scheduler.pool.num_pages
    summaries = {p: run_sim(make_cfg(*base, f"memory.policy={p}"), tmp_path / p) for p in ("lru", "a2cr")}
    for p, s in summaries.items():
        mem = s["memory"]
        assert 0 <= mem["kv_served_from_gpu"] <= 1
        assert mem["kv_pages_fetched"] > 0, p  # the GPU holds fewer pages than are in use
        assert (tmp_path / p / "kv_pages.parquet").exists()
    assert summaries["a2cr"]["memory"]["kv_served_from_gpu"] > summaries["lru"]["memory"]["kv_served_from_gpu"]


def test_sparse_attention_skips_low_mass_pages_and_reports_the_mass_left_out(tmp_path):
    dense = run_sim(make_cfg(*REF, "memory.kv.tiering=true", "model.sliding_window=64"), tmp_path / "d")
    sparse = run_sim(make_cfg(*REF, "memory.kv.tiering=true", "model.sliding_window=64",
                              "memory.kv.skip_below=0.02"), tmp_path / "s")
    assert dense["memory"]["kv_page_reads_skipped"] == 0
    assert sparse["memory"]["kv_page_reads_skipped"] > 0
    assert 0 < sparse["memory"]["kv_skipped_mass_per_query"] < 0.5
    assert sparse["memory"]["kv_page_reads"] < dense["memory"]["kv_page_reads"]


def test_synthetic_attention_model():
    import numpy as np

    from sim.attention_model import SyntheticAttention
    att = SyntheticAttention(num_layers=6, num_global=1, window=32, page_tokens=16, seed=0)
    m = att.masses(seq=7, kv_tokens=200)  # 13 pages
    assert len(m) == 13 and abs(m.sum() - 1) < 1e-12 and (m >= 0).all()
    # local layers (5 of 6) see only the last 32 tokens = 2 pages: older pages get global mass only
    assert m[:-2].sum() <= 1 / 6 + 1e-12 and m[-2:].sum() >= 5 / 6
    # the attention sink (page 0) is a heavy hitter: above the average old page
    assert m[0] > np.mean(m[1:-2])
    again = SyntheticAttention(num_layers=6, num_global=1, window=32, page_tokens=16, seed=0)
    assert np.array_equal(again.masses(seq=7, kv_tokens=200), m)  # seeded


def test_tiered_kv_unit_fetches_reads_not_writes_and_forgets_finished_sequences():
    from wicore.memory.kv_tiers import TieredKV
    from wicore.memory.policies.lru import LRUPolicy
    from wicore.types import BatchItem, Phase

    kv = TieredKV(LRUPolicy(capacity=4), page_tokens=16, page_bytes_per_gpu=[100], gpus=[0],
                  num_layers=2)
    ops = kv.step_ops([BatchItem(1, Phase.PREFILL, 96, 0, True)], now=0.0)  # writes 6 pages, reads none
    assert [op.op for op in ops] == ["evict"] and ops[0].nbytes == 2 * 100  # 2 pages demoted
    ops = kv.step_ops([BatchItem(1, Phase.DECODE, 1, 96, True)], now=1.0)  # reads pages 0..5, writes 6
    fetch = [op for op in ops if op.op == "fetch"]
    assert fetch and fetch[0].nbytes % 100 == 0 and kv.stats.fetched >= 2
    kv.release(1)
    assert len(kv.policy) == 0 and not kv.on_host
