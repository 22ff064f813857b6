"""Tests for wicore/report.py and wicore/sweep.py on small synthetic result folders."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from wicore.metrics import REQUEST_COLUMNS, STEP_COLUMNS, TIER_COLUMNS
from wicore.report import _reading, fmt, write_report
from wicore.sweep import _pareto, summarize_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIB = 2**30
PLOTS = ("latency_cdf.png", "timeline.png", "memory.png", "step_breakdown.png")
TARGETS: list[dict[str, Any]] = [
    {"target": "Throughput", "goal": "100–150 tokens/s", "unit": "tokens/s", "value": 123.4, "bound": 456.7,
     "met": True, "bound_met": True, "note": "decode bound"},
    {"target": "First-token latency", "goal": "50–100 ms", "unit": "ms", "value": 250.0, "bound": 80.0,
     "met": False, "bound_met": True, "note": "queueing"},
    {"target": "Concurrency", "goal": "≥ 64 requests", "unit": "requests", "value": 12.0, "bound": 40.0,
     "met": False, "bound_met": False, "note": "KV cache too small"},
    {"target": "Memory utilisation", "goal": "≥ 85 %", "unit": "%", "value": float("nan"), "bound": 97.0,
     "met": False, "bound_met": True, "note": ""},
]


def make_frames(n_req: int = 200, seed: int = 0, rate: float = 5.0, replicas: int = 1,
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Plausible requests / steps / tiers tables with the exact metrics schema."""
    rng = np.random.default_rng(seed)
    arrival = np.cumsum(rng.exponential(1 / rate, n_req))
    out = rng.integers(20, 300, n_req)
    queue = rng.exponential(0.05 * rate, n_req)
    ttft = queue + rng.lognormal(np.log(0.04), 0.4, n_req)
    tpot = rng.lognormal(np.log(0.025 + 0.002 * rate), 0.2, n_req)
    e2e = ttft + tpot * (out - 1)
    status = np.where(rng.random(n_req) < 0.05, "aborted", "finished")
    fin = np.where(status == "finished", arrival + e2e, -1.0)
    req = pd.DataFrame({
        "request_id": np.arange(n_req), "replica": np.arange(n_req) % replicas, "arrival_time": arrival,
        "prompt_tokens": rng.integers(50, 1000, n_req), "max_output_tokens": out, "output_tokens": out,
        "priority": 0, "status": status, "abort_reason": np.where(status == "aborted", "deadline", ""),
        "queue_delay": queue, "ttft": ttft, "tpot": tpot, "itl_p50": tpot, "itl_p99": 2 * tpot,
        "itl_max": 3 * tpot, "e2e": e2e, "finish_time": fin, "preemptions": rng.integers(0, 2, n_req),
    })[REQUEST_COLUMNS]
    for c in ("ttft", "tpot", "e2e", "queue_delay"):
        req.loc[status == "aborted", c] = np.nan
    end = float(fin.max())
    rows: list[dict[str, Any]] = []
    tier_rows: list[dict[str, Any]] = []
    cap = 80 * GIB
    for rep in range(replicas):
        t, sid = 0.0, 0
        while t < end:
            active = int(((arrival <= t) & (arrival + e2e > t)).sum())
            prefill = int(rng.random() < 0.15) * int(rng.integers(100, 2000))
            decode = max(active, 1)
            comp = 0.015 + 1e-5 * prefill + 1e-4 * decode
            stall = 0.01 * rng.random()
            dur = comp + stall + 0.002 * rng.random()
            rows.append({"step_id": sid, "replica": rep, "start": t, "end": t + dur, "duration": dur,
                         "batch_size": decode + (prefill > 0), "num_tokens": prefill + decode,
                         "prefill_tokens": prefill, "decode_tokens": decode, "compute_s": comp,
                         "transfer_s": stall, "stall_s": stall, "flops": 2e9 * (prefill + decode),
                         "hbm_bytes": 16e9, "link_bytes": 0, "kv_pages_used": 10 * active,
                         "waiting": int(rng.integers(0, 5)), "running": active, "preempted": 0})
            if sid % 20 == 0:
                tier_rows.append({"time": t, "replica": rep, "tier": "gpu0",
                                  "used_bytes": int((40 + 0.5 * active) * GIB), "capacity_bytes": cap})
            t += dur
            sid += 1
        tier_rows.append({"time": 0.0, "replica": rep, "tier": "cpu", "used_bytes": 20 * GIB,
                          "capacity_bytes": 256 * GIB})
    steps = pd.DataFrame(rows, columns=STEP_COLUMNS)
    tiers = pd.DataFrame(tier_rows, columns=TIER_COLUMNS).sort_values("time", kind="stable")
    return req, steps, tiers


