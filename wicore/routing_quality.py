"""What MoR routing is expected to cost in output quality, for a run's summary and report.

A run on the simulator produces no tokens, and a run on the real runtime produces no full-depth
reference, so neither can measure routing's quality effect itself. ``benchmarks/mor_quality.py``
measures it once per model (teacher-forced on held-out text: next-token agreement with full depth and
the perplexity change, per scorer, ``cpu_depth``, ``gpu_depth`` and threshold, with the resulting
share of deep tokens). With ``routing.quality_table=<that results.csv>`` a run looks up its scorer,
``cpu_depth`` and ``gpu_depth`` and interpolates agreement and perplexity change at the deep-token
share the run actually had (linear between measured points). The figures describe the model the
table was measured on; the summary names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wicore.errors import ConfigError

COLUMNS = ("scorer", "cpu_depth", "gpu_depth", "deep_fraction", "agreement", "ppl_change_pct")


def load_quality_table(path: str | Path) -> pd.DataFrame:
    """Read and check a quality table (CSV); ConfigError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"routing.quality_table: file '{p}' not found (benchmarks/mor_quality.py writes one: "
                          "results.csv)")
    try:
        df = pd.read_csv(p)
    except (ValueError, OSError) as e:
        raise ConfigError(f"routing.quality_table: {p} is not a readable CSV ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"routing.quality_table: {p} lacks column(s) {missing}; expected {list(COLUMNS)}")
    return df


def expected_quality(table: pd.DataFrame, scorer: str, cpu_depth: int, gpu_depth: int,
                     deep_fraction: float) -> dict[str, Any] | None:
    """Agreement and perplexity change at ``deep_fraction`` for this scorer and depths, or None when the
    table has no curve for them (or the run routed no token)."""
    if deep_fraction != deep_fraction:  # NaN: nothing was routed
        return None
    rows = table[(table["scorer"] == scorer) & (table["cpu_depth"] == cpu_depth)
                 & (table["gpu_depth"] == gpu_depth)].sort_values("deep_fraction")
    if rows.empty:
        return None
    x = rows["deep_fraction"].to_numpy(dtype=float)
    return {"agreement": float(np.interp(deep_fraction, x, rows["agreement"].to_numpy(dtype=float))),
            "ppl_change_pct": float(np.interp(deep_fraction, x, rows["ppl_change_pct"].to_numpy(dtype=float))),
            "deep_fraction": float(deep_fraction), "scorer": scorer, "cpu_depth": int(cpu_depth),
            "gpu_depth": int(gpu_depth), "points": len(rows)}
