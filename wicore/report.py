"""Markdown report with plots for one run result folder.

``write_report(run_dir)`` reads ``requests/steps/tiers.parquet`` and ``summary.json``
(required) plus ``targets.json``, ``placement.json``, ``config.yaml`` and ``trace.json``
(optional), draws four PNG plots under ``run_dir/plots/`` and writes ``run_dir/report.md``.
Every sentence of the written reading is computed from the data; whether a target is met
comes only from ``targets.json``. ``python -m wicore.report <run_dir>...`` runs it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 110
MEM_TARGET = 0.85  # the design's memory-utilisation target
DASH = "–"
TIME_UNITS = ((86400.0, "days"), (3600.0, "h"), (60.0, "min"), (1.0, "s"))


# ----- formatting ----------------------------------------------------------------------
def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def fmt(x: Any, digits: int = 3) -> str:
    """``digits`` significant digits, thousands separators, NaN/None -> "–", bool -> yes/no."""
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    v = _num(x)
    if math.isnan(v):
        return str(x) if isinstance(x, list | dict | tuple) else DASH
    if isinstance(x, int | np.integer) or abs(float(f"{v:.{digits}g}")) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def pct(x: Any) -> str:
    v = _num(x)
    return DASH if math.isnan(v) else f"{fmt(100 * v)} %"


def ms(x: Any) -> str:
    return fmt(1e3 * _num(x))


def with_unit(x: Any, unit: str) -> str:
    v = fmt(x)
    return v if v == DASH or not unit else f"{v} {unit}"


def dur(x: Any) -> str:
    """A duration in seconds as '12.3 ms', '4.56 s', '18.8 min', '5.07 h' or '2.13 days'."""
    v = _num(x)
    if math.isnan(v) or abs(v) < 1:
        return with_unit(v * 1e3, "ms")
    div, unit = next((d, u) for d, u in TIME_UNITS if abs(v) >= 2 * d or d == 1.0)
    return f"{fmt(v / div)} {unit}"


def time_unit(span_s: float) -> tuple[float, str]:
    """(divisor, name) that keeps a time axis of this span readable."""
    return next((d, u) for d, u in TIME_UNITS if span_s > 3 * d or d == 1.0)


def _label(key: str) -> str:
    """'kv_budget_per_gpu_gib' -> 'KV budget per GPU (GiB)'."""
    unit = ""
    for suf, u in (("_tok_s", "tokens/s"), ("_gib", "GiB"), ("_gb", "GB"), ("_bytes", "bytes"), ("_s", "s")):
        if key.endswith(suf):
            key, unit = key[: -len(suf)], u
            break
    acronyms = {"kv": "KV", "gpu": "GPU", "cpu": "CPU", "ttft": "TTFT", "tpot": "TPOT", "e2e": "E2E"}
    text = " ".join(acronyms.get(w, w) for w in key.split("_"))
    return text[:1].upper() + text[1:] + (f" ({unit})" if unit else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


# ----- plots -----------------------------------------------------------------------------
def _no_data(what: str, *axes: Axes) -> None:
    for ax in axes:
        ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_latency_cdf(req: pd.DataFrame, path: Path) -> None:
    done = req[req["status"] == "finished"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    names = ("Time to first token (TTFT)", "Time per output token (TPOT)", "End-to-end (E2E)")
    for ax, col, name in zip(axes, ("ttft", "tpot", "e2e"), names):
        vals = np.sort(done[col].dropna().to_numpy(dtype=float))
        ax.set_title(name)
        if len(vals) == 0:
            _no_data("finished requests", ax)
            continue
        scale, unit = (1.0, "s") if np.median(vals) >= 10 else (1e3, "ms")
        vals = vals * scale
        y = np.arange(1, len(vals) + 1) / len(vals)
        pick = np.unique(np.linspace(0, len(vals) - 1, min(len(vals), 2000)).astype(int))  # 2000 quantiles
        ax.step(vals[pick], y[pick], where="post", color="C0", label=f"CDF (n={len(vals):,})")
        for q, style, color in ((50, "--", "C1"), (99, ":", "C3")):
            v = float(np.percentile(vals, q))
            ax.axvline(v, ls=style, color=color, label=f"p{q} = {fmt(v)} {unit}")
        pos = vals[vals > 0]
        if len(pos) and pos.max() / pos.min() > 100:
            ax.set_xscale("log")
        ax.set(xlabel=f"{col.upper()} ({unit})", ylabel="fraction of finished requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle("Latency distributions (finished requests)")
    _save(fig, path)


def _bin_state(t: np.ndarray, v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of v per time bin, forward-filled over empty bins (a queue length is a state)."""
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    n = np.bincount(idx, minlength=len(edges) - 1)
    s = np.bincount(idx, weights=v, minlength=len(edges) - 1)
    return pd.Series(np.where(n > 0, s / np.maximum(n, 1), np.nan)).ffill().fillna(0.0).to_numpy()


