"""Python's full garbage collections during a real-runtime run, with and without ``backend.gc_freeze``.

    python benchmarks/gc_pauses.py [--out benchmarks/results/gc_pauses] [--device cpu]

The workload of the validation grid's ``1b-c32-long`` (32 concurrent requests, 1,024-token prompts, 256
output tokens, CUDA-graph decode where the device has them) on tiny-gemma3 with its context raised to
2,048, so a run takes seconds on the CPU. ``gc.callbacks`` time every collection of each generation
while the driver runs. The same run is done with ``backend.gc_freeze=false`` and ``true`` (each in a
fresh subprocess, so neither inherits the other's heap). ``table.md``: collections per generation, the
longest and total full-collection time, the run's wall time, how many objects were tracked and frozen.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKLOAD = ["model=tiny-gemma3", "model.max_context=2048", "backend=torch", "workload.concurrency=32",
            "workload.num_requests=32", "workload.prompt.kind=fixed", "workload.prompt.value=1024",
            "workload.output.kind=fixed", "workload.output.value=256", "scheduler.max_num_seqs=32",
            "backend.cuda_graphs=true", "report.enabled=false", "progress=false"]


def measure(device: str, freeze: bool, overrides: list[str]) -> dict[str, Any]:
    """One run in this process: every collection's generation and duration while the driver runs."""
    import gc

    from experiments.run_torch import build_torch
    from tests.conftest import make_cfg
    from wicore.runtime.driver import TorchDriver
    from wicore.runtime.gc_freeze import frozen_gc

    events: list[tuple[int, float]] = []
    started: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            events.append((int(info["generation"]), time.perf_counter() - started.pop()))

    setup = build_torch(make_cfg(*WORKLOAD, f"backend.device={device}", *overrides))
    gc.callbacks.append(callback)
    t0 = time.perf_counter()
    with frozen_gc(freeze) as frozen:
        events.clear()
        TorchDriver(setup.engine, setup.backend, setup.workload, setup.t0).run()
        tracked = len(gc.get_objects())
    wall = time.perf_counter() - t0
    gc.callbacks.remove(callback)
    full = [d for g, d in events if g == 2]
    steps = setup.recorder.frames()[1]
    dec = steps[steps.prefill_tokens == 0]
    med = float(dec.duration.median())
    return {"gc_freeze": freeze, "device": device, "wall_s": wall, "frozen_objects": frozen,
            "tracked_objects_unfrozen": tracked,
            "collections": {str(g): sum(1 for e, _ in events if e == g) for g in (0, 1, 2)},
            "full_collection_s": {"max": max(full, default=0.0), "total": sum(full)},
            "decode_steps": len(dec), "decode_step_median_s": med,
            "decode_steps_over_2x_median": int((dec.duration > 2 * med).sum())}


def markdown(rows: list[dict[str, Any]]) -> str:
    from wicore.report import md_table

    body = [[str(r["gc_freeze"]).lower(), " / ".join(str(r["collections"][g]) for g in "012"),
             f"{1e3 * r['full_collection_s']['max']:.1f} ms", f"{1e3 * r['full_collection_s']['total']:.1f} ms",
             f"{r['decode_steps_over_2x_median']} of {r['decode_steps']}", f"{r['wall_s']:.2f} s",
             f"{r['frozen_objects']:,}"] for r in rows]
    return md_table(["gc_freeze", "gen0 / gen1 / gen2 collections", "longest full collection", "all full collections",
                     "decode steps > 2x median", "run wall", "frozen objects"], body) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gc_pauses")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    ap.add_argument("--child", choices=("true", "false"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one measurement, printed as JSON for the parent
        print(json.dumps(measure(args.device, args.child == "true", args.override)))
        return 0
    rows = []
    for freeze in ("false", "true"):
        cmd = [sys.executable, __file__, "--device", args.device, "--child", freeze,
               *(f"--override={o}" for o in args.override)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = markdown(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
