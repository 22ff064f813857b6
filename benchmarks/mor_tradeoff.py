"""MoR quality vs speed on the project's trained model: one table and plot from three sources.

* measured speed: ``benchmarks/results/gpu_mor`` (the real runtime on a GPU, routing off vs on);
* simulated speed: the same workload and routing settings on ``backend=sim`` with the GPU's hardware
  profile (default h100), the trained model's spec (``model=wicore-small``) and routing signals sampled
  from the signals measured on that model (``benchmarks/results/wicore_small/signals.parquet``; the
  ``router`` column is the learned router of the run's ``cpu_depth``);
* quality: ``benchmarks/results/mor_quality`` (teacher-forced next-token agreement and perplexity change
  vs full depth), interpolated at the deep-token share the real run measured, for the run's scorer and
  ``cpu_depth`` (``gpu_depth`` = all layers).

    python benchmarks/mor_tradeoff.py [--hardware h100] [--out benchmarks/results/mor_tradeoff]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.run import run_sim  # noqa: E402
from wicore.server.cli import compose  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def quality_at(quality: pd.DataFrame, scorer: str, depth: int, deep: float) -> tuple[float, float]:
    """Agreement and perplexity change (%) at deep-token share ``deep`` (linear between grid points)."""
    q = quality[(quality.scorer == scorer) & (quality.cpu_depth == depth)
                & (quality.gpu_depth == quality.gpu_depth.max())].sort_values("deep_fraction")
    return (float(np.interp(deep, q.deep_fraction, q.agreement)),
            float(np.interp(deep, q.deep_fraction, q.ppl_change_pct)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hardware", default="h100")
    ap.add_argument("--out", type=Path, default=RESULTS / "mor_tradeoff")
    args = ap.parse_args(argv)
    measured = json.loads((RESULTS / "gpu_mor" / "results.json").read_text())
    quality = pd.read_csv(RESULTS / "mor_quality" / "results.csv")
    signals = pd.read_parquet(RESULTS / "wicore_small" / "signals.parquet")
    wl = measured["workload"]
    common = ["model=wicore-small", f"hardware={args.hardware}", "report.enabled=false", "progress=false",
              f"workload.num_requests={wl['requests']}", f"workload.concurrency={wl['concurrency']}",
              "workload.prompt.kind=fixed", f"workload.prompt.value={wl['prompt_len']}",
              "workload.output.kind=fixed", f"workload.output.value={wl['output_len']}",
              f"scheduler.max_num_seqs={wl['concurrency']}"]
    tmp = Path(tempfile.mkdtemp(prefix="mor_tradeoff_"))
    rows: list[dict[str, Any]] = []
    sim_off = None
    for name, run in measured["runs"].items():
        if "output_tokens_per_s" not in run or name == "off (again)":
            continue
        extra = list(run["overrides"])
        opts = dict(o.split("=", 1) for o in extra if "=" in o and o.startswith("routing."))
        depth = int(opts.get("routing.cpu_depth", 0))
        if depth:
            table = tmp / f"signals_d{depth}.parquet"
            if not table.exists():
                signals.assign(router=signals[f"router_d{depth}"]).to_parquet(table)
            extra.append(f"routing.signals_table={table}")
        sim = run_sim(compose([*common, *extra]), tmp / f"sim{len(rows)}")
        sim_tps = sim["output_tokens_per_s"]
        if name == "off":
            sim_off = sim_tps
        row: dict[str, Any] = {"run": name, "scorer": opts.get("routing.scorer", "-"), "cpu_depth": depth or None,
                               "shallow_device": opts.get("routing.shallow_device", "-"),
                               "threshold": float(opts["routing.threshold"]) if depth else None,
                               "deep_share_measured": run.get("deep_token_fraction"),
                               "deep_share_sim": sim.get("deep_token_fraction"),
                               "gain_measured": run["gain_vs_off"], "tok_s_measured": run["output_tokens_per_s"],
                               "tok_s_sim": sim_tps}
        if depth:
            row["agreement"], row["ppl_change_pct"] = quality_at(quality, row["scorer"], depth,
                                                                 float(run["deep_token_fraction"]))
        else:
            row["agreement"], row["ppl_change_pct"] = 1.0, 0.0
        rows.append(row)
    for r in rows:
        r["gain_sim"] = r["tok_s_sim"] / sim_off if sim_off else None
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "results.csv", index=False)
    lines = [f"MoR quality vs speed, {measured['model']} ({measured['num_layers']} layers). Measured on "
             f"{measured['device']}; simulated on the `{args.hardware}` profile with the model's measured "
             "routing signals; quality: teacher-forced, interpolated at the measured deep share.", "",
             "| run | deep share (real / sim) | next-token agreement | ppl change | gain measured | gain simulated |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ds = "-" if r["deep_share_measured"] is None or r["cpu_depth"] is None else \
            f"{r['deep_share_measured']:.2f} / {r['deep_share_sim']:.2f}"
        lines.append(f"| {r['run']} | {ds} | {r['agreement'] * 100:.1f} % | {r['ppl_change_pct']:+.1f} % | "
                     f"{r['gain_measured']:.2f}x | {r['gain_sim']:.2f}x |")
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)
    plot(df, args.out / "quality_vs_gain.png", measured["device"], args.hardware)
    return 0


def plot(df: pd.DataFrame, path: Path, device: str, hardware: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    for ax, col, title in ((fig.add_subplot(1, 2, 1), "gain_measured", f"measured ({device})"),
                           (fig.add_subplot(1, 2, 2), "gain_sim", f"simulated ({hardware} profile)")):
        for (dev, scorer), g in df[df.cpu_depth.notna()].groupby(["shallow_device", "scorer"]):
            ax.scatter(g["agreement"] * 100, g[col], label=f"{scorer}, shallow on {dev}",
                       marker="o" if dev == "gpu" else "s")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("next-token agreement with full depth (%)")
        ax.set_ylabel("throughput vs routing off (x)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("MoR on the trained 12-layer model: quality vs throughput gain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
