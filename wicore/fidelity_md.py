"""The text of ``fidelity.md``: every sentence is computed from the fidelity frames, and a target
is only called met when the numbers meet it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from wicore.fidelity import GROUP_METRICS, MEDIAN_TARGET, P90_TARGET, TARGET_METRICS, label, time_components
from wicore.report import fmt, md_table

if TYPE_CHECKING:
    from wicore.fidelity import Pair

WORST = 3  # configs named per metric
FEW = 10  # below this many configs a p90 is the largest error or two


def _pct(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if not math.isfinite(v) else f"{100 * v:+.1f} %"


def _apct(x: Any) -> str:
    s = _pct(x)
    return s if s == "–" else s.lstrip("+")


def _value(x: float, unit: str) -> str:
    if not math.isfinite(x):
        return "–"
    if unit == "s":
        return f"{fmt(x * 1e3)} ms"
    if unit == "bytes":
        return f"{fmt(x / 2**30)} GiB"
    return f"{fmt(x)} {unit}"


def _targets(stats: pd.DataFrame) -> list[str]:
    t = stats[stats["target"].astype(bool)]
    md = [f"## Targets: median |sim - real| / real <= {MEDIAN_TARGET:.0%}, p90 <= {P90_TARGET:.0%}", ""]
    if t.empty or int(t["n"].max()) == 0:
        return md + ["No config has values on both backends: nothing is compared and no target is claimed.", ""]
    rows = [[str(r.label), str(int(r.n)), _apct(r.median_abs), _apct(r.p90_abs), _pct(r.median_signed),
             fmt(bool(r.median_ok)), fmt(bool(r.p90_ok))] for r in t.itertuples(index=False)]
    md += [md_table(["Metric", "configs", "median |err|", "p90 |err|", "median signed err (bias)",
                     f"median <= {MEDIAN_TARGET:.0%}", f"p90 <= {P90_TARGET:.0%}"], rows), ""]
    met = [str(r.label) for r in t.itertuples(index=False) if r.met]
    miss = [f"{r.label} (median {_apct(r.median_abs)}, p90 {_apct(r.p90_abs)})"
            for r in t.itertuples(index=False) if not r.met]
    if not miss:
        md.append(f"All {len(met)} target metrics meet both targets over {int(t['n'].min())} configs.")
    else:
        md.append(f"Targets met for: {', '.join(met) if met else 'none'}. Missed for: {'; '.join(miss)}.")
    bias = [f"{r.label} {'over' if r.median_signed > 0 else 'under'}estimated by {_apct(abs(r.median_signed))}"
            for r in t.itertuples(index=False) if math.isfinite(r.median_signed)
            and abs(r.median_signed) > MEDIAN_TARGET]
    if bias:
        md.append("Typical direction (median signed error; over = the simulator predicts more than measured): "
                  + "; ".join(bias) + ".")
    if int(t["n"].min()) < FEW:
        md.append(f"Only {int(t['n'].min())} configs: the p90 is interpolated between the largest errors and "
                  "the statistics are indicative.")
    return md + [""]


LATE_START_S = 0.010  # a real first step later than the simulated one by more than this is flagged


def _late_starts(pairs: list[Pair]) -> list[str]:
    """Configs whose real run starts its first step later than the simulated run does: time on the run's clock
    before any step (set-up, a collection, lazy initialisation) that requests arriving early wait for."""
    late = []
    for p in pairs:
        rs, ss = p.real.steps, p.sim.steps
        if len(rs) and len(ss):
            d = float(rs["start"].min()) - float(ss["start"].min())
            if d > LATE_START_S:
                late.append((d, p.config))
    if not late:
        return []
    worst = max(late)
    return [f"**Late real starts:** in {len(late)} of {len(pairs)} configs the real run's first step starts more than "
            f"{LATE_START_S * 1e3:.0f} ms after the simulated one's (up to {worst[0] * 1e3:.0f} ms, {worst[1]}). That is "
            "time on the real run's clock before any step (set-up, a garbage collection, lazy initialisation), which "
            "every request that arrived before it waits for: their TTFT, E2E and throughput measure it, not the "
            "steps the simulator models.", ""]


def _other(stats: pd.DataFrame) -> list[str]:
    o = stats[~stats["target"].astype(bool)]
    if o.empty:
        return []
    rows = [[str(r.label), str(int(r.n)), _apct(r.median_abs), _apct(r.p90_abs), _pct(r.median_signed)]
            for r in o.itertuples(index=False)]
    return ["## Other metrics (no target)", "",
            "Peak memory *(accounted)* is the placement's bookkeeping, recorded the same way on both backends: "
            "agreement there means the two runs held the same KV pages, not that the memory model is right. "
            "*(allocator)* compares the simulated GPU tier with the device allocator's peak of the real run "
            "(it includes the real runtime's statically sized KV cache and activations).", "",
            md_table(["Metric", "configs", "median |err|", "p90 |err|", "median signed err"], rows), ""]


def _worst(rows: pd.DataFrame) -> list[str]:
    md = ["## Worst configs", ""]
    body = []
    for key in TARGET_METRICS:
        g = rows[(rows["metric"] == key)].dropna(subset=["abs_rel_err"])
        g = g.astype({"abs_rel_err": float})  # all-None columns (no pair yet) come as object
        for r in g.nlargest(WORST, "abs_rel_err").itertuples(index=False):
            body.append([label(key), str(r.config), _value(float(r.sim), str(r.unit)),
                         _value(float(r.real), str(r.unit)), _pct(r.rel_err)])
    if not body:
        return []
    return md + [md_table(["Metric", "config", "sim", "real", "rel err"], body), ""]


def _where(dec: pd.DataFrame, costs: pd.DataFrame) -> list[str]:
    md = ["## Where the model goes wrong", ""]
    if dec.empty:
        return md + ["No pairs: no step tables to compare.", ""]
    md += ["Each run's time splits into its steps, grouped by kind (prefill-containing / decode-only) and "
           "batch size, plus the time outside any step (the host-side engine loop between steps, idle "
           "waits). The sim - real differences of these components add up to the run-time error, so the "
           "components with the largest differences are what the simulator gets wrong "
           "(per config: [fidelity_steps.csv](fidelity_steps.csv)).", ""]
    agg = time_components(dec)
    total = float(dec["delta_s"].abs().sum())
    rows = [[str(r.component), str(int(r.configs)), fmt(r.sim_s), fmt(r.real_s), fmt(r.delta_s), _apct(r.share)]
            for r in agg.itertuples(index=False)]
    md += [md_table(["Component", "configs", "sim total (s)", "real total (s)", "sim - real (s)",
                     "share of |differences|"], rows), ""]
    if total > 0:
        top = [f"{r.component} ({_apct(r.share)}: sim {fmt(r.sim_s)} s vs real {fmt(r.real_s)} s, the simulator "
               f"is {'slower' if r.delta_s > 0 else 'faster'} there)" for r in agg.head(2).itertuples(index=False)
               if r.share > 0]
        md += ["Largest contributions to the run-time error: " + "; ".join(top) + ".", ""]
    if not costs.empty:
        crow = []
        for r in costs.itertuples(index=False):
            crow.append([str(r.label), str(int(r.n)), fmt(r.sim_median), fmt(r.real_median), fmt(r.ratio_median)])
        md += ["Step costs fitted to each run's steps (decode step = fixed + per sequence x batch; prefill step "
               "= fixed + per token x tokens), median over configs. Where a run's steps all have one batch "
               "size (or one token count), the fixed part is their mean time and no slope is fitted.", "",
               md_table(["Quantity", "configs", "sim", "real", "sim / real"], crow), ""]
        off = costs[np.isfinite(costs["ratio_median"].astype(float))]
        off = off[(off["ratio_median"] < 1 - P90_TARGET) | (off["ratio_median"] > 1 + P90_TARGET)]
        if len(off):
            off = off.assign(_d=np.abs(np.log(np.maximum(off["ratio_median"].astype(float), 1e-9))))
            items = [f"{r.label}: sim {fmt(r.ratio_median)}x real" for r in off.sort_values(
                "_d", ascending=False).itertuples(index=False)]
            md += ["Off by more than 8 %: " + "; ".join(items) + ".", ""]
    return md


def _per_config(pairs: list[Pair], rows: pd.DataFrame, dec: pd.DataFrame) -> list[str]:
    if not pairs:
        return []
    piv = rows.pivot_table(index="config", columns="metric", values="rel_err", aggfunc="first")
    body = []
    for p in pairs:
        r = piv.loc[p.config] if p.config in piv.index else pd.Series(dtype=float)
        d = dec[dec["config"] == p.config]
        top = d.loc[d["delta_s"].abs().idxmax()] if len(d) and d["delta_s"].abs().max() > 0 else None
        dur = p.sim.metric("duration_s"), p.real.metric("duration_s")
        comp = (f"{top['component']} ({'+' if top['delta_s'] > 0 else ''}{fmt(top['delta_s'])} s)"
                if top is not None else "–")
        body.append([p.config, *(_pct(r.get(k)) for k in ("ttft_p50", "tpot_p50", "output_tokens_per_s")),
                     _pct((dur[0] - dur[1]) / dur[1] if dur[1] > 0 else float("nan")), comp])
    return ["## Per config", "",
            md_table(["config", "TTFT p50 err", "TPOT p50 err", "throughput err", "run time err",
                      "largest component (sim - real)"], body), ""]


def _groups(groups: pd.DataFrame) -> list[str]:
    body = []
    for r in groups.itertuples(index=False):
        d = r._asdict()
        cells = [f"{_apct(d[f'{m}_median_abs'])} / {_apct(d[f'{m}_p90_abs'])}" for m in GROUP_METRICS]
        ok = all(d[f"{m}_median_abs"] <= MEDIAN_TARGET and d[f"{m}_p90_abs"] <= P90_TARGET for m in GROUP_METRICS)
        body.append([str(d["kind"]), str(d["group"]), str(int(d["configs"])), *cells, "yes" if ok else "no"])
    return ["## By group", "",
            "Median / p90 of |sim - real| / real over the configs of each group, for every way the configs "
            "differ ([fidelity_groups.csv](fidelity_groups.csv)): where the targets hold and where they do not.", "",
            md_table(["kind", "group", "configs", *(label(m) for m in GROUP_METRICS),
                      f"all <= {MEDIAN_TARGET:.0%} / {P90_TARGET:.0%}"], body), ""]


def _noise(noise: pd.DataFrame, stats: pd.DataFrame) -> list[str]:
    """The real runtime against itself (each config run twice), next to the simulator's error."""
    sim = {str(r["metric"]): r for _, r in stats.iterrows()}
    body = []
    for _, r in noise.iterrows():
        s = sim.get(str(r["metric"]))
        body.append([r["label"], int(r["n"]), _apct(r["median_abs"]), _apct(r["p90_abs"]),
                     _apct(s["median_abs"]) if s is not None else "–", _apct(s["p90_abs"]) if s is not None else "–"])
    return ["## Measurement noise: the real run repeated", "",
            "The configs counted here ran twice on the real runtime (the second run in `torch_repeat/`; "
            "`validate --repeat` runs it right after the first, in the same process); "
            "|second - first| / first is how far the measurement moves by itself. The simulator cannot be "
            "held closer to one real run than a second real run is ([fidelity_noise.csv](fidelity_noise.csv)).",
            "", md_table(["Metric", "configs", "real vs real: median", "real vs real: p90", "sim vs real: median",
                          "sim vs real: p90"], body), ""]


