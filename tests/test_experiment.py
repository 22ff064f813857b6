"""End to end: the Hydra entry point, result folders, determinism, bad configs, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from experiments.run import run_sim
from tests.conftest import ROOT, make_cfg

SMALL = ["workload.num_requests=40", "workload.concurrency=8", "progress=false"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "run_experiment.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_same_config_and_seed_give_identical_parquet(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_sim(make_cfg(*SMALL, "report.enabled=false"), out)
        outs.append(out)
    for table in ("requests", "steps", "tiers"):
        a = (outs[0] / f"{table}.parquet").read_bytes()
        b = (outs[1] / f"{table}.parquet").read_bytes()
        assert a == b, table
    other = tmp_path / "c"
    run_sim(make_cfg(*SMALL, "report.enabled=false", "seed=1"), other)
    assert (other / "requests.parquet").read_bytes() != (outs[0] / "requests.parquet").read_bytes()


def test_reference_run_writes_a_complete_result_folder(tmp_path):
    res = _cli(*SMALL, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    for f in ("config.yaml", "requests.parquet", "steps.parquet", "tiers.parquet", "summary.json",
              "targets.json", "trace.json", "report.md"):
        assert (run / f).exists(), f
    req = pd.read_parquet(run / "requests.parquet")
    assert len(req) == 40 and (req["status"] == "finished").all()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run"]["hardware"] == "t10x2" and summary["run"]["model"] == "gemma3-27b"
    assert summary["run"]["dtype"] == "fp16"  # T10 has no bf16
    targets = json.loads((run / "targets.json").read_text())
    assert [t["target"] for t in targets] == ["Throughput", "First-token latency", "Concurrent requests",
                                             "Memory utilisation"]
    for t in targets:  # a run never beats its physical limit
        if t["unit"] == "ms":
            assert t["value"] >= t["bound"] * 0.999
        elif t["target"] == "Throughput":
            assert t["value"] <= t["bound"] * 1.001
    trace = json.loads((run / "trace.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])
    report = (run / "report.md").read_text()
    assert "Throughput" in report and "plots/" in report


@pytest.mark.parametrize("override, needle", [
    ("hardware=nope", "hardware"),
    ("workload=poisson workload.rate=-1", "workload.rate"),
    ("model.sliding_window=200000", "model.sliding_window"),
    ("hardware.cpu.dram_gib=1 hardware.nvme.capacity_gib=1", "does not fit"),
    ("scheduler.batching=fancy", "scheduler.batching"),
])
def test_bad_config_fails_at_start_with_one_clear_line(tmp_path, override, needle):
    res = _cli(*override.split(), "progress=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert needle in res.stderr, res.stderr
    assert not (tmp_path / "run" / "requests.parquet").exists()


def test_sweep_runs_in_parallel_and_summarises_even_with_a_failed_job(tmp_path):
    res = _cli("-m", "hardware=t10x2,h100", "model=gemma3-1b", "scheduler.batching=static,continuous",
               "memory.kv_min_gib=2", "workload.num_requests=20", "workload.concurrency=4",
               f"hydra.sweep.dir={tmp_path}/sweep", "hydra.launcher.n_jobs=2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "sweep"
    table = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(table) == 4 and (table["status"] == "ok").all()
    assert (sweep / "sweep_summary.md").exists()
    # a job with a bad value fails alone; the others keep their results
    res = _cli("-m", "model=gemma3-1b", "hardware=h100", "memory.kv_min_gib=1,-1",
               "workload.num_requests=10", f"hydra.sweep.dir={tmp_path}/sweep2", cwd=tmp_path)
    table = pd.read_csv(tmp_path / "sweep2" / "sweep_summary.csv")
    assert sorted(table["status"]) == ["failed", "ok"]
    failed = table[table["status"] == "failed"].iloc[0]
    assert "kv_min_gib" in str(failed["error"])
