"""MoR routing measured on the real runtime with the project's trained model.

Runs the same closed-loop workload (real held-out prompts from the training corpus, greedy decoding)
through the engine on ``backend=torch`` with routing off and with ``routing=mor`` over a grid of
scorer x threshold x cpu_depth x shallow device, and reports for each run the output throughput,
TPOT, the share of decode tokens that took the deep path and the throughput gain over routing off.
A warm-up run (discarded) comes first, and routing off is run again at the end to bound the drift.

    python -m benchmarks.gpu_mor --checkpoint ckpt/wicore-small --out benchmarks/results/gpu_mor
    python -m benchmarks.gpu_mor --checkpoint <micro ckpt> --device cpu --quick     # CPU check

Writes results.json and table.md (and one result folder per run under ``--runs`` when given).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Harness, fmt, write_results  # noqa: E402
from benchmarks.mor_quality import device_name, heldout_windows  # noqa: E402
from experiments.run_torch import run_torch  # noqa: E402
from wicore.model.checkpoint import spec_from_checkpoint  # noqa: E402
from wicore.model.router_weights import load_router  # noqa: E402
from wicore.server.cli import compose  # noqa: E402

H = Harness("gpu_mor")


def thresholds(ckpt: Path, scorer: str, depth: int, shares: tuple[float, ...]) -> list[float]:
    """Thresholds that send about ``shares`` of the tokens deep, from the score quantiles of the
    checkpoint's measured signals (``signals.parquet``); plus 1.0 (every token shallow)."""
    import pandas as pd

    sig = pd.read_parquet(ckpt / "signals.parquet")
    score = sig[f"router_d{depth}"] if scorer == "learned" else 1.0 - sig["confidence"]
    return [round(float(score.quantile(1.0 - s)), 4) for s in shares] + [1.0]


def grid(ckpt: Path, depths: list[int], quick: bool) -> list[tuple[str, list[str]]]:
    runs: list[tuple[str, list[str]]] = [("off", [])]
    shares = (0.5,)
    use_depths = depths[-1:] if quick else [depths[len(depths) // 2 - 1], depths[-1]]
    for dev in ("gpu", "cpu"):
        for d in use_depths:
            for scorer in ("learned", "confidence"):
                for t in thresholds(ckpt, scorer, d, shares):
                    runs.append((f"{scorer} t={t} d={d} {dev}",
                                 ["routing=mor", f"routing.scorer={scorer}", f"routing.threshold={t}",
                                  f"routing.cpu_depth={d}", f"routing.shallow_device={dev}"]))
    return runs


def report(results: dict[str, Any], spec_name: str, num_layers: int, args: argparse.Namespace) -> str:
    """Fill the gains and return the markdown table (called after every run, so a cut-off run keeps
    what it measured)."""
    runs = {k: v for k, v in results["runs"].items() if k != "warm-up"}
    base = runs.get("off", {}).get("output_tokens_per_s")
    again = runs.get("off (again)", {}).get("output_tokens_per_s")
    if base and again:
        results["baseline_drift"] = again / base - 1
    lines = [f"MoR on the real runtime: {spec_name} ({num_layers} layers) on {results['device']}; "
             f"{args.requests} requests, {args.concurrency} concurrent, prompt {args.prompt_len}, "
             f"output {args.output_len} tokens, greedy", "",
             "| run | output tok/s | gain vs off | TPOT p50 ms | deep token share |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        tps = r.get("output_tokens_per_s")
        if tps is None:
            lines.append(f"| {name} | {r.get('error', 'failed')} | | | |")
            continue
        r["gain_vs_off"] = tps / base if base else None
        lines.append(f"| {name} | {fmt(tps, 1)} | {fmt(r['gain_vs_off'], 2)} | {fmt(r['tpot_p50_ms'], 2)} | "
                     f"{fmt(r['deep_token_fraction'], 2)} |")
    if "baseline_drift" in results:
        lines += ["", f"Routing off run again at the end: {results['baseline_drift']:+.1%} vs the first run."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_mor", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_mor"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--runs", default=None, help="keep each run's result folder here")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint)
    spec = spec_from_checkpoint(ckpt)
    depths = sorted(load_router(ckpt, spec).depths)
    windows, _ = heldout_windows(ckpt, args.prompt_len, args.requests)
    prompts = [w.tolist() for w in windows]
    dev = torch.device(args.device)
    common = [f"checkpoint={ckpt}", "backend=torch", f"backend.device={args.device}",
              f"backend.max_len={args.prompt_len + args.output_len + 8}", "report.enabled=false", "progress=false",
              f"workload.num_requests={args.requests}", f"workload.concurrency={args.concurrency}",
              "workload.prompt.kind=fixed", f"workload.prompt.value={args.prompt_len}",
              "workload.output.kind=fixed", f"workload.output.value={args.output_len}",
              f"scheduler.max_num_seqs={args.concurrency}"]
    results: dict[str, Any] = {"device": device_name(dev), "checkpoint": str(ckpt), "model": spec.name,
                               "num_layers": spec.num_layers, "router_depths": depths,
                               "workload": {"requests": args.requests, "concurrency": args.concurrency,
                                            "prompt_len": args.prompt_len, "output_len": args.output_len,
                                            "prompts": "held-out stdlib windows", "sampling": "greedy"},
                               "runs": {}}
    runs_dir = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="gpu_mor_"))
    plan = [("warm-up", []), *grid(ckpt, depths, args.quick), ("off (again)", [])]
    for i, (name, extra) in enumerate(plan):
        with H.section(results["runs"], name) as r:
            summary = run_torch(compose([*common, *extra]), runs_dir / f"run{i:02d}", prompts=prompts)
            r.update({"overrides": extra, "output_tokens_per_s": summary["output_tokens_per_s"],
                      "tpot_p50_ms": summary["tpot_p50"] * 1e3, "ttft_p50_ms": summary["ttft_p50"] * 1e3,
                      "deep_token_fraction": summary.get("deep_token_fraction"),
                      "finished": summary["finished"]})
            H.log(f"{name}: {r['output_tokens_per_s']:.1f} tok/s, TPOT p50 {r['tpot_p50_ms']:.2f} ms, "
                  f"deep {r['deep_token_fraction']}")
        write_results(results, Path(args.out), report(results, spec.name, spec.num_layers, args))
    results["runs"].pop("warm-up", None)
    table = report(results, spec.name, spec.num_layers, args)
    print(table)
    write_results(results, Path(args.out), table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
