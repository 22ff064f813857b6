"""Summary of a Hydra multirun folder: one CSV row, table row and plot point per job.

A job is any depth-1 subfolder of the sweep folder holding ``summary.json``
(status ``ok``) or ``error.txt`` (status ``failed``; its one line is the error);
its Hydra overrides (``.hydra/overrides.yaml``, a list of ``key=value``) become
columns. ``summarize_sweep`` writes ``sweep_summary.csv``, ``sweep_summary.md``
and plots under ``plots/``; ``python -m wicore.sweep <dir>`` runs it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from wicore.report import DPI, fmt, md_table, ms, pct  # noqa: E402
from wicore.results import flatten_summary  # noqa: E402
from wicore.results import natural_key as _natural  # noqa: E402
from wicore.results import pareto_indices as _pareto  # noqa: E402
from wicore.results import parse_value as _value  # noqa: E402
from wicore.results import read_overrides as _overrides  # noqa: E402

RATE_KEY = "workload.rate"
MAIN = [("output_tokens_per_s", "tokens/s", fmt), ("requests_per_s", "req/s", fmt),
        ("goodput_requests_per_s", "goodput req/s", fmt), ("ttft_p50", "TTFT p50 ms", ms),
        ("ttft_p99", "TTFT p99 ms", ms), ("tpot_p50", "TPOT p50 ms", ms), ("e2e_p50", "E2E p50 ms", ms),
        ("mean_batch_size", "mean batch", fmt), ("gpu_mem_util_mean", "GPU mem", pct), ("mfu", "MFU", pct),
        ("mbu", "MBU", pct), ("stall_fraction", "stall", pct), ("preemptions", "preempt", fmt),
        ("aborted", "aborted", fmt)]


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per job, and the override keys (in first-seen order)."""
    rows: list[dict[str, Any]] = []
    keys: list[str] = []
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")
            and ((p / "summary.json").is_file() or (p / "error.txt").is_file())]
    for job in sorted(jobs, key=lambda p: _natural(p.name)):
        ov = _overrides(job)
        keys += [k for k in ov if k not in keys]
        row: dict[str, Any] = {"job": job.name, **{k: _value(v) for k, v in ov.items()}}
        err = (job / "error.txt").read_text(encoding="utf-8", errors="replace").strip() \
            if (job / "error.txt").is_file() else ""
        summary: dict[str, Any] | None = None
        if (job / "summary.json").is_file():
            try:
                summary = json.loads((job / "summary.json").read_text(encoding="utf-8"))
            except ValueError as exc:
                err = err or f"unreadable summary.json: {exc}"
        row["status"] = "ok" if isinstance(summary, dict) else "failed"
        row["error"] = err.splitlines()[0] if err else ""
        if isinstance(summary, dict):
            row.update(flatten_summary(summary))  # "run", "bounds": one column per scalar entry
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["job", "status", "error"])
    front = ["job", *keys, "status", "error"]
    return df[front + [c for c in df.columns if c not in front]], keys


