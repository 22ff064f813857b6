"""Tests for sim/hardware.py (FlowNetwork, devices, Machine) and conf/hardware/*.yaml."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import simpy
import yaml

from sim.hardware import FlowNetwork, Link, Machine, TransferRecord
from wicore.hal import GB, HardwareSpec, hardware_from_config

ROOT = Path(__file__).resolve().parents[1]
HW_DIR = ROOT / "conf" / "hardware"
PROFILES = sorted(HW_DIR.glob("*.yaml"))
REL = 1e-9


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b), 1e-12)


def load(name: str) -> HardwareSpec:
    return hardware_from_config(yaml.safe_load((HW_DIR / f"{name}.yaml").read_text()))


def t10x2(**changes: Any) -> HardwareSpec:
    return dataclasses.replace(load("t10x2"), **changes)


def at(env: simpy.Environment, delay: float, make: Any, out: dict[str, Any], key: str) -> None:
    """Start ``make()`` (which returns an event) at time ``delay``; store its value in ``out[key]``."""

    def proc() -> Generator[simpy.Event, Any, None]:
        yield env.timeout(delay)
        out[key] = yield make()

    env.process(proc())


# -- FlowNetwork ---------------------------------------------------------------------------------------


def test_single_transfer_takes_latency_plus_bytes_over_bandwidth() -> None:
    env = simpy.Environment()
    net = FlowNetwork(env)
    link = Link("l", 12.3e9, 7e-6)
    ev = net.transfer([link], 987_654_321, name="x")
    env.run()
    rec = ev.value
    assert isinstance(rec, TransferRecord)
    assert rec.start == 0.0 and rec.path == ("l",) and rec.nbytes == 987_654_321
    assert close(rec.end, 7e-6 + 987_654_321 / 12.3e9)
    assert close(rec.first_byte, 7e-6)
    assert link.bytes_moved == 987_654_321
    assert close(link.busy_time, 987_654_321 / 12.3e9)  # latency is not busy time
    assert len(link.records) == 1 and link.records[0][3] == "x"


def test_explicit_latency_overrides_path_latency_and_zero_bytes_complete_after_latency() -> None:
    env = simpy.Environment()
    net = FlowNetwork(env)
    link = Link("l", 1e9, 1e-3)
    a = net.transfer([link], 1_000_000, latency_s=0.5)
    b = net.transfer([link], 0)
    env.run()
    assert close(a.value.end, 0.5 + 1e-3)
    assert close(b.value.end, 1e-3)
    assert link.busy_time == pytest.approx(1e-3, rel=REL)


def test_two_concurrent_equal_transfers_each_take_twice_as_long() -> None:
    env = simpy.Environment()
    net = FlowNetwork(env)
    link = Link("l", 10e9, 0.0)
    alone = 10e9 * 0.8  # 0.8 s alone
    a = net.transfer([link], int(alone))
    b = net.transfer([link], int(alone))
    env.run()
    assert close(a.value.end, 1.6) and close(b.value.end, 1.6)
    assert close(link.busy_time, 1.6)


def test_transfer_starting_halfway_through_another() -> None:
    # A alone would take T; B (same size) starts at T/2. Both share from T/2: A ends at 3T/2, B at 2T.
    env = simpy.Environment()
    net = FlowNetwork(env)
    link = Link("l", 4e9, 0.0)
    size, T = 8_000_000_000, 2.0
    out: dict[str, Any] = {}
    at(env, 0.0, lambda: net.transfer([link], size, "A"), out, "A")
    at(env, T / 2, lambda: net.transfer([link], size, "B"), out, "B")
    env.run()
    assert close(out["A"].end, 1.5 * T)
    assert close(out["B"].end, 2.0 * T)
    assert close(out["B"].duration, 1.5 * T)
    assert out["B"].first_byte == out["B"].start == T / 2  # no latency on this link


def test_max_min_fairness_three_flows_two_links() -> None:
    # L1 = 10 GB/s, L2 = 4 GB/s. f1 crosses L1+L2, f2 only L1, f3 only L2.
    # Progressive filling: L2 is the bottleneck (2 each for f1, f3); f2 gets L1's leftover 8 (not 5).
    # Sizes f1 = 8 GB, f2 = 8 GB, f3 = 4 GB: f2 ends at 1 s; f3 at 2 s; then f1 (4 GB left) runs at
    # min(10, 4) = 4 GB/s and ends at 3 s.
    env = simpy.Environment()
    net = FlowNetwork(env)
    l1, l2 = Link("L1", 10 * GB, 0.0), Link("L2", 4 * GB, 0.0)
    f1 = net.transfer([l1, l2], int(8 * GB), "f1")
    f2 = net.transfer([l1], int(8 * GB), "f2")
    f3 = net.transfer([l2], int(4 * GB), "f3")
    env.run(until=0.5)
    rates = dict(net.rates())
    assert rates["f1"] == pytest.approx(2 * GB, rel=REL)
    assert rates["f2"] == pytest.approx(8 * GB, rel=REL)
    assert rates["f3"] == pytest.approx(2 * GB, rel=REL)
    env.run()
    assert close(f2.value.end, 1.0)
    assert close(f3.value.end, 2.0)
    assert close(f1.value.end, 3.0)
    assert close(l1.busy_time, 3.0) and close(l2.busy_time, 3.0)


def test_rate_cap_leftover_is_redistributed() -> None:
    env = simpy.Environment()
    net = FlowNetwork(env)
    link = Link("l", 12e9, 0.0)
    capped = net.transfer([link], int(3e9), "capped", rate_cap=3e9)  # 1 s at its cap
    free = net.transfer([link], int(9e9), "free")  # gets 12 - 3 = 9 GB/s -> 1 s
    env.run()
    assert close(capped.value.end, 1.0) and close(free.value.end, 1.0)


@pytest.mark.parametrize("seed", range(5))
def test_random_allocations_are_max_min_fair(seed: int) -> None:
    # Max-min fairness <=> feasible, and every flow is at its cap or crosses a saturated link on which
    # no flow gets more than it does.
    rnd = random.Random(seed)
    env = simpy.Environment()
    net = FlowNetwork(env)
    links = [Link(f"l{i}", rnd.choice([1, 2, 3, 7]) * GB, 0.0) for i in range(6)]
    for k in range(12):
        cap = rnd.choice([None, None, 0.4 * GB])
        net.transfer(rnd.sample(links, rnd.randint(1, 3)), int(100 * GB), f"f{k}", rate_cap=cap)
    env.run(until=1e-3)
    flows = net._flows
    assert len(flows) == 12
    load = {link: sum(f.rate for f in flows if link in f.path) for link in links}
    for link, used in load.items():
        assert used <= link.bytes_per_s * (1 + 1e-9)
    for f in flows:
        assert f.rate > 0
        at_cap = f.rate >= f.cap * (1 - 1e-9)
        bottleneck = any(load[link] >= link.bytes_per_s * (1 - 1e-9)
                         and all(g.rate <= f.rate * (1 + 1e-9) for g in flows if link in g.path)
                         for link in f.path)
        assert at_cap or bottleneck, f.name


def test_duplicate_link_in_path_is_crossed_once() -> None:
    env = simpy.Environment()
    net = FlowNetwork(env)
    link = Link("l", 1e9, 0.0)
    ev = net.transfer([link, link], int(1e9))
    env.run()
    assert close(ev.value.end, 1.0) and ev.value.path == ("l",)


def test_many_transfers_are_fast_and_deterministic() -> None:
    def run() -> tuple[float, list[float]]:
        env = simpy.Environment()
        net = FlowNetwork(env)
        links = [Link(f"l{i}", (i + 1) * GB, 5e-6, record=False) for i in range(4)]
        ends: list[float] = []

        def worker(k: int) -> Generator[simpy.Event, Any, None]:
            for j in range(2500):
                path = [links[k], links[(k + j) % 4]] if j % 3 else [links[k]]
                rec = yield net.transfer(path, 1_000_000 + 1000 * j, f"w{k}.{j}")
                ends.append(rec.end)

        for k in range(4):
            env.process(worker(k))
        env.run()
        assert net.completed == 10_000 and net.active == 0
        return ends

    assert run() == run()  # deterministic; speed is measured by benchmarks/sim_speed.py, not here


# -- devices and Machine -------------------------------------------------------------------------------


def test_links_of_different_gpus_do_not_interfere_without_shared_upstream() -> None:
    spec = t10x2()
    bw = spec.pcie.bytes_per_s
    env = simpy.Environment()
    m = Machine(env, spec)
    assert "upstream" not in m.links()
    n = int(bw)  # 1 s alone
    a, b = m.h2d(0, n), m.h2d(1, n)
    env.run()
    lat = spec.pcie.latency_us * 1e-6
    assert close(a.value.end, lat + 1.0) and close(b.value.end, lat + 1.0)
    assert a.value.path == ("pcie0",) and b.value.path == ("pcie1",)


def test_shared_upstream_halves_each_gpu_copy() -> None:
    spec = t10x2(shared_upstream_gbps=t10x2().pcie.bandwidth_gbps)
    env = simpy.Environment()
    m = Machine(env, spec)
    n = int(spec.pcie.bytes_per_s)
    a, b = m.h2d(0, n), m.h2d(1, n)
    env.run()
    lat = spec.pcie.latency_us * 1e-6
    assert close(a.value.end, lat + 2.0) and close(b.value.end, lat + 2.0)
    assert a.value.path == ("upstream", "pcie0")
    assert close(m.links()["upstream"].busy_time, 2.0)


def test_pcie_is_full_duplex() -> None:
    spec = t10x2()
    env = simpy.Environment()
    m = Machine(env, spec)
    n = int(spec.pcie.bytes_per_s)
    a, b = m.h2d(0, n), m.d2h(0, n)
    env.run()
    assert close(a.value.end, b.value.end)
    assert close(a.value.end, spec.pcie.latency_us * 1e-6 + 1.0)


def test_pageable_copy_is_rate_capped_and_leaves_the_rest_to_pinned() -> None:
    pcie = dataclasses.replace(t10x2().pcie, bandwidth_gbps=12.0, pageable_bandwidth_gbps=3.0, latency_us=0.0)
    spec = t10x2(pcie=pcie)
    env = simpy.Environment()
    m = Machine(env, spec)
    alone = m.h2d(0, int(3 * GB), pinned=False)
    env.run()
    assert close(alone.value.end, 1.0)  # 3 GB at 3 GB/s
    env = simpy.Environment()
    m = Machine(env, spec)
    pageable = m.h2d(0, int(3 * GB), pinned=False)
    pinned = m.h2d(0, int(9 * GB))
    env.run()
    assert close(pageable.value.end, 1.0) and close(pinned.value.end, 1.0)  # 3 + 9 = 12 GB/s


def test_copy_overlaps_compute_and_computes_serialise() -> None:
    spec = t10x2()
    env = simpy.Environment()
    m = Machine(env, spec)
    T = 0.25
    lat = spec.pcie.latency_us * 1e-6
    nbytes = int((T - lat) * spec.pcie.bytes_per_s)  # latency + bytes = T (to rounding)
    comp = m.gpus[0].compute(T, "gemm")
    copy = m.h2d(0, nbytes)
    env.run()
    assert comp.value == (0.0, T)
    assert copy.value.end == pytest.approx(T, rel=1e-6)

    env = simpy.Environment()
    m = Machine(env, spec)
    c1, c2 = m.gpus[0].compute(T), m.gpus[0].compute(T)
    c3 = m.gpus[1].compute(T)  # another GPU: its own stream
    env.run()
    assert c1.value == (0.0, T) and c2.value == (T, 2 * T) and c3.value == (0.0, T)
    assert m.gpus[0].busy_time == pytest.approx(2 * T) and m.gpus[1].busy_time == pytest.approx(T)


def test_nvme_queue_depth_limits_concurrency() -> None:
    nvme = dataclasses.replace(t10x2().nvme, queue_depth=2, read_gbps=2.0, latency_us=0.0)
    env = simpy.Environment()
    m = Machine(env, t10x2(nvme=nvme))
    reads = [m.nvme.read(int(1 * GB), f"r{i}") for i in range(4)]
    env.run(until=0.5)
    assert m.net.active == 2 and m.nvme.slots.count == 2 and len(m.nvme.slots.queue) == 2
    env.run()
    ends = [r.value.end for r in reads]
    # two at a time, each at 1 GB/s: first pair at 1 s, second pair at 2 s
    assert [close(e, x) for e, x in zip(ends, [1.0, 1.0, 2.0, 2.0])] == [True] * 4
    assert close(reads[2].value.start, 1.0)  # the record starts when the IO got its queue slot


def test_nvme_to_gpu_is_one_flow_at_the_min_share() -> None:
    spec = t10x2(shared_upstream_gbps=12.0)
    env = simpy.Environment()
    m = Machine(env, spec)
    n = int(3.2 * GB)
    ev = m.nvme_to_gpu(1, n, "weights")
    env.run()
    assert ev.value.path == ("nvme.read", "upstream", "pcie1")
    lat = max(spec.nvme.latency_us, spec.pcie.latency_us) * 1e-6
    assert close(ev.value.end, lat + n / (spec.nvme.read_gbps * GB))
    assert m.links()["pcie1"].bytes_moved == n and m.links()["nvme.read"].bytes_moved == n


def test_pcie_p2p_is_capped_and_shares_lanes_with_host_copies() -> None:
    spec = t10x2()
    ic = spec.interconnect
    env = simpy.Environment()
    m = Machine(env, spec)
    n = int(ic.bytes_per_s)
    p = m.p2p(0, 1, n)
    env.run()
    assert p.value.path == ("pcie0.d2h", "pcie1")
    assert close(p.value.end, ic.latency_us * 1e-6 + 1.0)  # capped at the P2P rate, not the 12 GB/s link

    env = simpy.Environment()
    m = Machine(env, spec)
    p, h = m.p2p(0, 1, n), m.h2d(1, int(spec.pcie.bytes_per_s))
    env.run(until=0.5)
    assert sum(rate for _, rate in m.net.rates()) == pytest.approx(spec.pcie.bytes_per_s, rel=REL)
    env.run()
    assert p.value.end > 1.0 and h.value.end > 1.0
    with pytest.raises(ValueError):
        m.p2p(1, 1, 10)


def test_nvlink_p2p_uses_per_gpu_links() -> None:
    spec = load("h100x2")
    env = simpy.Environment()
    m = Machine(env, spec)
    n = int(spec.interconnect.bytes_per_s)
    a, b = m.p2p(0, 1, n), m.p2p(1, 0, n)
    env.run()
    assert a.value.path == ("nvlink0.tx", "nvlink1.rx")
    lat = spec.interconnect.latency_us * 1e-6
    assert close(a.value.end, lat + 1.0) and close(b.value.end, lat + 1.0)


def test_mesh_fabric_has_a_link_per_pair() -> None:
    spec = dataclasses.replace(load("mi300x"), num_gpus=3)
    env = simpy.Environment()
    m = Machine(env, spec)
    n = int(spec.interconnect.bytes_per_s)
    a, b = m.p2p(0, 1, n), m.p2p(0, 2, n)  # different peers: separate links, no sharing
    env.run()
    lat = spec.interconnect.latency_us * 1e-6
    assert a.value.path == ("infinity_fabric0>1",)
    assert close(a.value.end, lat + 1.0) and close(b.value.end, lat + 1.0)


def test_machine_builds_expected_links() -> None:
    env = simpy.Environment()
    m = Machine(env, t10x2(shared_upstream_gbps=12.0))
    assert list(m.links()) == ["upstream", "upstream.d2h", "pcie0", "pcie0.d2h", "pcie1", "pcie1.d2h",
                               "dram", "nvme.read", "nvme.write"]
    cpu = m.cpu.spec
    assert close(m.cpu.dram.bytes_per_s, cpu.dram_bandwidth_gbps * GB * cpu.bandwidth_efficiency)
    assert m.gpus[1].link is m.links()["pcie1"]
    assert m.nvme.slots.capacity == m.spec.nvme.queue_depth


def test_records_can_be_bounded_or_disabled() -> None:
    env = simpy.Environment()
    m = Machine(env, t10x2(), max_records=2)
    for _ in range(5):
        m.h2d(0, 1000)
    env.run()
    assert len(m.links()["pcie0"].records) == 2 and m.links()["pcie0"].bytes_moved == 5000
    env = simpy.Environment()
    m = Machine(env, t10x2(), record=False)
    m.h2d(0, 1000)
    env.run()
    assert not m.links()["pcie0"].records and m.links()["pcie0"].bytes_moved == 1000


# -- conf/hardware ---------------------------------------------------------------------------------------

NUMERIC = re.compile(r"^\s*[A-Za-z_][\w]*\s*:\s*[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?\s*(#.*)?$")


def uncommented_numeric_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if NUMERIC.match(line) and "#" not in line]


def test_comment_checker_can_fail() -> None:
    assert uncommented_numeric_lines("a: 1\nb: 2.5  # ok\nc: 1e9\n  d: .5\nname: x\n") == ["a: 1", "c: 1e9", "  d: .5"]


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_loads_builds_and_documents_every_number(path: Path) -> None:
    text = path.read_text()
    assert uncommented_numeric_lines(text) == []
    spec = hardware_from_config(yaml.safe_load(text))
    assert spec.name == path.stem
    env = simpy.Environment()
    m = Machine(env, spec)
    assert len(m.gpus) == spec.num_gpus
    ev = m.h2d(0, 1 << 20)
    env.run()
    assert ev.value.end > 0


def test_expected_profiles_exist() -> None:
    names = {p.stem for p in PROFILES}
    assert {"t10x2", "t4", "a100_80g", "h100", "h100x2", "mi300x", "ascend910b"} <= names
    ref = load("t10x2")
    assert ref.num_gpus == 2 and not ref.gpu.supports_bf16 and ref.gpu.bf16_tflops == 0
    assert ref.interconnect.kind == "pcie" and ref.shared_upstream_gbps == 0
