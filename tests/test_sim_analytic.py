"""Golden/analytic tests of the simulator: queueing theory and the roofline by hand."""

from __future__ import annotations

import numpy as np
import yaml

from experiments.build import build_sim
from tests.conftest import CONF, make_cfg
from wicore.hal import hardware_from_config


def _run(*overrides: str):
    setup = build_sim(make_cfg(*overrides, "report.enabled=false", "progress=false"))
    setup.driver.run()
    return setup, setup.recorder.frames()


def test_md1_mean_queueing_delay_matches_pollaczek_khinchine():
    """Batch size 1, one-token requests: every request is one step of fixed
    length D, Poisson arrivals -> M/D/1, mean wait = rho * D / (2 (1 - rho))."""
    base = ["hardware=h100", "model=gemma3-1b", "workload=poisson", "workload.prompt.kind=fixed",
            "workload.prompt.value=1", "workload.output.kind=fixed", "workload.output.value=1",
            "scheduler.max_num_seqs=1"]
    setup, (req, steps, _) = _run(*base, "workload.num_requests=10")
    d = float(steps["duration"].iloc[0])
    assert np.allclose(steps["duration"], d)  # fixed service time
    rho = 0.7
    n = 30000
    _, (req, steps, _) = _run(*base, f"workload.num_requests={n}", f"workload.rate={rho / d}")
    assert np.allclose(steps["duration"], d)
    wq = req["queue_delay"].to_numpy()[n // 10:]  # drop the warm-up
    expected = rho * d / (2 * (1 - rho))
    # batch means give a standard error that accounts for the autocorrelation of waits
    batches = wq[: len(wq) // 30 * 30].reshape(30, -1).mean(axis=1)
    se = batches.std(ddof=1) / np.sqrt(len(batches))
    assert abs(wq.mean() - expected) < 3 * se + 0.01 * expected, (wq.mean(), expected, se)
    assert abs(wq.mean() - expected) / expected < 0.08


def test_single_decode_step_equals_hand_roofline():
    """One Llama-3.1-8B decode step on one H100, computed by hand from the profile."""
    hw = hardware_from_config(yaml.safe_load((CONF / "hardware" / "h100.yaml").read_text()))
    prompt = 100
    setup, (req, steps, _) = _run("hardware=h100", "model=llama3.1-8b", "workload.num_requests=1",
                                  "workload.prompt.kind=fixed", f"workload.prompt.value={prompt}",
                                  "workload.output.kind=fixed", "workload.output.value=2")
    assert len(steps) == 2 and steps["decode_tokens"].iloc[1] == 1
    g = hw.gpu
    peak = g.bf16_tflops * 1e12 * g.compute_efficiency
    bw = g.mem_bandwidth_gbps * 1e9 * g.bandwidth_efficiency
    launch = 12 * g.launch_overhead_us * 1e-6
    h, inter, layers, vocab = 4096, 14336, 32, 128256
    q, kv = 32 * 128, 8 * 128
    params = h * q + 2 * h * kv + q * h + 3 * h * inter  # projections + SwiGLU MLP
    layer_bytes = (params + 2 * h) * 2  # + two RMSNorm weights, bf16
    act = 2 * (6 * h + 2 * q + 2 * kv + 3 * inter)  # activations read/written per token
    keys = prompt + 1  # the new token attends to the prompt and itself
    kv_bytes = (keys + 1) * 2 * kv * 2  # read K,V of the keys + write the new token's K,V
    gemm = max(2 * params / peak, (layer_bytes + act) / bw)
    attn = max(4 * 32 * 128 * keys / peak, kv_bytes / bw)
    head = max(2 * h * vocab / peak, (vocab * h * 2 + h * 2) / bw) + launch
    expected = layers * (gemm + attn + launch) + head
    assert abs(steps["duration"].iloc[1] - expected) / expected < 1e-9


def test_event_free_booking_of_uncontended_streams_equals_the_flow_model():
    """The backend books weight streams that run alone without SimPy flows; the
    timings must equal those of the flow model to rounding."""
    runs = []
    for book in (True, False):
        setup = build_sim(make_cfg("workload.num_requests=30", "workload.concurrency=8", "report.enabled=false"))
        for b in setup.driver.backends:
            b.book_uncontended = book
        setup.driver.run()
        runs.append(setup.recorder.frames()[1])
    a, b = runs
    assert len(a) == len(b) and a["link_bytes"].sum() > 0
    assert np.allclose(a["duration"], b["duration"], rtol=1e-9, atol=1e-12)
    assert np.allclose(a["stall_s"], b["stall_s"], rtol=1e-9, atol=1e-9)


def test_fetch_lookahead_gates_streaming():
    """A lookahead covering every layer reproduces the unbounded closed form; a
    one-layer lookahead can only be slower; zero is refused."""
    import pytest

    from wicore.errors import ConfigError

    def steps(*o: str):
        setup = build_sim(make_cfg("workload.num_requests=12", "workload.concurrency=4", "report.enabled=false", *o))
        setup.driver.run()
        return setup.recorder.frames()[1]

    free = steps()
    wide = steps("memory.lookahead=64")
    tight = steps("memory.lookahead=1")
    assert np.allclose(free["duration"], wide["duration"], rtol=1e-9)
    assert tight["duration"].sum() >= free["duration"].sum() * (1 - 1e-9)
    with pytest.raises(ConfigError, match="memory.lookahead"):
        steps("memory.lookahead=0")