def make_summary(req: pd.DataFrame, steps: pd.DataFrame, rate: float = 5.0) -> dict[str, Any]:
    done = req[req["status"] == "finished"]
    span = float(req["finish_time"].max() - req["arrival_time"].min())
    s: dict[str, Any] = {
        "requests": float(len(req)), "finished": float(len(done)),
        "aborted": float((req["status"] == "aborted").sum()), "duration_s": span,
        "output_tokens": float(req["output_tokens"].sum()),
        "output_tokens_per_s": float(req["output_tokens"].sum()) / span,
        "total_tokens_per_s": float(req["output_tokens"].sum() + done["prompt_tokens"].sum()) / span,
        "requests_per_s": len(done) / span, "goodput_requests_per_s": 0.8 * len(done) / span,
        "slo_attainment": 0.8, "mean_batch_size": float(steps["batch_size"].mean()),
        "max_running": float(steps["running"].max()), "mean_running": float(steps["running"].mean()),
        "gpu_mem_util_mean": 0.6, "gpu_mem_util_peak": 0.9, "mfu": 0.05, "mbu": 0.4,
        "stall_fraction": float(steps["stall_s"].sum() / steps["duration"].sum()),
        "preemptions": 3.0, "steps": float(len(steps)), "itl_p99": 0.05,
    }
    for name in ("ttft", "tpot", "e2e", "queue_delay"):
        for q in (50, 90, 99):
            s[f"{name}_p{q}"] = float(np.nanpercentile(done[name], q))
        s[f"{name}_mean"] = float(done[name].mean())
    s["run"] = {"hardware": "h100", "model": "llama3.1-8b", "dtype": "bf16", "batching": "continuous",
                "parallel": "tp1", "workload": f"poisson-{rate}", "backend": "sim", "seed": 0,
                "wall_s": 1.234, "sim_events": 4567}
    return s


def make_run(run_dir: Path, *, optional: bool = True, seed: int = 0, rate: float = 5.0,
             replicas: int = 1) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    req, steps, tiers = make_frames(seed=seed, rate=rate, replicas=replicas)
    for name, df in (("requests", req), ("steps", steps), ("tiers", tiers)):
        df.to_parquet(run_dir / f"{name}.parquet", index=False)
    (run_dir / "summary.json").write_text(json.dumps(make_summary(req, steps, rate)))
    if optional:
        (run_dir / "targets.json").write_text(json.dumps(TARGETS, ensure_ascii=False), encoding="utf-8")
        (run_dir / "placement.json").write_text(json.dumps(
            {"weights_per_gpu_gib": 14.96, "resident_weights_per_gpu_gib": 14.96,
             "streamed_per_step_per_gpu_gib": 0.0, "kv_budget_per_gpu_gib": 50.1, "kv_pages": 25600,
             "kv_tokens": 409600, "offloaded_gib": 0.0}))
        (run_dir / "config.yaml").write_text("hardware: h100\n")
        (run_dir / "trace.json").write_text('{"traceEvents": []}')
    return run_dir


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path


def test_fmt() -> None:
    assert fmt(float("nan")) == "–"
    assert fmt(None) == "–"
    assert fmt(123.456) == "123"
    assert fmt(0.012345) == "0.0123"
    assert fmt(12345.6) == "12,346"
    assert fmt(999.8) == "1,000"
    assert fmt(7) == "7"
    assert fmt(True) == "yes" and fmt(False) == "no"


def test_report_full(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    path = write_report(run)
    assert path == run / "report.md"
    md = path.read_text(encoding="utf-8")
    for p in PLOTS:
        assert_png(run / "plots" / p)
        assert f"](plots/{p})" in md
    assert "| Target | Goal | This run | Physical limit (roofline) | Met? | Reachable at all? | Note |" in md
    row = "| Throughput | 100–150 tokens/s | 123 tokens/s | 457 tokens/s | yes | yes | decode bound |"
    assert row in md
    assert "| First-token latency | 50–100 ms | 250 ms | 80 ms | no | yes | queueing |" in md
    row = "| Concurrency | ≥ 64 requests | 12 requests | 40 requests | no | no | KV cache too small |"
    assert row in md
    assert "| Memory utilisation | ≥ 85 % | – | 97 % | no | yes |  |" in md
    assert "h100 / llama3.1-8b / continuous" in md.splitlines()[0]
    assert "targets.json marks 1 of 4 targets met (Throughput)" in md
    assert "(Concurrency)" in md  # the unreachable one is named
    assert "| KV pages | 25,600 |" in md and "| Weights per GPU (GiB) | 15 |" in md
    assert "[config.yaml](config.yaml)" in md and "ui.perfetto.dev" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)


