"""Where a run's time goes, from its ``steps`` table, and how two runs of one config differ.

Every engine step is one row of ``steps.parquet`` on both backends. Steps are grouped by
*kind* (``prefill`` = the step holds prefill tokens, ``decode`` = decode only) and by batch
size bucket; the time a replica spends outside any step (scheduling on the host, waiting for
arrivals) is its own component. For one config run on both backends:

* ``time_decomposition(sim, real)``: per component, total seconds on each backend and the
  difference. The components add up to the run time, so the differences add up to the
  run-time error (in replica-seconds), and the largest one says which kind of step the
  simulator gets wrong.
* ``step_costs(run)``: a small linear cost model fitted to the steps: decode step =
  fixed + per-sequence, prefill step = fixed + per-token; plus transfer bandwidth
  (``link_bytes / transfer_s``), stall share and the share of time outside steps.

Pure pandas / numpy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from wicore.results import Run

BUCKETS: tuple[tuple[int, float, str], ...] = (
    (1, 1, "1"), (2, 4, "2-4"), (5, 8, "5-8"), (9, 16, "9-16"), (17, 32, "17-32"), (33, math.inf, "33+"))
OUTSIDE = "outside steps"
KIND_LABEL = {"prefill": "prefill-containing", "decode": "decode-only"}


def batch_bucket(batch: pd.Series) -> pd.Series:
    """Batch-size bucket label of each step ('1', '2-4', ..., '33+')."""
    b = pd.to_numeric(batch, errors="coerce").to_numpy(dtype=float)
    out = np.full(len(b), "", dtype=object)
    for lo, hi, label in BUCKETS:
        out[(b >= lo) & (b <= hi)] = label
    return pd.Series(out, index=batch.index)


def step_groups(steps: pd.DataFrame) -> pd.DataFrame:
    """Per (kind, bucket): steps, mean and total duration, mean compute / transfer / stall
    seconds, and the link bytes and transfer seconds summed."""
    cols = ["kind", "bucket", "steps", "mean_s", "total_s", "compute_s", "transfer_s", "stall_s",
            "link_bytes", "transfer_total_s"]
    if steps.empty:
        return pd.DataFrame(columns=cols)
    df = steps.assign(kind=np.where(steps["prefill_tokens"] > 0, "prefill", "decode"),
                      bucket=batch_bucket(steps["batch_size"]))
    g = df.groupby(["kind", "bucket"], sort=False)
    out = pd.DataFrame({
        "steps": g.size(), "mean_s": g["duration"].mean(), "total_s": g["duration"].sum(),
        "compute_s": g["compute_s"].mean(), "transfer_s": g["transfer_s"].mean(),
        "stall_s": g["stall_s"].mean(), "link_bytes": g["link_bytes"].sum(),
        "transfer_total_s": g["transfer_s"].sum()}).reset_index()
    order = {lab: i for i, (_, _, lab) in enumerate(BUCKETS)}
    out = out.assign(_k=out["kind"].map({"prefill": 0, "decode": 1}), _b=out["bucket"].map(order))
    return out.sort_values(["_k", "_b"]).drop(columns=["_k", "_b"]).reset_index(drop=True)[cols]


def replica_seconds(run: Run) -> float:
    """Run duration times the number of replicas that recorded steps (at least one)."""
    reps = run.steps["replica"].nunique() if len(run.steps) else 1
    return run.metric("duration_s") * max(int(reps), 1)


def outside_steps_s(run: Run) -> float:
    """Replica-seconds of the run not spent inside a step (host-side engine loop, idle, waiting)."""
    busy = float(run.steps["duration"].sum()) if len(run.steps) else 0.0
    return max(replica_seconds(run) - busy, 0.0)


def compare_steps(sim: Run, real: Run) -> pd.DataFrame:
    """Per (kind, bucket) present on either side: step counts, mean step time (ms) on each
    backend and its relative error, total seconds on each and ``delta_s`` = sim - real."""
    a, b = step_groups(sim.steps), step_groups(real.steps)
    m = a.merge(b, on=["kind", "bucket"], how="outer", suffixes=("_sim", "_real"))
    out = pd.DataFrame({
        "kind": m["kind"], "bucket": m["bucket"],
        "sim_steps": m["steps_sim"].fillna(0).astype(int), "real_steps": m["steps_real"].fillna(0).astype(int),
        "sim_mean_ms": m["mean_s_sim"] * 1e3, "real_mean_ms": m["mean_s_real"] * 1e3,
        "sim_total_s": m["total_s_sim"].fillna(0.0), "real_total_s": m["total_s_real"].fillna(0.0)})
    out["mean_rel_err"] = (out["sim_mean_ms"] - out["real_mean_ms"]) / out["real_mean_ms"]
    out["delta_s"] = out["sim_total_s"] - out["real_total_s"]
    return out


def time_decomposition(sim: Run, real: Run) -> pd.DataFrame:
    """Components (each step group, then time outside steps) with ``sim_s``, ``real_s``,
    ``delta_s`` = sim - real and ``share`` = |delta| / sum of |delta| over components.
    The deltas sum to the difference in replica-seconds of the two runs."""
    steps = compare_steps(sim, real)
    rows = [{"component": f"{KIND_LABEL[str(r.kind)]} steps, batch {r.bucket}", "kind": str(r.kind),
             "bucket": str(r.bucket), "sim_s": float(r.sim_total_s), "real_s": float(r.real_total_s)}
            for r in steps.itertuples(index=False)]
    rows.append({"component": f"{OUTSIDE} (host loop, idle)", "kind": "outside", "bucket": "",
                 "sim_s": outside_steps_s(sim), "real_s": outside_steps_s(real)})
    df = pd.DataFrame(rows)
    df["delta_s"] = df["sim_s"] - df["real_s"]
    tot = float(df["delta_s"].abs().sum())
    df["share"] = df["delta_s"].abs() / tot if tot > 0 else 0.0
    return df


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of a least-squares line; slope NaN when x does not vary."""
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(np.unique(x)) < 2:
        return float(np.mean(y)), float("nan")
    slope, intercept = np.polyfit(x.astype(float), y.astype(float), 1)
    return float(intercept), float(slope)