def _labels(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Per job: the overrides that differ between jobs (short key names when unambiguous)."""
    varying = [k for k in keys if df[k].astype(str).nunique(dropna=False) > 1]
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    if len(set(short.values())) < len(short):
        short = {k: k for k in varying}
    out = []
    for _, r in df.iterrows():
        parts = [f"{short[k]}={r[k]}" for k in varying if not (isinstance(r[k], float) and math.isnan(r[k]))]
        out.append(", ".join(parts) if parts else f"job {r['job']}")
    if len(set(out)) < len(out):  # same overrides twice: the job name tells them apart
        out = [lab if lab.startswith("job ") else f"{job}: {lab}" for job, lab in zip(df["job"], out)]
    return out


def _latency_unit(seconds: pd.Series) -> tuple[float, str]:
    """(scale, unit) for latencies: ms unless the median is 10 s or more."""
    med = pd.to_numeric(seconds, errors="coerce").median()
    return (1.0, "s") if pd.notna(med) and med >= 10 else (1e3, "ms")


def plot_throughput_bars(df: pd.DataFrame, labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * max(len(df), 1)))
    thr = pd.to_numeric(df.get("output_tokens_per_s", pd.Series(np.nan, index=df.index)), errors="coerce")
    vals = thr.fillna(0.0).to_numpy()
    y = np.arange(len(df))
    colors = ["C0" if s == "ok" else "lightgray" for s in df["status"]]
    ax.barh(y, vals, color=colors)
    xmax = float(vals.max()) if len(vals) and vals.max() > 0 else 1.0
    for yi, v, st in zip(y, vals, df["status"]):
        ax.text(v + 0.01 * xmax, float(yi), fmt(v) if st == "ok" else "failed", va="center", fontsize=8,
                color="k" if st == "ok" else "C3")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax * 1.15)
    ax.set_xlabel("output tokens/s")
    ax.set_title("Output throughput per job")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _annotate(fig: Figure, ax: Axes, xs: np.ndarray, ys: np.ndarray, labels: list[str]) -> None:
    """Label points, nudging a label down while it overlaps one placed before."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax.set_xlim(ax.get_xlim())  # settle the (lazy) autoscaled limits before measuring labels
    ax.set_ylim(ax.get_ylim())
    mid_x = np.sqrt(xs.min() * xs.max()) if (xs > 0).all() else 0.5 * (xs.min() + xs.max())
    placed: list[Any] = []
    for i in np.argsort(-ys):
        right = len(xs) > 1 and xs[i] > mid_x  # labels of right-hand points go left of the point
        dy = 5
        for _ in range(12):
            txt = ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset points", fontsize=7,
                              xytext=(-6 if right else 6, dy), ha="right" if right else "left",
                              annotation_clip=False)
            box = txt.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            txt.remove()
            dy -= 9
        placed.append(box)


