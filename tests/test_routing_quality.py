"""routing.quality_table: a run's summary and report state the quality expected at its deep-token share."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.build import build_sim
from experiments.run import run_sim
from tests.conftest import ROOT, make_cfg
from wicore.errors import ConfigError
from wicore.routing_quality import expected_quality

TABLE = ROOT / "benchmarks" / "results" / "mor_quality" / "results.csv"
RUN = ["model=wicore-small", "hardware=h100", "workload.num_requests=24", "workload.concurrency=8",
       "workload.prompt.kind=fixed", "workload.prompt.value=128", "workload.output.kind=fixed",
       "workload.output.value=64", "progress=false", "routing=mor", "routing.scorer=confidence", "routing.cpu_depth=8",
       f"routing.quality_table={TABLE}"]


def test_interpolates_between_measured_points_and_hits_them_exactly():
    table = pd.DataFrame({"scorer": ["s"] * 3, "cpu_depth": [4] * 3, "gpu_depth": [12] * 3,
                          "deep_fraction": [0.0, 0.5, 1.0], "agreement": [0.6, 0.8, 1.0],
                          "ppl_change_pct": [30.0, 10.0, 0.0]})
    assert expected_quality(table, "s", 4, 12, 0.5)["agreement"] == 0.8
    q = expected_quality(table, "s", 4, 12, 0.25)
    assert q["agreement"] == pytest.approx(0.7) and q["ppl_change_pct"] == pytest.approx(20.0)
    assert expected_quality(table, "s", 2, 12, 0.5) is None  # no curve for that depth
    assert expected_quality(table, "s", 4, 12, float("nan")) is None  # nothing routed


@pytest.mark.parametrize("threshold", ["0", "1"])
def test_run_summary_and_report_state_the_expected_quality(tmp_path, threshold):
    summary = run_sim(make_cfg(*RUN, f"routing.threshold={threshold}"), tmp_path)
    q = json.loads((tmp_path / "summary.json").read_text())["routing_quality"]
    assert q == summary["routing_quality"]
    rows = pd.read_csv(TABLE)
    curve = rows[(rows.scorer == "confidence") & (rows.cpu_depth == 8) & (rows.gpu_depth == 12)]
    end = curve.sort_values("deep_fraction").iloc[-1 if threshold == "0" else 0]  # all deep / all shallow
    assert q["agreement"] == pytest.approx(end["agreement"])
    assert q["ppl_change_pct"] == pytest.approx(end["ppl_change_pct"])
    assert "next-token agreement" in (tmp_path / "report.md").read_text()


def test_a_missing_or_malformed_table_fails_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="routing.quality_table"):
        build_sim(make_cfg(*RUN[:-1], f"routing.quality_table={tmp_path / 'nope.csv'}"))
    bad = tmp_path / "bad.csv"
    bad.write_text("scorer,agreement\nx,1\n")
    with pytest.raises(ConfigError, match="lacks column"):
        build_sim(make_cfg(*RUN[:-1], f"routing.quality_table={bad}"))
