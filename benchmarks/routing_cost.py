"""Per-token cost of a MoR routing decision (score + threshold), through ``MoRRouter.route``.

For each batch size (1, 8, 32, 256, 4096 decode items) and each scorer, the router
routes the same batch of ``BatchItem``s over and over (every request has recorded
signals, threshold 0.5, so the decisions mix deep and shallow); the time per call is
divided by the batch size. Each figure is the median of ``--repeats`` timed runs of
about ``--budget`` seconds each. ``observe`` (feeding one step's signals back) is
timed the same way for the learned scorer. The original design's target is < 3 us per
decision. Writes benchmarks/results/routing_cost/{results.json,table.md}.

    python benchmarks/routing_cost.py [--repeats 7] [--budget 0.2]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Harness, write_results  # noqa: E402
from wicore.routing import (  # noqa: E402
    AttentionScorer,
    ConfidenceScorer,
    EntropyScorer,
    LearnedScorer,
    MoRRouter,
    RandomScorer,
    RoutingConfig,
    Scorer,
)
from wicore.types import BatchItem, Phase, StepResult  # noqa: E402

BATCHES = (1, 8, 32, 256, 4096)
SCORERS: dict[str, Callable[[], Scorer]] = {
    "learned": LearnedScorer, "confidence": ConfidenceScorer, "entropy": EntropyScorer,
    "attention": AttentionScorer, "random": lambda: RandomScorer(seed=0),
}
TARGET_NS = 3000.0  # the original design: a routing decision under 3 us


def _signals(n: int, seed: int = 0) -> dict[int, dict[str, float]]:
    rng = random.Random(seed)
    return {i: {"confidence": rng.random(), "entropy": rng.random(), "router": rng.random(),
                "attention_peak": rng.random()} for i in range(n)}


def _ns_per_token(fn: Callable[[], Any], tokens: int, repeats: int, budget: float) -> tuple[float, list[float]]:
    """Median ns per token over ``repeats`` runs of ``fn`` of about ``budget`` seconds each."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    loops = max(1, int(budget / once))
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        runs.append((time.perf_counter() - t0) / loops / tokens * 1e9)
    return statistics.median(runs), runs


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.2, help="seconds per timed run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing_cost")
    args = ap.parse_args()
    h = Harness("routing_cost")
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "threshold": 0.5, "target_ns_per_decision": TARGET_NS, "batches": {},
    }
    config = RoutingConfig(threshold=0.5, cpu_depth=8).validate(62)
    for n in BATCHES:
        items = [BatchItem(i, Phase.DECODE, 1, 512, True) for i in range(n)]
        step = StepResult(0, 0.0, 0.0, signals=_signals(n))
        row: dict[str, Any] = {}
        for name, make in SCORERS.items():
            router = MoRRouter(config, make())
            router.observe(step)
            decisions = router.route(items)
            med, runs = _ns_per_token(lambda r=router, b=items: r.route(b), n, args.repeats, args.budget)
            row[name] = {"ns_per_token": med, "runs_ns": [round(x, 1) for x in runs],
                         "deep_fraction": sum(d.path == "deep" for d in decisions) / n}
        learned = MoRRouter(config, LearnedScorer())
        med, _ = _ns_per_token(lambda r=learned, s=step: r.observe(s), n, args.repeats, args.budget)
        row["observe_learned_ns_per_token"] = med
        results["batches"][str(n)] = row
        h.log(f"batch {n}: " + ", ".join(f"{k} {v['ns_per_token']:.0f} ns" for k, v in row.items()
                                          if isinstance(v, dict)) + f", observe {med:.0f} ns")
    worst = max(v["ns_per_token"] for row in results["batches"].values() for v in row.values()
                if isinstance(v, dict))
    results["worst_ns_per_decision"] = worst
    results["meets_target"] = worst < TARGET_NS
    header = ["batch"] + [f"{s} (ns/token)" for s in SCORERS] + ["observe, learned (ns/token)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n, row in results["batches"].items():
        cells = [n] + [f"{row[s]['ns_per_token']:.0f}" for s in SCORERS] + [f"{row['observe_learned_ns_per_token']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = (f"MoR routing decision cost (score + threshold via MoRRouter.route), median of {args.repeats} runs; "
             f"{results['machine']}, 1-min load average {results['load_average_1m']}.\n\n" + "\n".join(lines)
             + f"\n\nWorst: {worst:.0f} ns per decision; target < {TARGET_NS:.0f} ns: "
             f"{'met' if results['meets_target'] else 'NOT met'}.\n")
    write_results(results, args.out, table)
    print(table)


if __name__ == "__main__":
    main()
