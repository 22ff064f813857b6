"""Simulator fidelity: the same config run on backend=sim and on a real backend, compared.

* ``compare(sim, real, config)``: one row per metric (TTFT p50/p90, TPOT p50/p90, E2E p50,
  output throughput, peak memory per tier) with both values and the relative error
  ``(sim - real) / real``.
* ``fidelity_stats(rows)``: per metric, median and p90 of ``|rel err|`` and pass / fail
  against the targets (median <= 3 %, p90 <= 8 % for TTFT, TPOT and throughput).
* ``load_pairs(root)``: the pairs of a validation folder (``root/<config>/{sim,torch}/``);
  ``load_pairs(root, real="torch", sim="torch_repeat")``: the real run against its repeat;
  ``load_pairs(root, median_run=True)``: where a config's real side ran three times or more
  (``torch``, ``torch_repeat``, ``torch_repeat2``, ...: ``validate --repeat N``), the run of median
  output throughput stands for the real side (``median_run``), so one disturbed run does not move it.
* ``load_sets([root, ...])``: the pairs of several validation folders as one set (configs that more than
  one holds are named ``<folder>/<config>``);
* ``fidelity_report(pairs, out_dir)``: ``fidelity.csv``, ``fidelity_summary.csv``,
  ``fidelity_steps.csv``, ``plots/`` (parity, error CDF, step times) and ``fidelity.md``,
  which names the worst configs and, from the step tables, which kind of step or transfer
  the simulator gets wrong (``wicore.step_analysis``), and how stable the measured costs it used were
  where they were profiled (``cost_spread``: p90 / p10 of each point of the calibration table).

Peak memory per tier: both backends record the *placement's accounting* (weights + fixed +
KV pages in use) in ``tiers.parquet``, so equal values show that the two runs made the same
schedule, not that the memory model is right. Where the real run recorded what the device
allocator saw (``validation.json``: ``measured.gpu_peak_allocated_bytes``), a
``peak_mem_gpuN_measured`` row compares the simulated GPU tier with it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wicore.results import Run, load_run, natural_key, peak_tier_bytes
from wicore.step_analysis import COST_LABELS, compare_costs, compare_steps, time_decomposition

MEDIAN_TARGET = 0.03  # |sim - real| / real, median over configs
P90_TARGET = 0.08  # ... and 90th percentile
# (summary key, label, unit, has a target)
CORE: tuple[tuple[str, str, str, bool], ...] = (
    ("ttft_p50", "TTFT p50", "s", True), ("ttft_p90", "TTFT p90", "s", True),
    ("tpot_p50", "TPOT p50", "s", True), ("tpot_p90", "TPOT p90", "s", True),
    ("e2e_p50", "E2E p50", "s", False), ("output_tokens_per_s", "output throughput", "tokens/s", True),
)
TARGET_METRICS = tuple(k for k, _, _, t in CORE if t)
LABELS = {k: lab for k, lab, _, _ in CORE}
ROW_COLUMNS = ["config", "metric", "label", "unit", "sim", "real", "rel_err", "abs_rel_err", "target",
               "sim_hardware", "real_hardware"]


def label(metric: str) -> str:
    """Readable name of a metric key ('peak_mem_gpu0' -> 'peak memory gpu0')."""
    if metric in LABELS:
        return LABELS[metric]
    if metric.startswith("peak_mem_"):
        rest = metric[len("peak_mem_"):]
        return f"peak memory {rest.replace('_measured', '')}" + (" (allocator)" if rest.endswith(
            "_measured") else " (accounted)")
    return metric


def rel_err(sim: float, real: float) -> float:
    """``(sim - real) / real``; 0 when both are 0; NaN when either is missing or only real is 0."""
    if not (math.isfinite(sim) and math.isfinite(real)):
        return float("nan")
    if real == 0:
        return 0.0 if sim == 0 else float("nan")
    return (sim - real) / real


@dataclass
class Pair:
    """One config run on both backends."""

    config: str
    sim: Run
    real: Run
    real_runs: int = 1  # real runs the reference was chosen from (``median_run``); 1: the first run alone


MEDIAN_OF = 3  # real runs a config needs before its median run stands for the real side


def real_folders(config_dir: Path, real: str = "torch") -> list[str]:
    """The folders of one config's real runs, first run first: ``real``, then ``<real>_repeat``,
    ``<real>_repeat2``, ... (``validate --repeat N``), those that exist."""
    rep = re.compile(rf"{re.escape(real)}_repeat\d*")
    names = sorted((d.name for d in config_dir.iterdir() if d.is_dir() and rep.fullmatch(d.name)), key=natural_key)
    return ([real] if (config_dir / real).is_dir() else []) + names


def median_of_runs(runs: list[Run]) -> Run:
    """The run of median output throughput (the lower middle of an even count) where there are at least
    ``MEDIAN_OF``; else the first."""
    if len(runs) < MEDIAN_OF:
        return runs[0]
    ranked = sorted(runs, key=lambda r: r.metric("output_tokens_per_s"))
    return ranked[(len(ranked) - 1) // 2]


def _hardware(run: Run) -> str:
    return str((run.summary.get("run") or {}).get("hardware", ""))


def compare(sim: Run, real: Run, config: str = "") -> list[dict[str, Any]]:
    """Rows (``ROW_COLUMNS``) for one config: the core metrics, peak accounted memory per tier,
    and the measured GPU peak where the real run has one."""
    base = {"config": config or sim.path.parent.name, "sim_hardware": _hardware(sim),
            "real_hardware": _hardware(real)}
    values: list[tuple[str, str, float, float, bool]] = [
        (k, unit, sim.metric(k), real.metric(k), tgt) for k, _, unit, tgt in CORE]
    ps, pr = peak_tier_bytes(sim.tiers), peak_tier_bytes(real.tiers)
    for tier in sorted(set(ps) | set(pr), key=natural_key):
        values.append((f"peak_mem_{tier}", "bytes", ps.get(tier, float("nan")), pr.get(tier, float("nan")),
                       False))
    measured = (real.meta.get("measured") or {}).get("gpu_peak_allocated_bytes") or {}
    for gpu, nbytes in sorted(measured.items(), key=lambda kv: natural_key(str(kv[0]))):
        tier = f"gpu{gpu}"
        values.append((f"peak_mem_{tier}_measured", "bytes", ps.get(tier, float("nan")), float(nbytes), False))
    rows = []
    for metric, unit, s, r, tgt in values:
        e = rel_err(s, r)
        rows.append({**base, "metric": metric, "label": label(metric), "unit": unit, "sim": s, "real": r,
                     "rel_err": e, "abs_rel_err": abs(e), "target": tgt})
    return [{c: row[c] for c in ROW_COLUMNS} for row in rows]


def compare_all(pairs: list[Pair]) -> pd.DataFrame:
    """``compare`` over every pair, as one frame."""
    rows = [row for p in pairs for row in compare(p.sim, p.real, p.config)]
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def fidelity_stats(rows: pd.DataFrame) -> pd.DataFrame:
    """Per metric: ``n`` configs with both values, ``median_abs`` / ``p90_abs`` of |rel err|,
    ``median_signed`` (> 0: the simulator overestimates), and for metrics with a target
    ``median_ok`` / ``p90_ok`` / ``met``."""
    cols = ["metric", "label", "n", "median_abs", "p90_abs", "median_signed", "max_abs", "target",
            "median_ok", "p90_ok", "met"]
    out = []
    for metric, g in rows.groupby("metric", sort=False):
        e = pd.to_numeric(g["rel_err"], errors="coerce").dropna()
        a = e.abs()
        tgt = bool(g["target"].iloc[0])
        n = len(e)
        med = float(a.median()) if n else float("nan")
        p90 = float(np.percentile(a, 90)) if n else float("nan")
        mok = bool(n and med <= MEDIAN_TARGET) if tgt else None
        pok = bool(n and p90 <= P90_TARGET) if tgt else None
        out.append({"metric": metric, "label": label(str(metric)), "n": n, "median_abs": med, "p90_abs": p90,
                    "median_signed": float(e.median()) if n else float("nan"),
                    "max_abs": float(a.max()) if n else float("nan"), "target": tgt,
                    "median_ok": mok, "p90_ok": pok, "met": (mok and pok) if tgt else None})
    return pd.DataFrame(out, columns=cols)


def config_groups(pair: Pair) -> dict[str, str]:
    """What a config is, for grouping errors: the model and dtype the real run ran, whether every layer was
    resident or some were streamed (``backend.gpu_budget_gib``), the batching policy, the GPU count."""
    run = pair.real.summary.get("run") or {}
    cfg = pair.real.config
    budget = (cfg.get("backend") or {}).get("gpu_budget_gib")
    par = str(run.get("parallel", ""))
    gpus = "2 GPUs" if "pp2" in par or "tp2" in par else "1 GPU"
    return {"model": f"{run.get('model', '?')} {run.get('dtype', '')}".strip(),
            "weights": "all resident" if budget is None else f"streamed ({float(budget):g} GiB budget)",
            "batching": str(run.get("batching", "?")), "GPUs": gpus}


GROUP_METRICS = ("ttft_p50", "tpot_p50", "output_tokens_per_s")


def group_stats(pairs: list[Pair], rows: pd.DataFrame, metrics: tuple[str, ...] = GROUP_METRICS) -> pd.DataFrame:
    """Median and p90 |relative error| of ``metrics`` per group of every ``config_groups`` kind that has more
    than one group: where the simulator misses, by what the configs have in common."""
    groups = {p.config: config_groups(p) for p in pairs}
    out = []
    kinds = list(next(iter(groups.values()), {}))  # config_groups' keys, in its order
    for kind in kinds:
        values = sorted({g[kind] for g in groups.values()})
        if len(values) < 2:
            continue
        for value in values:
            configs = [c for c, g in groups.items() if g[kind] == value]
            row: dict[str, Any] = {"kind": kind, "group": value, "configs": len(configs)}
            for m in metrics:
                e = pd.to_numeric(rows[(rows["metric"] == m) & rows["config"].isin(configs)]["abs_rel_err"],
                                  errors="coerce").dropna()
                row[f"{m}_median_abs"] = float(e.median()) if len(e) else float("nan")
                row[f"{m}_p90_abs"] = float(np.percentile(e, 90)) if len(e) else float("nan")
            out.append(row)
    return pd.DataFrame(out)


def load_pairs(root: Path | str, real: str = "torch", sim: str = "sim",
               median_run: bool = False) -> tuple[list[Pair], dict[str, str]]:
    """Pairs of ``root/<config>/<sim>/`` and ``root/<config>/<real>/`` where both runs are ok,
    and for every other config folder the reason it has no pair. ``median_run``: where the config's real
    side ran ``MEDIAN_OF`` times or more and every run is ok, the one of median throughput is the real side."""
    root = Path(root)
    pairs: list[Pair] = []
    missing: dict[str, str] = {}
    configs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
                      and ((d / sim).is_dir() or (d / real).is_dir())), key=lambda d: natural_key(d.name))
    for d in configs:
        runs: dict[str, Run | None] = {}
        why = []
        for side in (sim, real):
            try:
                runs[side] = load_run(d / side)
            except FileNotFoundError:
                runs[side] = None
            run = runs[side]
            if run is None:
                why.append(f"{side}: not run")
            elif not run.ok:
                why.append(f"{side}: {run.error}")
        s, r = runs[sim], runs[real]
        if s is not None and r is not None and not why:
            reals = _real_runs(d, real, r) if median_run else [r]
            pairs.append(Pair(d.name, s, median_of_runs(reals), len(reals)) if len(reals) >= MEDIAN_OF
                         else Pair(d.name, s, r))
        else:
            missing[d.name] = "; ".join(why)
    return pairs, missing


def _real_runs(config_dir: Path, real: str, first: Run) -> list[Run]:
    """Every real run of one config, ``first`` (already loaded) first; only it where a repeat is missing or
    failed."""
    runs = [first]
    for name in real_folders(config_dir, real)[1:]:
        try:
            run = load_run(config_dir / name)
        except FileNotFoundError:
            return runs[:1]
        if not run.ok:
            return runs[:1]
        runs.append(run)
    return runs


def load_sets(roots: list[Path | str], real: str = "torch", sim: str = "sim",
              median_run: bool = False) -> tuple[list[Pair], dict[str, str]]:
    """``load_pairs`` over several validation folders (sets run on different machines or commits), as one
    list: a config that more than one folder holds is named ``<folder>/<config>`` in each."""
    loaded = [(Path(r), *load_pairs(r, real, sim, median_run)) for r in roots]
    seen: dict[str, int] = {}
    for _, pairs, missing in loaded:
        for name in {p.config for p in pairs} | set(missing):
            seen[name] = seen.get(name, 0) + 1
    pairs_out: list[Pair] = []
    missing_out: dict[str, str] = {}
    for root, pairs, missing in loaded:
        def named(c: str, root: Path = root) -> str:
            return f"{root.name}/{c}" if seen[c] > 1 else c
        pairs_out += [replace(p, config=named(p.config)) for p in pairs]
        missing_out.update({named(c): why for c, why in missing.items()})
    return pairs_out, missing_out


def decompositions(pairs: list[Pair]) -> pd.DataFrame:
    """``time_decomposition`` of every pair, with a ``config`` column."""
    parts = [time_decomposition(p.sim, p.real).assign(config=p.config) for p in pairs]
    if not parts:
        return pd.DataFrame(columns=["config", "component", "kind", "bucket", "sim_s", "real_s", "delta_s",
                                     "share"])
    df = pd.concat(parts, ignore_index=True)
    return df[["config", *[c for c in df.columns if c != "config"]]]


def time_components(dec: pd.DataFrame) -> pd.DataFrame:
    """``decompositions`` summed over configs per component: ``configs``, ``sim_s``, ``real_s``,
    ``delta_s`` (sim - real) and ``share`` = the component's sum of |delta| over configs / the total;
    largest share first."""
    cols = ["component", "configs", "sim_s", "real_s", "delta_s", "share"]
    if dec.empty:
        return pd.DataFrame(columns=cols)
    agg = dec.assign(abs_delta=dec["delta_s"].abs()).groupby("component", sort=False).agg(
        configs=("config", "nunique"), sim_s=("sim_s", "sum"), real_s=("real_s", "sum"),
        delta_s=("delta_s", "sum"), abs_delta=("abs_delta", "sum"))
    total = float(agg["abs_delta"].sum())
    agg["share"] = agg["abs_delta"] / total if total > 0 else 0.0
    return agg.sort_values("abs_delta", ascending=False).reset_index()[cols]


def step_rows(pairs: list[Pair]) -> pd.DataFrame:
    """``compare_steps`` of every pair, with a ``config`` column (for the step-time parity plot)."""
    parts = [compare_steps(p.sim, p.real).assign(config=p.config) for p in pairs]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["config", "kind", "bucket", "sim_mean_ms", "real_mean_ms"])


def cost_table(pairs: list[Pair]) -> pd.DataFrame:
    """Per step-cost quantity: the median over pairs of the sim and real values and of sim / real."""
    rows = [{"config": p.config, **r} for p in pairs for r in compare_costs(p.sim, p.real)]
    if not rows:
        return pd.DataFrame(columns=["quantity", "label", "n", "sim_median", "real_median", "ratio_median"])
    df = pd.DataFrame(rows)
    out = []
    for q in COST_LABELS:
        g = df[df["quantity"] == q]
        ok = g["ratio"].notna()
        out.append({"quantity": q, "label": COST_LABELS[q], "n": int(ok.sum()),
                    "sim_median": float(g["sim"].median()), "real_median": float(g["real"].median()),
                    "ratio_median": float(g.loc[ok, "ratio"].median()) if ok.any() else float("nan")})
    return pd.DataFrame(out)


SPREAD_LIMIT = 1.3  # p90 / p10 of a measured point above which the op was not stable where it was profiled
SPREAD_COLUMNS = ["table", "op", "model", "dtype", "points", "median_spread", "max_spread", "unstable_points"]


def _table_file(value: str, folder: Path) -> Path | None:
    """The calibration table a sim run names (its path, else a file of that name in the validation folder's
    ``calibration/``, where result folders moved from another machine keep theirs)."""
    p = Path(value)
    for cand in (p, folder / "calibration" / p.name, folder / p.name):
        if cand.is_file():
            return cand
    return None


def cost_spread(pairs: list[Pair]) -> pd.DataFrame:
    """For every measured op the sim runs used (``cost_sources.json``): how widely its repeated timings
    spread where it was profiled, per table, model and dtype: ``median_spread`` / ``max_spread`` of
    p90 / p10 over its points and how many points exceed ``SPREAD_LIMIT``. A table is looked for where the
    sim run names it, then in the ``calibration/`` of the run's validation folder."""
    used: dict[tuple[str, str, str], set[str]] = {}
    folders: dict[tuple[str, str, str], Path] = {}
    for p in pairs:
        path = p.sim.path / "cost_sources.json"
        if not path.is_file():
            continue
        src = json.loads(path.read_text(encoding="utf-8"))
        table = (src.get("table") or {}).get("path")
        if not src.get("calibrated") or not table:
            continue
        ops = {op for op, v in (src.get("ops") or {}).items()  # the ops the run looked up in the table
               if v.get("source") == "measured"
               and sum(n for k, n in (v.get("lookups") or {}).items() if k != "roofline") > 0}
        key = (str(table), str(src.get("model", "")), str(src.get("dtype", "")))
        used.setdefault(key, set()).update(ops)
        folders.setdefault(key, p.sim.path.parent.parent)  # <validation folder>/<config>/<sim>
    out = []
    for (table, model, dtype), ops in sorted(used.items()):
        f = _table_file(table, folders[(table, model, dtype)])
        if f is None:
            continue
        t = pd.read_csv(f)
        for op in sorted(ops):
            g = t[(t["op"] == op) & (t["model"].fillna("") == model) & (t["dtype"].fillna("") == dtype)]
            g = g[g["p10_s"] > 0]
            if g.empty:
                continue
            spread = g["p90_s"] / g["p10_s"]
            out.append({"table": f.name, "op": op, "model": model, "dtype": dtype, "points": len(g),
                        "median_spread": float(spread.median()), "max_spread": float(spread.max()),
                        "unstable_points": int((spread > SPREAD_LIMIT).sum())})
    return pd.DataFrame(out, columns=SPREAD_COLUMNS)