def test_reading_never_claims_unmet_target() -> None:
    req, steps, _ = make_frames(n_req=40)
    summary = make_summary(req, steps)
    text = _reading(summary, steps, [dict(t, met=False) for t in TARGETS], None, "sim")
    assert "targets.json marks 0 of 4 targets met;" in text
    assert "(Throughput)" not in text
    placement = {"offloaded_gib": 3.5, "streamed_per_step_per_gpu_gib": 1.75}
    text = _reading(summary, steps, TARGETS, placement, "sim")
    assert "marks 1 of 4 targets met (Throughput)" in text and "3.5 GiB of weights" in text
    assert "simulated time" in text and "MBU (40 %) exceeds MFU (5 %)" in text


def test_report_missing_optional_files(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", optional=False, replicas=2)
    summary = json.loads((run / "summary.json").read_text())
    del summary["run"]
    summary["mfu"] = float("nan")
    (run / "summary.json").write_text(json.dumps(summary))
    md = write_report(run).read_text(encoding="utf-8")
    assert "No targets.json" in md
    assert "Memory placement" not in md and "perfetto" not in md
    for p in PLOTS:
        assert_png(run / "plots" / p)


def test_report_empty_tables(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    req, _, _ = make_frames(n_req=5)
    req["status"] = "aborted"
    req["finish_time"] = -1.0
    req.to_parquet(run / "requests.parquet", index=False)
    pd.DataFrame(columns=STEP_COLUMNS).astype(float).to_parquet(run / "steps.parquet", index=False)
    pd.DataFrame({c: pd.Series(dtype="float64" if c != "tier" else "object") for c in TIER_COLUMNS}
                 ).to_parquet(run / "tiers.parquet", index=False)
    (run / "summary.json").write_text(json.dumps({"requests": 5.0, "finished": 0.0, "ttft_p50": None}))
    md = write_report(run).read_text(encoding="utf-8")
    for p in PLOTS:
        assert_png(run / "plots" / p)
    assert "# WiCore run report: empty" in md


def make_job(sweep: Path, name: str, overrides: list[str], *, error: str | None = None,
             rate: float = 5.0, seed: int = 0) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if error is not None:
        (job / "error.txt").write_text(error + "\n")
    else:
        req, steps, _ = make_frames(n_req=60, seed=seed, rate=rate)
        (job / "summary.json").write_text(json.dumps(make_summary(req, steps, rate)))


def test_sweep_with_failure(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for i, rate in enumerate((2.0, 4.0, 8.0)):
        make_job(sweep, str(i), [f"workload.rate={rate}", "hardware=h100"], rate=rate, seed=i)
    err = "CapacityError: model does not fit h100 in any tier: 3.2 GiB short"
    make_job(sweep, "3", ["workload.rate=16.0", "hardware=h100"], error=err)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    md_path = summarize_sweep(sweep)
    df = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(df) == 4
    assert list(df["job"]) == [0, 1, 2, 3]
    assert list(df["status"]) == ["ok", "ok", "ok", "failed"]
    assert df.loc[3, "error"] == err
    assert df["workload.rate"].tolist() == [2.0, 4.0, 8.0, 16.0]
    assert math.isnan(float(df.loc[3, "output_tokens_per_s"]))
    assert (df.loc[:2, "output_tokens_per_s"] > 0).all()
    md = md_path.read_text(encoding="utf-8")
    assert err in md and "3 ok, 1 failed" in md
    for p in ("sweep_throughput.png", "sweep_pareto.png", "sweep_vs_rate.png"):
        assert_png(sweep / "plots" / p)
        assert f"](plots/{p})" in md


def test_sweep_single_job(tmp_path: Path) -> None:
    sweep = tmp_path / "one"
    make_job(sweep, "0", [])
    md = summarize_sweep(sweep).read_text(encoding="utf-8")
    assert len(pd.read_csv(sweep / "sweep_summary.csv")) == 1
    assert "1 jobs: 1 ok, 0 failed" in md
    assert_png(sweep / "plots" / "sweep_throughput.png")
    assert_png(sweep / "plots" / "sweep_pareto.png")
    assert not (sweep / "plots" / "sweep_vs_rate.png").exists()


def test_sweep_all_failed(tmp_path: Path) -> None:
    sweep = tmp_path / "bad"
    make_job(sweep, "0", ["model=big"], error="out of memory")
    make_job(sweep, "1", ["model=huge"], error="out of memory")
    summarize_sweep(sweep)
    df = pd.read_csv(sweep / "sweep_summary.csv")
    assert (df["status"] == "failed").all()


@pytest.mark.parametrize(("x", "y", "front"), [
    ([1, 2, 3], [1, 2, 3], [0, 1, 2]),
    ([1, 2, 3], [3, 2, 1], [0]),
    ([1, 2, 3, 4], [1, 3, 2, 5], [0, 1, 3]),
])
def test_pareto(x: list[float], y: list[float], front: list[int]) -> None:
    assert _pareto(np.array(x, float), np.array(y, float)).tolist() == front
