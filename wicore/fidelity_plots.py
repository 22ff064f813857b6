"""Figures of the fidelity report: parity (sim vs real per metric), error CDF, step-time parity.

Each function takes the frames of ``wicore.fidelity`` and returns a matplotlib ``Figure``
built without pyplot (no global backend state), so a notebook can display it and the report
can save it (``save``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from wicore.fidelity import CORE, MEDIAN_TARGET, P90_TARGET, TARGET_METRICS, label

DPI = 110
GIB = 2**30


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def _no_data(ax: Axes, what: str = "no pairs with both values") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="gray", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _log_axes(ax: Axes, lo: float, hi: float) -> None:
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi))
    if hi / lo > 10:  # decade labels only (minor labels collide); within a decade matplotlib's own
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both", lw=0.4)


def _scale(unit: str) -> tuple[float, str]:
    return {"s": (1e3, "ms"), "bytes": (1 / GIB, "GiB")}.get(unit, (1.0, unit))


def _parity_panel(ax: Axes, g: pd.DataFrame, title: str, color_by: str | None = None) -> None:
    g = g[np.isfinite(g["sim"].astype(float)) & np.isfinite(g["real"].astype(float))
          & (g["sim"].astype(float) > 0) & (g["real"].astype(float) > 0)]
    ax.set_title(title, fontsize=9)
    if g.empty:
        _no_data(ax)
        return
    k, unit = _scale(str(g["unit"].iloc[0]))
    x = g["real"].to_numpy(dtype=float) * k
    y = g["sim"].to_numpy(dtype=float) * k
    lo, hi = min(x.min(), y.min()) / 1.3, max(x.max(), y.max()) * 1.3
    line = np.geomspace(lo, hi, 50)
    for tol, alpha in ((P90_TARGET, 0.10), (MEDIAN_TARGET, 0.18)):
        ax.fill_between(line, line * (1 - tol), line * (1 + tol), color="C2", alpha=alpha, lw=0,
                        label=f"±{tol:.0%}")
    ax.plot(line, line, color="k", lw=0.8, label="sim = real")
    if color_by:
        for i, (name, sub) in enumerate(g.groupby(color_by, sort=True)):
            ax.scatter(sub["real"].astype(float) * k, sub["sim"].astype(float) * k, s=18, color=f"C{i % 10}",
                       zorder=3, label=str(name))
    else:
        ax.scatter(x, y, s=18, color="C0", zorder=3)
    worst = g.assign(_a=g["abs_rel_err"].astype(float)).nlargest(2, "_a")
    for r in worst.itertuples(index=False):
        ax.annotate(str(r.config), (float(r.real) * k, float(r.sim) * k), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    _log_axes(ax, lo, hi)
    ax.set(xlabel=f"real ({unit})", ylabel=f"sim ({unit})")
    ax.legend(fontsize=6, loc="upper left")


def plot_parity(rows: pd.DataFrame) -> Figure:
    """Log-log parity plot per metric: one point per config, the diagonal and the ±3 % / ±8 %
    bands; the two configs with the largest error are named."""
    fig = Figure(figsize=(16, 8), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    for ax, (key, _, _, _) in zip(axes, CORE):
        g = rows[rows["metric"] == key]
        e = g["abs_rel_err"].dropna()
        sub = f"\nmedian |err| {e.median():.1%}, n={len(e)}" if len(e) else ""
        _parity_panel(ax, g, f"{label(key)}{sub}")
    mem = rows[rows["metric"].astype(str).str.startswith("peak_mem_")]
    acc = mem[~mem["metric"].astype(str).str.endswith("_measured")]
    mea = mem[mem["metric"].astype(str).str.endswith("_measured")]
    _parity_panel(axes[len(CORE)], acc.assign(tier=acc["metric"].str[len("peak_mem_"):]),
                  "peak memory per tier (accounted on both sides)", color_by="tier")
    _parity_panel(axes[len(CORE) + 1], mea.assign(tier=mea["metric"].str[len("peak_mem_"):].str.replace(
        "_measured", "")), "peak GPU memory: sim tier vs real allocator", color_by="tier")
    fig.suptitle("Simulated vs measured, one point per config (log-log)")
    return fig


def plot_error_cdf(rows: pd.DataFrame) -> Figure:
    """CDF over configs of |rel err| per metric, with the 3 % (median) and 8 % (p90) targets."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    keys = [*TARGET_METRICS, "e2e_p50"]
    drawn = False
    for i, key in enumerate(keys):
        e = np.sort(rows.loc[rows["metric"] == key, "abs_rel_err"].dropna().to_numpy(dtype=float))
        if not len(e):
            continue
        drawn = True
        y = np.arange(1, len(e) + 1) / len(e)
        x = np.maximum(e * 100, 1e-2)  # exact zeros drawn at 0.01 % on the log axis
        ax.step(np.concatenate([[x[0]], x]), np.concatenate([[0.0], y]), where="post", color=f"C{i}",
                ls="-" if key in TARGET_METRICS else "--", label=f"{label(key)} (n={len(e)})")
    if not drawn:
        _no_data(ax)
        return fig
    ax.axvline(MEDIAN_TARGET * 100, color="k", ls=":", lw=1)
    ax.axvline(P90_TARGET * 100, color="k", ls="-.", lw=1)
    ax.axhline(0.5, color="gray", lw=0.6)
    ax.axhline(0.9, color="gray", lw=0.6)
    ax.text(MEDIAN_TARGET * 100, 0.02, " 3 %", fontsize=8)
    ax.text(P90_TARGET * 100, 0.06, " 8 %", fontsize=8)
    ax.set(xscale="log", ylim=(0, 1.02), xlabel="|sim - real| / real (%)", ylabel="fraction of configs",
           title="Error CDF across configs (target: curve at 0.5 left of 3 %, at 0.9 left of 8 %)")
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_step_parity(steps: pd.DataFrame) -> Figure:
    """Mean step time, sim vs real, one point per (config, step kind, batch bucket); point area
    grows with the number of real steps."""
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax = fig.subplots()
    ax.set_title("Mean step time per (config, step kind, batch-size bucket)", fontsize=10)
    g = steps.dropna(subset=["sim_mean_ms", "real_mean_ms"]) if len(steps) else steps
    g = g[(g["sim_mean_ms"] > 0) & (g["real_mean_ms"] > 0)] if len(g) else g
    if g.empty:
        _no_data(ax, "no step groups present on both sides")
        return fig
    x, y = g["real_mean_ms"].to_numpy(dtype=float), g["sim_mean_ms"].to_numpy(dtype=float)
    lo, hi = min(x.min(), y.min()) / 1.3, max(x.max(), y.max()) * 1.3
    line = np.geomspace(lo, hi, 50)
    ax.fill_between(line, line * (1 - P90_TARGET), line * (1 + P90_TARGET), color="C2", alpha=0.12, lw=0,
                    label=f"±{P90_TARGET:.0%}")
    ax.plot(line, line, color="k", lw=0.8, label="sim = real")
    for kind, color in (("prefill", "C1"), ("decode", "C0")):
        sub = g[g["kind"] == kind]
        if len(sub):
            size = 8 + 4 * np.sqrt(sub["real_steps"].to_numpy(dtype=float))
            ax.scatter(sub["real_mean_ms"], sub["sim_mean_ms"], s=size, color=color, alpha=0.7, zorder=3,
                       label=f"{'prefill-containing' if kind == 'prefill' else 'decode-only'} steps")
    _log_axes(ax, lo, hi)
    ax.set(xlabel="real mean step time (ms)", ylabel="sim mean step time (ms)")
    ax.legend(fontsize=8, loc="upper left")
    return fig