def _spread(spread: pd.DataFrame) -> list[str]:
    """The measured costs the simulator used, by how much their repeated timings spread."""
    from wicore.fidelity import SPREAD_LIMIT

    body = [[str(r.op), f"{r.model} {r.dtype}", str(r.table), str(int(r.points)), fmt(r.median_spread),
             fmt(r.max_spread), f"{int(r.unstable_points)} / {int(r.points)}"]
            for r in spread.sort_values(["unstable_points", "median_spread"], ascending=False).itertuples()]
    bad = spread[spread["unstable_points"] > spread["points"] / 2]
    md = ["## Spread of the measured costs", "",
          "The simulator uses one number per calibration point (its median, or its mean with "
          "`backend.calibration_statistic=mean`). Where the repeated timings of a point spread "
          f"widely (p90 / p10 > {SPREAD_LIMIT}) the op was not stable on the profiled machine, and a run's steps can "
          "land anywhere in that range, which one number cannot follow "
          "([fidelity_cost_spread.csv](fidelity_cost_spread.csv)).", "",
          md_table(["op", "model", "table", "points", "median p90/p10", "max p90/p10", f"points > {SPREAD_LIMIT}"],
                   body), ""]
    if len(bad):
        names = sorted({f"{r.op} ({r.model} {r.dtype})" for r in bad.itertuples()})
        md += ["Unstable at most of their points: " + "; ".join(names) + ".", ""]
    return md