def _top_legend(ax: Axes, handles: list[Any] | None = None, labels: list[str] | None = None) -> None:
    h, lab = ax.get_legend_handles_labels()
    ax.legend(handles or h, labels or lab, fontsize=8, loc="lower right", bbox_to_anchor=(1, 1), ncol=3,
              frameon=False)


def plot_timeline(req: pd.DataFrame, steps: pd.DataFrame, path: Path, bins: int = 100) -> None:
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    if steps.empty:
        _no_data("steps", ax1, ax2)
        return _save(fig, path)
    t0 = float(steps["start"].min())
    t1 = max(float(steps["end"].max()), float(req["finish_time"].max()) if len(req) else 0.0, t0 + 1e-9)
    edges = np.linspace(t0, t1, bins + 1)
    div, unit = time_unit(t1 - t0)
    mid = 0.5 * (edges[:-1] + edges[1:]) / div
    width = edges[1] - edges[0]
    start = steps["start"].to_numpy(dtype=float)
    batch = _bin_state(start, steps["batch_size"].to_numpy(dtype=float), edges)
    ax1.fill_between(mid, batch, color="C0", alpha=0.25, lw=0, label="batch size (mean per step)")
    running, waiting = np.zeros(bins), np.zeros(bins)
    for _, g in steps.groupby("replica"):  # per replica (a state), then summed
        st = g["start"].to_numpy(dtype=float)
        running += _bin_state(st, g["running"].to_numpy(dtype=float), edges)
        waiting += _bin_state(st, g["waiting"].to_numpy(dtype=float), edges)
    n_rep = steps["replica"].nunique()
    suffix = f" (sum of {n_rep} replicas)" if n_rep > 1 else ""
    ax1.plot(mid, running, label="running requests" + suffix, color="C2")
    ax1.plot(mid, waiting, label="waiting requests" + suffix, color="C3", ls="--")
    ax1.set(ylabel="requests", ylim=(0, None))
    ax1.set_title("Batch and queue over time", loc="left")
    _top_legend(ax1)

    tok, _ = np.histogram(start, bins=edges, weights=steps["num_tokens"].to_numpy(dtype=float))
    dec, _ = np.histogram(start, bins=edges, weights=steps["decode_tokens"].to_numpy(dtype=float))
    ax2.plot(mid, tok / width, label="processed tokens/s (prefill + decode)", color="C0")
    ax2.plot(mid, dec / width, label="decode tokens/s", color="C1")
    ax2.set(ylabel="tokens/s", xlabel=f"time ({unit})", ylim=(0, None))
    ax2.set_title(f"Throughput over time (bins of {dur(width)})", loc="left")
    ax3 = ax2.twinx()
    fin = req.loc[req["status"] == "finished", "finish_time"].to_numpy(dtype=float)
    done, _ = np.histogram(fin, bins=edges)
    smooth = pd.Series(done / width).rolling(5, center=True, min_periods=1).mean()
    ax3.plot(mid, smooth, label="completed requests/s (5-bin mean)", color="C4", ls=":", lw=2)
    ax3.set(ylabel="completed requests/s", ylim=(0, None))
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    _top_legend(ax2, h1 + h2, l1 + l2)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_memory(tiers: pd.DataFrame, end: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.set_title("Memory occupancy per tier")
    if tiers.empty:
        _no_data("tier records", ax)
        return _save(fig, path)
    multi = tiers["replica"].nunique() > 1
    colors = {t: f"C{i % 10}" for i, t in enumerate(sorted(tiers["tier"].astype(str).unique()))}
    div, unit = time_unit(end - float(tiers["time"].min()))
    series: dict[bytes, list[Any]] = {}  # identical curves (e.g. the GPUs of one TP group) share a line
    for (rep, tier), g in tiers.groupby(["replica", "tier"], sort=True):
        g = g.sort_values("time", kind="stable")
        cap = g["capacity_bytes"].to_numpy(dtype=float)
        u = 100 * g["used_bytes"].to_numpy(dtype=float) / np.where(cap > 0, cap, np.nan)
        t = np.append(g["time"].to_numpy(dtype=float), max(end, float(g["time"].iloc[-1]))) / div
        u = np.append(u, u[-1])
        name = f"replica {rep} {tier}" if multi else str(tier)
        key = t.tobytes() + u.tobytes() + cap[-1:].tobytes()
        if key in series:
            series[key][0].append(name)
        else:
            ls = ["-", "--", ":", "-."][int(str(rep)) % 4]
            series[key] = [[name], t, u, cap[-1], colors[str(tier)], ls]
    for names, t, u, cap_last, color, ls in series.values():
        label = " = ".join(names) if len(names) < 4 else f"{names[0]} … {names[-1]} ({len(names)})"
        ax.step(t, u, where="post", label=f"{label} (cap {fmt(cap_last / 2**30)} GiB)", color=color, ls=ls)
    ax.axhline(100 * MEM_TARGET, ls="--", color="k", lw=1, label=f"{100 * MEM_TARGET:.0f} % target")
    frac = tiers["used_bytes"] / tiers["capacity_bytes"].where(tiers["capacity_bytes"] > 0)
    top = float(np.nanmax(frac.to_numpy(dtype=float), initial=0.0))
    ax.set(xlabel=f"time ({unit})", ylabel="used / capacity (%)", ylim=(0, max(105.0, 100 * top + 5)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(series) // 8)
    return _save(fig, path)


def plot_block_residency(blocks: pd.DataFrame, end: float, path: Path, bins: int = 200) -> None:
    """Heat map: for each layer of the first GPU, the share of its weight blocks
    resident on that GPU over time (the rest is in host memory or on NVMe)."""
    gpu = int(blocks["gpu"].min())
    sub = blocks[(blocks["gpu"] == gpu) & (blocks["replica"] == blocks["replica"].min())]
    layers = int(sub["layer"].max()) + 1
    groups = sorted(sub["group"].unique())
    t_end = max(end, float(sub["time"].max()), 1e-9)
    edges = np.linspace(0.0, t_end, bins + 1)
    grid = np.zeros((layers, bins))
    on_gpu = sub["tier"].str.startswith("gpu").to_numpy()
    for (layer, _group), idx in sub.groupby(["layer", "group"]).groups.items():
        g = sub.loc[idx]
        times = g["time"].to_numpy()
        state = on_gpu[sub.index.get_indexer(idx)]
        # state after each change, sampled at the bin starts
        pos = np.searchsorted(times, edges[:-1], side="right") - 1
        vals = np.where(pos >= 0, state[np.clip(pos, 0, None)], 0.0)
        grid[int(layer)] += vals / len(groups)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    scale, unit = time_unit(t_end)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                   extent=(0, t_end / scale, -0.5, layers - 0.5), interpolation="nearest")
    ax.set_xlabel(f"time ({unit})")
    ax.set_ylabel("layer")
    ax.set_title(f"Weight blocks resident on GPU {gpu}\n(1 = all of the layer's blocks; the rest is "
                 "fetched from host memory / NVMe when needed)", fontsize=10)
    fig.colorbar(im, ax=ax, label="share resident on GPU")
    _save(fig, path)


def plot_step_breakdown(steps: pd.DataFrame, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    if steps.empty:
        _no_data("steps", ax1, ax2)
        return _save(fig, path)
    kinds = {k: v for k, v in (("prefill-containing", steps[steps["prefill_tokens"] > 0]),
                               ("decode-only", steps[steps["prefill_tokens"] <= 0])) if len(v)}
    parts = {"compute": [v["compute_s"].mean() * 1e3 for v in kinds.values()],
             "stall (waiting for data)": [v["stall_s"].mean() * 1e3 for v in kinds.values()],
             "other / queue": [(v["duration"] - v["compute_s"] - v["stall_s"]).clip(lower=0).mean() * 1e3
                               for v in kinds.values()]}
    x = np.arange(len(kinds))
    bottom = np.zeros(len(kinds))
    total = max(float(np.sum(list(parts.values()), axis=0).max()), 1e-12)
    for (lab, vals), col in zip(parts.items(), ("C0", "C3", "C7")):
        ax1.bar(x, vals, 0.55, bottom=bottom, label=lab, color=col)
        for xi, b, v in zip(x, bottom, vals):
            if v > 0.08 * total:
                ax1.text(xi, b + v / 2, fmt(v), ha="center", va="center", fontsize=8, color="w")
        bottom += np.asarray(vals)
    for xi, tot in zip(x, bottom):
        ax1.text(xi, tot, f"{fmt(tot)} ms", ha="center", va="bottom", fontsize=9)
    ax1.set_xticks(x, [f"{k}\n(n={len(v):,})" for k, v in kinds.items()])
    ax1.set(ylim=(0, total * 1.3), ylabel="mean time per step (ms)", title="Step-time breakdown")
    ax1.legend(fontsize=8, loc="upper center", ncol=3)
    ax1.grid(axis="y", alpha=0.3)

    d_all = steps["duration"].to_numpy(dtype=float) * 1e3
    pos = d_all[d_all > 0]
    log = len(pos) > 0 and pos.max() / pos.min() > 100
    edges = (np.geomspace(pos.min(), pos.max(), 60) if log
             else np.linspace(d_all.min(), max(d_all.max(), d_all.min() + 1e-9), 60))
    counts = []
    for k, v in kinds.items():
        col = "C1" if k.startswith("prefill") else "C0"
        d = v["duration"].to_numpy(dtype=float) * 1e3
        ax2.hist(d, bins=edges, alpha=0.3, color=col)
        counts.append(ax2.hist(d, bins=edges, histtype="step", lw=1.5, color=col, label=f"{k} steps")[0])
    nz = np.concatenate(counts)
    nz = nz[nz > 0]
    if len(nz) and nz.max() / nz.min() > 100:
        ax2.set_yscale("log")
    if log:
        ax2.set_xscale("log")
    ax2.set(xlabel="step duration (ms)", ylabel="steps", title="Step durations")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _save(fig, path)


# ----- markdown ----------------------------------------------------------------------------
def _targets_table(targets: list[dict[str, Any]]) -> str:
    rows = [[str(t.get("target", "")), str(t.get("goal", "")), with_unit(t.get("value"), t.get("unit", "")),
             with_unit(t.get("bound"), t.get("unit", "")), fmt(bool(t.get("met", False))),
             fmt(bool(t.get("bound_met", False))), str(t.get("note", ""))] for t in targets]
    return md_table(["Target", "Goal", "This run", "Physical limit (roofline)", "Met?", "Reachable at all?",
                     "Note"], rows)


def _metrics_table(s: dict[str, Any]) -> str:
    def trio(name: str) -> str:
        vals = [s.get(f"{name}_p{q}") for q in (50, 90, 99)]
        return DASH if all(math.isnan(_num(v)) for v in vals) else " / ".join(ms(v) for v in vals)

    g = s.get
    rows = [
        ["Output throughput", with_unit(g("output_tokens_per_s"), "tokens/s")],
        ["Total throughput (prompt + output)", with_unit(g("total_tokens_per_s"), "tokens/s")],
        ["Completed requests/s", fmt(g("requests_per_s"))],
        ["Goodput (requests/s within SLO)", f"{fmt(g('goodput_requests_per_s'))} "
                                            f"({pct(g('slo_attainment'))} of finished)"],
        *[[f"{lab} p50 / p90 / p99 (ms)", trio(k)]
          for k, lab in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"), ("queue_delay", "Queue delay"))],
        ["Mean batch size", fmt(g("mean_batch_size"))],
        ["Running requests mean / max", f"{fmt(g('mean_running'))} / {fmt(g('max_running'))}"],
        ["GPU memory utilisation mean / peak",
         f"{pct(g('gpu_mem_util_mean'))} / {pct(g('gpu_mem_util_peak'))}"],
        ["MFU", pct(g("mfu"))],
        ["MBU", pct(g("mbu"))],
        ["Stall fraction of step time", pct(g("stall_fraction"))],
        ["Preemptions", fmt(g("preemptions"))],
        ["Requests finished / aborted / total",
         f"{fmt(g('finished'))} / {fmt(g('aborted'))} / {fmt(g('requests'))}"],
        ["Duration", f"{with_unit(g('duration_s'), 's')} ({dur(g('duration_s'))})"],
    ]
    return md_table(["Metric", "Value"], rows)


def _reading(s: dict[str, Any], steps: pd.DataFrame, targets: list[dict[str, Any]] | None,
             placement: dict[str, Any] | None, backend: str) -> str:
    clock = "simulated " if backend == "sim" else ""
    out = [f"{fmt(s.get('finished'))} of {fmt(s.get('requests'))} requests finished ({fmt(s.get('aborted'))} "
           f"aborted) in {dur(s.get('duration_s'))} of {clock}time, at {fmt(s.get('output_tokens_per_s'))} "
           f"output tokens/s with a mean batch of {fmt(s.get('mean_batch_size'))}."]
    busy = float(steps["duration"].sum()) if len(steps) else 0.0
    if busy > 0:
        c, st = float(steps["compute_s"].sum()) / busy, float(steps["stall_s"].sum()) / busy
        if st > c and st >= 0.2:
            out.append(f"The run is bound by data movement: stall time (waiting for transfers) is "
                       f"{pct(st)} of step time, compute {pct(c)}.")
        elif c >= 0.5:
            out.append(f"Step time is dominated by compute ({pct(c)}); stalls take {pct(st)}.")
        else:
            out.append(f"Compute is {pct(c)} of step time, stalls {pct(st)} and other overhead "
                       f"{pct(max(0.0, 1 - c - st))}.")
    mfu, mbu = _num(s.get("mfu")), _num(s.get("mbu"))
    if mbu > mfu:  # False when either is NaN
        out.append(f"MBU ({pct(mbu)}) exceeds MFU ({pct(mfu)}): the steps use more of the memory bandwidth "
                   "than of the arithmetic peak.")
    elif mfu > mbu:
        out.append(f"MFU ({pct(mfu)}) exceeds MBU ({pct(mbu)}): the steps use more of the arithmetic peak "
                   "than of the memory bandwidth.")
    tt, qd = _num(s.get("ttft_p50")), _num(s.get("queue_delay_p50"))
    if tt > 0 and not math.isnan(qd):
        verdict = ("queueing dominates first-token latency" if qd / tt > 0.5
                   else "most of it is spent after the request is first scheduled")
        out.append(f"Median TTFT is {dur(tt)}, of which the median queue delay is {dur(qd)} "
                   f"({pct(qd / tt)}): {verdict}.")
    if len(steps) and (steps["waiting"] > 0).any():
        out.append(f"Requests were waiting in the queue during {pct((steps['waiting'] > 0).mean())} of steps "
                   f"(mean queue {fmt(steps['waiting'].mean())}).")
    if not math.isnan(_num(s.get("gpu_mem_util_mean"))):
        out.append(f"GPU memory was {pct(s.get('gpu_mem_util_mean'))} used on average "
                   f"(peak {pct(s.get('gpu_mem_util_peak'))}).")
    if _num(s.get("preemptions")) > 0:
        out.append(f"The scheduler preempted running requests {fmt(s.get('preemptions'))} times.")
    deep_frac = _num(s.get("deep_token_fraction"))
    if not math.isnan(deep_frac):  # token routing (MoR) was on
        n_routed = sum(float(steps[c].sum()) for c in ("deep_tokens", "shallow_tokens") if c in steps)
        out.append(f"Token routing (MoR) sent {pct(deep_frac)} of {fmt(n_routed)} routed decode tokens down "
                   f"the deep path and {pct(1 - deep_frac)} down the shallow one.")
        q = s.get("routing_quality") or {}
        if "agreement" in q:
            out.append(f"At that deep share, the quality table {q.get('table')} (measured teacher-forced on its own "
                       f"model) gives {pct(q['agreement'])} next-token agreement with full depth and a perplexity "
                       f"change of {float(q['ppl_change_pct']):+.1f} %.")
        elif q:
            out.append(f"Routing quality: {q.get('note')}.")
    if placement and _num(placement.get("offloaded_gib")) > 0:
        out.append(f"{fmt(placement.get('offloaded_gib'))} GiB of weights do not fit on the GPUs and "
                   f"{fmt(placement.get('streamed_per_step_per_gpu_gib'))} GiB per GPU are streamed in "
                   "every step.")
    if targets:
        met = [str(t.get("target")) for t in targets if t.get("met")]
        unreachable = [str(t.get("target")) for t in targets if not t.get("bound_met")]
        txt = f"targets.json marks {len(met)} of {len(targets)} targets met"
        txt += f" ({', '.join(met)})" if met else ""
        if unreachable:
            txt += (f"; {len(unreachable)} cannot be met even at the physical (roofline) limit of this "
                    f"configuration ({', '.join(unreachable)})")
        out.append(txt + ".")
    else:
        out.append("No targets.json: targets were not evaluated.")
    return " ".join(out)


def _cost_sources_line(src: Any) -> str:
    """One line from ``cost_sources.json``: which op costs were measured, which are datasheet roofline."""
    if not isinstance(src, dict) or not isinstance(src.get("ops"), dict):
        return ""
    ops: dict[str, Any] = src["ops"]
    measured = [k for k, v in ops.items() if isinstance(v, dict) and v.get("source") == "measured"]
    roofline = [k for k in ops if k not in measured]
    table = (src.get("table") or {}).get("path") if isinstance(src.get("table"), dict) else None
    if not measured:
        why = (f"the calibration table {table} has no timings for {src.get('model')} {src.get('dtype')}"
               if src.get("calibrated") else "no calibration table")
        txt = f"Costs: every op from the datasheet roofline ({why})"
    else:
        txt = f"Costs: measured ({table}): {', '.join(measured)}"
        txt += f"; datasheet roofline: {', '.join(roofline)}" if roofline else ""
    link = (src.get("links") or {}).get("pcie.bandwidth_gbps")
    if isinstance(link, dict) and str(link.get("source", "")).startswith("measured"):
        txt += f"; host->GPU link: {fmt(link.get('value'))} GB/s measured"
    return txt + "; details in cost_sources.json."


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/plots/*.png`` and ``run_dir/report.md``; return the report path."""
    run_dir = Path(run_dir)
    req, steps, tiers = (pd.read_parquet(run_dir / f"{n}.parquet") for n in ("requests", "steps", "tiers"))
    summary: dict[str, Any] = _read_json(run_dir / "summary.json") or {}
    run: dict[str, Any] = summary.get("run") or {}
    targets = _read_json(run_dir / "targets.json")
    targets = targets if isinstance(targets, list) and targets else None
    placement = _read_json(run_dir / "placement.json")
    placement = placement if isinstance(placement, dict) and placement else None

    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    ends = [_num(df[c].max()) for df, c in ((steps, "end"), (req, "finish_time"), (tiers, "time")) if len(df)]
    end = max([e for e in ends if not math.isnan(e)], default=0.0)
    figs = [("latency_cdf.png", "Latency CDFs"), ("timeline.png", "Batch, queue and throughput over time"),
            ("memory.png", "Memory occupancy per tier"), ("step_breakdown.png", "Step-time breakdown")]
    plot_latency_cdf(req, plots / figs[0][0])
    plot_timeline(req, steps, plots / figs[1][0])
    plot_memory(tiers, end, plots / figs[2][0])
    plot_step_breakdown(steps, plots / figs[3][0])
    if (run_dir / "blocks.parquet").exists():
        blocks = pd.read_parquet(run_dir / "blocks.parquet")
        if len(blocks):
            figs.append(("blocks.png", "Where the weight blocks live (GPU 0)"))
            plot_block_residency(blocks, end, plots / figs[-1][0])

    title = " / ".join(str(run[k]) for k in ("hardware", "model", "batching") if run.get(k)) or run_dir.name
    md = [f"# WiCore run report: {title}", ""]
    if run:
        md += ["## Run", "", md_table(["Fact", "Value"], [[k, fmt(v)] for k, v in run.items()]), ""]
    cost_line = _cost_sources_line(_read_json(run_dir / "cost_sources.json"))
    if cost_line:
        md += [cost_line, ""]
    links = [f"[{n}]({n})" for n in ("config.yaml",) if (run_dir / n).is_file()]
    if (run_dir / "trace.json").is_file():
        links.append("[trace.json](trace.json) (open in https://ui.perfetto.dev)")
    if links:
        md += ["Files: " + ", ".join(links), ""]
    md += ["## Reading", "", _reading(summary, steps, targets, placement, str(run.get("backend", ""))), ""]
    md += ["## Targets", "", _targets_table(targets) if targets else "No targets.json in this run folder.",
           ""]
    md += ["## Headline metrics", "", _metrics_table(summary), ""]
    extra = (("Physical bounds (roofline)", summary.get("bounds")), ("Memory placement", placement))
    for heading, table in extra:
        if isinstance(table, dict) and table:
            rows = [[_label(k), fmt(v)] for k, v in table.items()]
            md += [f"## {heading}", "", md_table(["Quantity", "Value"], rows), ""]
    mem = summary.get("memory")
    if isinstance(mem, dict) and mem:
        pct = ("served_from", "kv_served_from")
        mem_rows = [[_label(k), fmt(100 * v if k.startswith(pct) else v)] for k, v in mem.items()]
        md += ["## Tiered memory (weights)", "",
               "Share of weight-block accesses served by each tier (gpu = hit; cpu / nvme = fetched from there, "
               "in that tier's format) and bytes moved from each lower tier. Where every block lives over time: "
               "`blocks.parquet` (a row per change); KV pages, when tiered: `kv_pages.parquet`. "
               "`kv skipped mass per query` is the attention mass sparse attention left out (its error).", "",
               md_table(["Quantity", "Value (%, GB)"], mem_rows), ""]
    link_stats = summary.get("links")
    if isinstance(link_stats, dict) and link_stats:
        link_rows = [[name, fmt(v.get("bytes", 0) / 1e9), fmt(v.get("busy_s")),
                      fmt(100 * v.get("utilisation", 0))] for name, v in link_stats.items()]
        md += ["## Links", "", "Bytes moved and busy time per link (a link is busy while any transfer is on it; "
               "concurrent transfers share its bandwidth).", "",
               md_table(["Link", "Moved (GB)", "Busy (s)", "Busy (% of run)"], link_rows), ""]
    md += ["## Plots", ""]
    for name, caption in figs:
        md += [f"### {caption}", "", f"![{caption}](plots/{name})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(write_report(Path(arg)))