def plot_pareto(ok: pd.DataFrame, labels: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    ttft = pd.to_numeric(ok.get("ttft_p50", pd.Series(dtype=float)), errors="coerce")
    scale, unit = _latency_unit(ttft)
    x = ttft.to_numpy() * scale
    y = pd.to_numeric(ok.get("output_tokens_per_s", pd.Series(dtype=float)), errors="coerce").to_numpy()
    good = np.isfinite(x) & np.isfinite(y)
    if not good.any():
        ax.text(0.5, 0.5, "no successful jobs with TTFT and throughput", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    else:
        xs, ys = x[good], y[good]
        labs = [lab for lab, g in zip(labels, good) if g]
        ax.scatter(xs, ys, color="C0", zorder=3, label="job")
        front = _pareto(xs, ys)
        ax.plot(xs[front], ys[front], "-o", color="C3", mfc="none", ms=10, zorder=2,
                label="Pareto front (max throughput, min TTFT)")
        ax.margins(x=0.12, y=0.08)
        pos = xs[xs > 0]
        if len(pos) > 1 and pos.max() / pos.min() > 100:
            ax.set_xscale("log")
        _annotate(fig, ax, xs, ys, labs)
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(f"TTFT p50 ({unit})")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs first-token latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_vs_rate(ok: pd.DataFrame, keys: list[str], path: Path) -> None:
    others = [k for k in keys if k != RATE_KEY and ok[k].astype(str).nunique(dropna=False) > 1]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    scale, unit = _latency_unit(ok["ttft_p50"])
    groups = ok.groupby([ok[k].astype(str) for k in others], sort=True) if others else [((), ok)]
    for name, g in groups:
        name = name if isinstance(name, tuple) else (name,)
        g = g.assign(_r=pd.to_numeric(g[RATE_KEY], errors="coerce")).sort_values("_r")
        lab = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, name)) or "all jobs"
        ax1.plot(g["_r"], g["output_tokens_per_s"], "-o", label=lab)
        ax2.plot(g["_r"], pd.to_numeric(g["ttft_p50"], errors="coerce") * scale, "-o", label=lab)
    ax1.set_title("Throughput vs offered load")
    ax1.set_ylabel("output tokens/s")
    ax1.set_ylim(bottom=0)
    ax2.set_title("TTFT p50 vs offered load")
    ax2.set_ylabel(f"TTFT p50 ({unit})")
    t = pd.to_numeric(ok["ttft_p50"], errors="coerce")
    if (t > 0).sum() > 1 and t[t > 0].max() / t[t > 0].min() > 100:
        ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel(f"offered load ({RATE_KEY}, requests/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def summarize_sweep(sweep_dir: Path) -> Path:
    """Write ``sweep_summary.csv``, ``sweep_summary.md`` and ``plots/``; return the md path."""
    sweep_dir = Path(sweep_dir)
    df, keys = collect(sweep_dir)
    df.to_csv(sweep_dir / "sweep_summary.csv", index=False)
    plots = sweep_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    labels = _labels(df, keys)
    ok_mask = (df["status"] == "ok").to_numpy()
    ok = df[ok_mask]
    ok_labels = [lab for lab, m in zip(labels, ok_mask) if m]

    figs = [("sweep_throughput.png", "Output throughput per job"),
            ("sweep_pareto.png", "Throughput vs TTFT p50 with Pareto front")]
    plot_throughput_bars(df, labels, plots / figs[0][0])
    plot_pareto(ok, ok_labels, plots / figs[1][0])
    if RATE_KEY in keys and pd.to_numeric(ok[RATE_KEY], errors="coerce").nunique() > 1:
        figs.append(("sweep_vs_rate.png", "Throughput and TTFT vs offered load"))
        plot_vs_rate(ok, keys, plots / figs[2][0])

    n_fail = int((~ok_mask).sum())
    md = [f"# Sweep summary: {sweep_dir.name}", "",
          f"{len(df)} jobs: {len(ok)} ok, {n_fail} failed. All columns: "
          "[sweep_summary.csv](sweep_summary.csv).", ""]
    if len(ok):
        md += ["## Results", ""]
        cols = MAIN + ([("deep_token_fraction", "deep tokens", pct)]  # token routing was on in some job
                       if pd.to_numeric(ok.get("deep_token_fraction", pd.Series(dtype=float)),
                                        errors="coerce").notna().any() else [])
        if pd.to_numeric(ok.get("routing_quality.agreement", pd.Series(dtype=float)), errors="coerce").notna().any():
            cols = cols + [("routing_quality.agreement", "expected agreement", pct)]  # routing.quality_table given
        header = ["job", "overrides"] + [h for _, h, _ in cols]
        rows = [[str(r["job"]), lab] + [f(r.get(c)) for c, _, f in cols]
                for (_, r), lab in zip(ok.iterrows(), ok_labels)]
        md += [md_table(header, rows), ""]
        thr = pd.to_numeric(ok.get("output_tokens_per_s", pd.Series(dtype=float)), errors="coerce")
        if thr.notna().any():
            i = int(np.nanargmax(thr.to_numpy(dtype=float)))
            md += [f"Highest throughput: job {ok['job'].iloc[i]} ({ok_labels[i]}), "
                   f"{fmt(thr.iloc[i])} tokens/s.", ""]
    if n_fail:
        md += ["## Failed jobs", "",
               md_table(["job", "overrides", "error"],
                        [[str(r["job"]), lab, str(r["error"]) or "(no message)"]
                         for (_, r), lab, m in zip(df.iterrows(), labels, ok_mask) if not m]), ""]
    common = [k for k in keys if df[k].astype(str).nunique(dropna=False) == 1]
    if common:
        md += ["Overrides common to all jobs: " + ", ".join(f"`{k}={df[k].iloc[0]}`" for k in common), ""]
    md += ["## Plots", ""] + [f"### {c}\n\n![{c}](plots/{n})\n" for n, c in figs]
    path = sweep_dir / "sweep_summary.md"
    path.write_text("\n".join(md), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m wicore.sweep", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (one subfolder per job)")
    args = ap.parse_args(argv)
    print(summarize_sweep(args.sweep_dir))


if __name__ == "__main__":
    main()
