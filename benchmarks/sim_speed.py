"""Simulator speed: simulate N requests of the reference scenario on one core.

Prints wall time of the simulation loop (start-up and result writing excluded,
shown separately), simulated requests per wall-second and SimPy events per
second; writes benchmarks/results/sim_speed/results.json and table.md.

    python benchmarks/sim_speed.py [--requests 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.build import build_sim  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def one_run(n: int, overrides: list[str]) -> dict[str, float]:
    t0 = time.perf_counter()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"workload.num_requests={n}", *overrides])
    setup = build_sim(cfg)
    t1 = time.perf_counter()
    setup.driver.run()
    t2 = time.perf_counter()
    req, steps, _ = setup.recorder.frames()
    events = next(setup.env._eid)  # type: ignore[attr-defined]  # events scheduled so far
    return {"setup_s": t1 - t0, "sim_wall_s": t2 - t1, "frames_s": time.perf_counter() - t2,
            "requests": float(len(req)), "steps": float(len(steps)), "events": float(events),
            "simulated_s": float(setup.env.now)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sim_speed")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    runs = [one_run(args.requests, args.overrides) for _ in range(args.repeat)]
    wall = statistics.median(r["sim_wall_s"] for r in runs)
    r0 = runs[0]
    row = {
        "scenario": "reference: gemma3-27b on t10x2, closed loop 32 users" + (
            f" + {' '.join(args.overrides)}" if args.overrides else ""),
        "requests": int(r0["requests"]), "steps": int(r0["steps"]), "events": int(r0["events"]),
        "sim_wall_s_median": wall, "sim_wall_s_all": [round(r["sim_wall_s"], 3) for r in runs],
        "setup_s": statistics.median(r["setup_s"] for r in runs),
        "requests_per_wall_s": r0["requests"] / wall, "events_per_s": r0["events"] / wall,
        "steps_per_s": r0["steps"] / wall, "simulated_s": r0["simulated_s"],
        "target_wall_s": 10.0, "meets_target": wall <= 10.0,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one core used, "
                   f"Python {platform.python_version()}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(row, indent=2))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in row.items()]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
