"""Workloads: seeded arrivals and lengths, trace replay, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.build import build_sim
from sim.workload import LengthDist, Workload, WorkloadConfig
from tests.conftest import make_cfg
from wicore.errors import ConfigError


def test_poisson_rate_and_seeding():
    cfg = WorkloadConfig(kind="poisson", num_requests=20000, rate=4.0, seed=3)
    a, b = Workload(cfg), Workload(cfg)
    assert np.array_equal(a.arrivals, b.arrivals)
    gaps = np.diff(a.arrivals)
    assert abs(gaps.mean() - 0.25) < 0.01 and abs(gaps.std() / gaps.mean() - 1.0) < 0.03


def test_gamma_burstiness():
    w = Workload(WorkloadConfig(kind="gamma", num_requests=20000, rate=2.0, cv=3.0, seed=1))
    gaps = np.diff(w.arrivals)
    assert abs(gaps.mean() - 0.5) < 0.05 and abs(gaps.std() / gaps.mean() - 3.0) < 0.3


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert (LengthDist("fixed", value=7).sample(5, rng) == 7).all()
    u = LengthDist("uniform", low=3, high=5).sample(1000, rng)
    assert u.min() == 3 and u.max() == 5
    ln = LengthDist("lognormal", median=100, sigma=0.5, min=10, max=400).sample(20000, rng)
    assert abs(np.median(ln) - 100) < 3 and ln.min() >= 10 and ln.max() <= 400
    emp = LengthDist("empirical", values=(1, 2, 3)).sample(300, rng)
    assert set(emp) == {1, 2, 3}


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_trace_replay(tmp_path, fmt):
    rows = [(0.5, 10, 3, 0), (0.0, 20, 2, 1), (1.0, 5, 4, 0)]
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        path.write_text("arrival_time,prompt_tokens,output_tokens,priority\n"
                        + "".join(f"{a},{p},{o},{q}\n" for a, p, o, q in rows))
    else:
        path.write_text("".join(json.dumps(dict(zip(("arrival_time", "prompt_tokens", "output_tokens",
                                                      "priority"), r))) + "\n" for r in rows))
    setup = build_sim(make_cfg("workload=trace", f"workload.trace_path={path}", "hardware=h100",
                               "model=gemma3-1b", "report.enabled=false"))
    setup.driver.run()
    req, _, _ = setup.recorder.frames()
    assert list(req["arrival_time"]) == [0.0, 0.5, 1.0]
    assert list(req["prompt_tokens"]) == [20, 10, 5] and list(req["output_tokens"]) == [2, 3, 4]


@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "poisson", "rate": -1.0}, "workload.rate"),
    ({"kind": "bursty"}, "workload.kind"),
    ({"num_requests": 0}, "workload.num_requests"),
    ({"kind": "trace", "trace_path": "/nonexistent.csv"}, "workload.trace_path"),
    ({"prompt": {"kind": "uniform", "low": 5, "high": 1}}, "workload.prompt"),
    ({"concurrency": 0}, "workload.concurrency"),
])
def test_bad_workloads(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        WorkloadConfig.from_config(kwargs)


def test_closed_loop_keeps_concurrency_users_busy():
    setup = build_sim(make_cfg("hardware=h100", "model=gemma3-1b", "workload.num_requests=60",
                               "workload.concurrency=6", "report.enabled=false"))
    setup.driver.run()
    req, steps, _ = setup.recorder.frames()
    assert len(req) == 60 and steps["running"].max() == 6
    # a user's next request arrives exactly when its previous one finished (think time 0)
    finishes = set(np.round(req["finish_time"], 9))
    later = req[req["arrival_time"] > 0]
    assert all(round(a, 9) in finishes for a in later["arrival_time"])


def test_two_replicas_vs_one_split_model():
    common = ["hardware=t10x2", "model=gemma3-4b", "workload.num_requests=40", "workload.concurrency=8",
              "report.enabled=false"]
    split = build_sim(make_cfg(*common))
    reps = build_sim(make_cfg(*common, "parallel=replicas"))
    assert split.parallel.tp == 2 and reps.parallel.replicas == 2 and reps.parallel.tp == 1
    split.driver.run()
    reps.driver.run()
    r_req, _, _ = reps.recorder.frames()
    assert set(r_req["replica"]) == {0, 1}  # the balancer used both replicas
    counts = r_req["replica"].value_counts()
    assert abs(counts[0] - counts[1]) <= 8
