"""benchmarks/gpu_step_modes.py --cpu-smoke: every case runs, the table and every sample are written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import gpu_step_modes  # noqa: E402


def test_cpu_smoke_times_every_case(tmp_path, torch_one_thread):
    assert gpu_step_modes.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    cases = {"prefill128_eager", "prefill128_graph", "prefill256_eager", "prefill256_graph", "decode1_eager",
             "decode1_graph", "step_prefill128_eager", "step_prefill128_graph"}
    assert set(res["cases"]) == cases and res["reps"] == 3
    for name, r in res["cases"].items():
        assert r["samples"] == 3 and len(res["samples"][name]) == 3
        host, wall = r["host_s"], r["wall_s"]
        assert 0 < host["p10"] <= host["p90"] and wall["p50"] >= host["p50"] * 0.99
        assert 0 <= r["slow_share"] <= 1 and r["p90_over_p10"] >= 1
    assert [n for n, _ in res["order"][:8]] == list(res["cases"])  # round-robin
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {c} |" in table for c in cases)
