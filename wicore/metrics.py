"""Metrics: one schema for the simulator and the real runtime.

Three tables, written as parquet in every result folder:

* ``requests.parquet`` - one row per request (``REQUEST_COLUMNS``): arrival,
  queue delay, TTFT, TPOT, inter-token latency percentiles, E2E, tokens in and
  out, status and abort reason. Times in seconds.
* ``steps.parquet`` - one row per engine step (``STEP_COLUMNS``): start,
  duration, batch size, tokens, compute / transfer / stall time, FLOPs, device
  memory bytes, link bytes, KV pages in use, queue lengths, and the decode
  tokens a token router sent deep / shallow (0 when routing is off).
* ``tiers.parquet`` - memory occupancy per tier over time (``TIER_COLUMNS``).

``summarize`` reduces them to the figures of a report (throughput, latency
percentiles, goodput under an SLO, memory utilisation, MFU / MBU), and
``chrome_trace`` writes a Perfetto-readable timeline of the steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wicore.scheduler.sequence import Sequence
from wicore.types import StepPlan, StepResult

REQUEST_COLUMNS = [
    "request_id", "replica", "arrival_time", "prompt_tokens", "max_output_tokens", "output_tokens",
    "priority", "status", "abort_reason", "queue_delay", "ttft", "tpot", "itl_p50", "itl_p99",
    "itl_max", "e2e", "finish_time", "preemptions",
]
STEP_COLUMNS = [
    "step_id", "replica", "start", "end", "duration", "batch_size", "num_tokens", "prefill_tokens",
    "decode_tokens", "compute_s", "transfer_s", "stall_s", "flops", "hbm_bytes", "link_bytes",
    "kv_pages_used", "waiting", "running", "preempted", "deep_tokens", "shallow_tokens",
]
TIER_COLUMNS = ["time", "replica", "tier", "used_bytes", "capacity_bytes"]


def _quantile(srt: list[float], q: float) -> float:
    """Linear-interpolated quantile of a sorted list (numpy's default method)."""
    pos = q * (len(srt) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(srt) - 1)
    return srt[lo] + (srt[hi] - srt[lo]) * (pos - lo)


class Recorder:
    """Collects rows column-wise (cheap appends; the simulator records every step)."""

    def __init__(self, record_ops: int = 20000) -> None:
        self.req: dict[str, list[Any]] = {c: [] for c in REQUEST_COLUMNS}
        self.steps: dict[str, list[Any]] = {c: [] for c in STEP_COLUMNS}
        self.tier_rows: dict[str, list[Any]] = {c: [] for c in TIER_COLUMNS}
        self.ops: list[tuple[int, int, str, str, float, float, int]] = []
        self.record_ops = record_ops
        self._step_appends = [self.steps[c].append for c in STEP_COLUMNS]
        self._last_tiers: dict[tuple[int, str], int] = {}

    def request(self, seq: Sequence, replica: int) -> None:
        r = self.req
        req = seq.req
        ttft = seq.first_token_time - req.arrival_time if seq.first_token_time >= 0 else np.nan
        out = seq.generated
        e2e = seq.finish_time - req.arrival_time if seq.finish_time >= 0 else np.nan
        tpot = (seq.last_token_time - seq.first_token_time) / (out - 1) if out > 1 else np.nan
        itl = seq.itl
        if itl:
            srt = sorted(itl)
            p50, p99, mx = _quantile(srt, 0.5), _quantile(srt, 0.99), srt[-1]
        else:
            p50 = p99 = mx = np.nan
        qd = seq.first_scheduled - req.arrival_time if seq.first_scheduled >= 0 else np.nan
        for k, v in (("request_id", req.request_id), ("replica", replica), ("arrival_time", req.arrival_time),
                     ("prompt_tokens", req.prompt_tokens), ("max_output_tokens", req.max_output_tokens),
                     ("output_tokens", out), ("priority", req.priority), ("status", seq.status.value),
                     ("abort_reason", seq.abort_reason), ("queue_delay", qd), ("ttft", ttft),
                     ("tpot", tpot), ("itl_p50", p50), ("itl_p99", p99), ("itl_max", mx), ("e2e", e2e),
                     ("finish_time", seq.finish_time), ("preemptions", seq.preemptions)):
            r[k].append(v)
        seq.itl = []

    def step(self, plan: StepPlan, result: StepResult, prefill: int, decode: int, kv_pages: int,
             waiting: int, running: int) -> None:
        deep = shallow = 0
        if plan.routing:
            for d in plan.routing:
                if d.path == "deep":
                    deep += d.num_tokens
                else:
                    shallow += d.num_tokens
        vals = (plan.step_id, plan.replica, result.start, result.end, result.end - result.start,
                len(plan.items), prefill + decode, prefill, decode, result.compute_s, result.transfer_s,
                result.stall_s, result.flops, result.hbm_bytes, result.link_bytes, kv_pages, waiting,
                running, len(plan.preempted), deep, shallow)
        for append, v in zip(self._step_appends, vals):
            append(v)
        if result.ops and len(self.ops) < self.record_ops:
            for op in result.ops:
                self.ops.append((plan.step_id, plan.replica, op.name, op.resource, op.start, op.end, op.nbytes))

    def tiers(self, time: float, replica: int, usage: dict[str, tuple[int, int]]) -> None:
        """Record tier occupancy; only rows whose value changed are stored."""
        t = self.tier_rows
        last = self._last_tiers
        for tier, (used, cap) in usage.items():
            key = (replica, tier)
            if last.get(key) == used:
                continue
            last[key] = used
            t["time"].append(time)
            t["replica"].append(replica)
            t["tier"].append(tier)
            t["used_bytes"].append(used)
            t["capacity_bytes"].append(cap)

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        req = pd.DataFrame(self.req, columns=REQUEST_COLUMNS).sort_values("request_id", kind="stable")
        steps = pd.DataFrame(self.steps, columns=STEP_COLUMNS)
        tiers = pd.DataFrame(self.tier_rows, columns=TIER_COLUMNS)
        return req.reset_index(drop=True), steps, tiers


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 0.1  # first-token latency bound (the design's 50-100 ms target)
    tpot_s: float = 0.1  # time per output token bound


def _pct(series: pd.Series, q: float) -> float:
    s = series.dropna()
    return float(np.percentile(s, q)) if len(s) else float("nan")


def time_weighted_utilisation(tiers: pd.DataFrame, tier_prefix: str, end: float) -> tuple[float, float]:
    """(time-weighted mean, peak) of used/capacity over the tiers whose name starts with prefix."""
    sub = tiers[tiers["tier"].str.startswith(tier_prefix)]
    if sub.empty:
        return float("nan"), float("nan")
    means, peaks = [], []
    for _, g in sub.groupby(["replica", "tier"], sort=True):
        t = g["time"].to_numpy()
        u = (g["used_bytes"] / g["capacity_bytes"]).to_numpy()
        dt = np.diff(np.append(t, max(end, t[-1])))
        total = dt.sum()
        means.append(float((u * dt).sum() / total) if total > 0 else float(u[-1]))
        peaks.append(float(u.max()))
    return float(np.mean(means)), float(np.max(peaks))


def summarize(req: pd.DataFrame, steps: pd.DataFrame, tiers: pd.DataFrame, *, peak_flops: float,
              peak_bw: float, slo: SLO, end_time: float | None = None) -> dict[str, float]:
    """Headline figures of one run. ``peak_flops`` / ``peak_bw``: the whole deployment's
    datasheet peaks (for MFU / MBU)."""
    done = req[req["status"] == "finished"]
    start = float(req["arrival_time"].min()) if len(req) else 0.0
    end = end_time if end_time is not None else float(req["finish_time"].max()) if len(req) else 0.0
    span = max(end - start, 1e-12)
    out_tokens = float(req["output_tokens"].sum())
    good = done[(done["ttft"] <= slo.ttft_s) & (done["tpot"].fillna(0) <= slo.tpot_s)]
    busy = float(steps["duration"].sum()) if len(steps) else 0.0
    gpu_mean, gpu_peak = time_weighted_utilisation(tiers, "gpu", end)
    res = {
        "requests": float(len(req)),
        "finished": float(len(done)),
        "aborted": float((req["status"] == "aborted").sum()),
        "duration_s": span,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / span,
        "total_tokens_per_s": (out_tokens + float(done["prompt_tokens"].sum())) / span,
        "requests_per_s": len(done) / span,
        "goodput_requests_per_s": len(good) / span,
        "slo_attainment": len(good) / len(done) if len(done) else float("nan"),
        "mean_batch_size": float(steps["batch_size"].mean()) if len(steps) else 0.0,
        "max_running": float(steps["running"].max()) if len(steps) else 0.0,
        "mean_running": float(steps["running"].mean()) if len(steps) else 0.0,
        "gpu_mem_util_mean": gpu_mean,
        "gpu_mem_util_peak": gpu_peak,
        "mfu": float(steps["flops"].sum()) / (peak_flops * span) if peak_flops else float("nan"),
        "mbu": float(steps["hbm_bytes"].sum()) / (peak_bw * span) if peak_bw else float("nan"),
        "stall_fraction": float(steps["stall_s"].sum()) / busy if busy else 0.0,
        "preemptions": float(steps["preempted"].sum()) if len(steps) else 0.0,
        "steps": float(len(steps)),
        "deep_token_fraction": _deep_fraction(steps),
    }
    for name in ("ttft", "tpot", "e2e", "queue_delay"):
        for q in (50, 90, 99):
            res[f"{name}_p{q}"] = _pct(done[name], q)
        res[f"{name}_mean"] = float(done[name].mean()) if len(done) else float("nan")
    res["itl_p99"] = _pct(done["itl_p99"], 50)
    return res


def _deep_fraction(steps: pd.DataFrame) -> float:
    """Share of the routed decode tokens that took the deep path; NaN when none was routed (routing off)."""
    if "deep_tokens" not in steps or "shallow_tokens" not in steps:
        return float("nan")
    deep = float(steps["deep_tokens"].sum())
    total = deep + float(steps["shallow_tokens"].sum())
    return deep / total if total > 0 else float("nan")


def write_tables(out: Path, req: pd.DataFrame, steps: pd.DataFrame, tiers: pd.DataFrame) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # fixed writer options so equal runs give byte-identical files
    for name, df in (("requests", req), ("steps", steps), ("tiers", tiers)):
        df.to_parquet(out / f"{name}.parquet", index=False, engine="pyarrow", compression="zstd")


def chrome_trace(path: Path, steps: pd.DataFrame, ops: list[tuple[int, int, str, str, float, float, int]],
                 max_steps: int = 20000) -> None:
    """A Chrome trace (open in ui.perfetto.dev): one track per replica with its
    steps, one per resource with the ops (compute, transfers)."""
    events: list[dict[str, Any]] = []
    pids: dict[str, int] = {}

    def tid(name: str) -> int:
        if name not in pids:
            pids[name] = len(pids) + 1
            events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": pids[name],
                           "args": {"name": name}})
        return pids[name]

    for row in steps.head(max_steps).itertuples(index=False):
        events.append({"ph": "X", "pid": 1, "tid": tid(f"replica{row.replica} steps"),
                       "name": f"step {row.step_id}", "ts": row.start * 1e6, "dur": row.duration * 1e6,
                       "args": {"batch": int(row.batch_size), "tokens": int(row.num_tokens),
                                "prefill": int(row.prefill_tokens), "stall_ms": row.stall_s * 1e3}})
    for step_id, replica, name, resource, start, end, nbytes in ops:
        events.append({"ph": "X", "pid": 1, "tid": tid(f"r{replica} {resource}"), "name": name,
                       "ts": start * 1e6, "dur": (end - start) * 1e6,
                       "args": {"step": step_id, "bytes": nbytes}})
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