def fidelity_report(pairs: list[Pair], out_dir: Path | str, missing: dict[str, str] | None = None,
                    repeats: list[Pair] | None = None) -> Path:
    """Write the fidelity tables, plots and ``fidelity.md`` into ``out_dir``; return the md path.
    ``repeats``: pairs of the real run repeated (``sim`` = the repeat, ``real`` = the first run): their
    differences (``fidelity_noise.csv`` and a section of the report) are the measurement noise."""
    from wicore.fidelity_md import write_markdown
    from wicore.fidelity_plots import plot_error_cdf, plot_parity, plot_step_parity, save

    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = compare_all(pairs)
    stats = fidelity_stats(rows)
    dec = decompositions(pairs)
    steps = step_rows(pairs)
    costs = cost_table(pairs)
    rows.to_csv(out / "fidelity.csv", index=False)
    stats.to_csv(out / "fidelity_summary.csv", index=False)
    dec.to_csv(out / "fidelity_steps.csv", index=False)
    save(plot_parity(rows), plots / "parity.png")
    save(plot_error_cdf(rows), plots / "error_cdf.png")
    save(plot_step_parity(steps), plots / "step_times.png")
    noise = None
    if repeats:
        noise = fidelity_stats(compare_all(repeats))
        noise = noise[noise["target"].astype(bool) | (noise["metric"] == "e2e_p50")].reset_index(drop=True)
        noise.to_csv(out / "fidelity_noise.csv", index=False)
    spread = cost_spread(pairs)
    if len(spread):
        spread.to_csv(out / "fidelity_cost_spread.csv", index=False)
    groups = group_stats(pairs, rows)
    if len(groups):
        groups.to_csv(out / "fidelity_groups.csv", index=False)
    path = out / "fidelity.md"
    path.write_text(write_markdown(pairs, rows, stats, dec, costs, missing or {}, noise, spread, groups),
                    encoding="utf-8")
    return path
