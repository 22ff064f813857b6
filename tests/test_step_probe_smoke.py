"""benchmarks/step_probe.py --cpu: every case of a point runs with and without the attention mass, and the
table, CSV and JSON are written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import step_probe  # noqa: E402


def test_cpu_probe_times_the_four_ways(tmp_path, torch_one_thread, capsys):
    assert step_probe.main(["--cpu", "--out", str(tmp_path), "--reps", "3",
                            "--points", "tiny-gemma3:fp32:128:2:40"]) == 0
    rows = json.loads((tmp_path / "step_probe.json").read_text())["rows"]
    cases = {"profile", "profile-steady", "run-sized", "engine"}
    assert {(r["case"], r["mass"]) for r in rows} == {(c, m) for c in cases for m in (False, True)}
    assert all(r["steps"] == 3 and 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] for r in rows)
    pages = 2 * -(-41 // 16)  # two rows at context 40 (and a few tokens more through the engine)
    assert all((r["mass_entries"] >= pages) if r["mass"] else r["mass_entries"] == 0 for r in rows)
    assert len((tmp_path / "step_probe.csv").read_text().splitlines()) == 1 + len(rows)
    assert "| tiny-gemma3 | fp32 | 2 | 40 | True | engine | 3 |" in capsys.readouterr().out
    assert step_probe.main(["--cpu", "--out", str(tmp_path), "--points", "tiny-gemma3:fp32"]) == 2