def step_costs(run: Run) -> dict[str, float]:
    """Fitted step costs of one run (NaN where the run has no such steps):
    ``decode_fixed_ms`` + ``decode_per_seq_ms`` x batch for decode-only steps,
    ``prefill_fixed_ms`` + ``prefill_per_token_us`` x tokens for prefill-containing steps,
    ``transfer_gbps`` (link bytes / transfer seconds over steps that moved bytes),
    ``stall_share`` (stall / step time) and ``outside_share`` (time outside steps / run time)."""
    st = run.steps
    out: dict[str, float] = {}
    dec = st[st["prefill_tokens"] <= 0] if len(st) else st
    pre = st[st["prefill_tokens"] > 0] if len(st) else st
    a, b = _linear_fit(dec["batch_size"].to_numpy(), dec["duration"].to_numpy()) if len(dec) else (
        float("nan"), float("nan"))
    out["decode_fixed_ms"], out["decode_per_seq_ms"] = a * 1e3, b * 1e3
    a, b = _linear_fit(pre["num_tokens"].to_numpy(), pre["duration"].to_numpy()) if len(pre) else (
        float("nan"), float("nan"))
    out["prefill_fixed_ms"], out["prefill_per_token_us"] = a * 1e3, b * 1e6
    moved = st[st["link_bytes"] > 0] if len(st) else st
    t = float(moved["transfer_s"].sum()) if len(moved) else 0.0
    out["transfer_gbps"] = float(moved["link_bytes"].sum()) / t / 1e9 if t > 0 else float("nan")
    busy = float(st["duration"].sum()) if len(st) else 0.0
    out["stall_share"] = float(st["stall_s"].sum()) / busy if busy > 0 else float("nan")
    span = replica_seconds(run)
    out["outside_share"] = outside_steps_s(run) / span if span > 0 else float("nan")
    return out


COST_LABELS: dict[str, str] = {
    "decode_fixed_ms": "decode step, fixed part (ms)",
    "decode_per_seq_ms": "decode step, per sequence (ms)",
    "prefill_fixed_ms": "prefill step, fixed part (ms)",
    "prefill_per_token_us": "prefill step, per token (µs)",
    "transfer_gbps": "weight/KV transfers, effective bandwidth (GB/s)",
    "stall_share": "stall (waiting for transfers) / step time",
    "outside_share": "time outside steps / run time",
}


def compare_costs(sim: Run, real: Run) -> list[dict[str, Any]]:
    """``step_costs`` of both runs side by side: quantity, sim, real, sim / real."""
    a, b = step_costs(sim), step_costs(real)
    rows = []
    for k in COST_LABELS:
        s, r = a[k], b[k]
        ratio = s / r if math.isfinite(s) and math.isfinite(r) and r != 0 else float("nan")
        rows.append({"quantity": k, "sim": s, "real": r, "ratio": ratio})
    return rows