def _reference(pairs: list[Pair]) -> list[str]:
    """Which real run stands for each config: where it ran three times or more, the median one."""
    many = [p for p in pairs if p.real_runs > 1]
    if not many:
        return []
    counts = sorted({p.real_runs for p in many})
    chosen = ", ".join(f"{p.config}: `{p.real.path.name}`" for p in many)
    return [f"**Real side:** for the {len(many)} of {len(pairs)} configs whose real runtime ran "
            f"{' or '.join(map(str, counts))} times, the run of median output throughput ({chosen}); for the "
            "others, their first run. One disturbed run does not move a median of three; the noise section "
            "below still compares the first run with its first repeat.", ""]


def write_markdown(pairs: list[Pair], rows: pd.DataFrame, stats: pd.DataFrame, dec: pd.DataFrame,
                   costs: pd.DataFrame, missing: dict[str, str], noise: pd.DataFrame | None = None,
                   spread: pd.DataFrame | None = None, groups: pd.DataFrame | None = None) -> str:
    sim_hw = sorted({str(x) for x in rows["sim_hardware"].dropna().unique()}) if len(rows) else []
    real_hw = sorted({str(x) for x in rows["real_hardware"].dropna().unique()}) if len(rows) else []
    md = ["# Simulator fidelity: backend=sim vs the real runtime", "",
          f"{len(pairs)} configs ran on both backends; {len(missing)} have no pair (listed below). "
          f"Simulated hardware: {', '.join(sim_hw) or '–'}. Real device: {', '.join(real_hw) or '–'}. "
          "Relative error = (sim - real) / real. All rows: [fidelity.csv](fidelity.csv); statistics: "
          "[fidelity_summary.csv](fidelity_summary.csv).", ""]
    md += _reference(pairs)
    md += _targets(stats)
    md += _late_starts(pairs)
    if groups is not None and len(groups):
        md += _groups(groups)
    if noise is not None and len(noise):
        md += _noise(noise, stats)
    md += _worst(rows)
    md += _where(dec, costs)
    if spread is not None and len(spread):
        md += _spread(spread)
    md += _other(stats)
    md += _per_config(pairs, rows, dec)
    if missing:
        md += ["## Configs without a pair", "", md_table(["config", "why"], [[k, v] for k, v in missing.items()]),
               ""]
    md += ["## Plots", ""]
    for name, cap in (("parity.png", "Sim vs real per metric (log-log, ±3 % and ±8 % bands)"),
                      ("error_cdf.png", "CDF of |relative error| over configs"),
                      ("step_times.png", "Mean step time per step kind and batch size, sim vs real")):
        md += [f"### {cap}", "", f"![{cap}](plots/{name})", ""]
    return "\n".join(md)
