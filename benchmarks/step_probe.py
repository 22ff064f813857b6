"""Whole decode steps timed four ways: how the profiler times them and how a run drives them.

The calibrated simulator costs a decode step with the profiler's ``decode_step(_mass)`` row at its batch and
context. When a run's steps come out faster or slower than that row, this probe says which difference between
the two settings is responsible. For each (model, batch, context) point, with and without the attention-mass
readback (``backend.measure_attention``), it times the same ``TorchBackend.execute`` step:

* ``profile``: as ``wicore profile`` does: a backend holding one request per KV slot of the profiling cache,
  the step timed among the other grid points (``timing.interleaved``, a few steps per visit);
* ``profile-steady``: the same backend, this point's steps back to back;
* ``run-sized``: a backend and cache sized for ``batch`` requests (as a run at that concurrency), back to back;
* ``engine``: the real engine and driver decoding ``batch`` requests (as a run does), full-batch decode steps.

``mass_entries`` is the median number of KV pages with mass > 0 that a step of the case fed back (each one is
host work; the engine's requests were prefilled, the others attend over a KV cache that holds no prompt).

Usage (GPU machine): ``python3 benchmarks/step_probe.py --out DIR [--cpu] [--points MODEL:DTYPE:MAX_LEN:B:C ...]``.
Prints a table; writes ``DIR/step_probe.csv`` and ``DIR/step_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wicore.model.kv_cache import KVCache
from wicore.model.transformer import to_torch_dtype
from wicore.report import md_table
from wicore.runtime.gc_freeze import frozen_gc
from wicore.runtime.profile_overhead import drive_engine
from wicore.runtime.profiler import (
    ProfileGrid,
    _backend,
    _Run,
    _step_timer,
    _step_times,
    decode_plans,
    device_name,
    load_model,
    step_contexts,
)
from wicore.runtime.timing import interleaved

DEFAULT_POINTS = ("tiny-gemma3:fp32:512:16:64", "tiny-gemma3:fp32:512:4:64", "gemma3-1b:bf16:2048:16:1024")


def _count_mass(be: Any) -> list[int]:
    """Wrap ``be.execute`` to record, for every all-decode step, how many attention-mass entries (KV pages of
    its rows) it fed back: the host work of the feedback grows with them."""
    counts: list[int] = []
    execute = be.execute

    def counted(plan: Any) -> Any:
        res = execute(plan)
        if plan.items and all(it.num_tokens == 1 for it in plan.items):
            counts.append(sum(len(row) for row in res.attention_mass.values()))
        return res
    be.execute = counted
    return counts


def _engine_steps(run: _Run, batch: int, context: int, reps: int, warmup: int, mass: bool,
                  counts: dict[str, list[int]]) -> list[float]:
    """Durations of the full-batch decode steps of the real engine + driver decoding ``batch`` requests of a
    ``context``-token prompt (the first ``warmup`` left out)."""
    cache = KVCache(run.spec, batch + 1, run.cache.max_len, device=run.device, dtype=to_torch_dtype(run.spec.dtype))
    sized = _Run(run.model, run.spec, run.name, run.dtype, run.device, run.device_name, cache, run.grid, run.log,
                 run.cuda_graphs)
    be = _backend(sized, 0, 1, 16, mass, run.cuda_graphs)
    counts["engine"] = _count_mass(be)
    st, full = drive_engine(be, run.spec, batch, context, reps + warmup + 2)
    return [d for d, f in zip(st["duration"].tolist(), full) if f][warmup:warmup + reps]


def probe_point(model_name: str, dtype: str, max_len: int, batch: int, context: int, device: torch.device,
                reps: int, graphs: bool) -> list[dict[str, Any]]:
    model, spec, _ = load_model(model_name, device, dtype, 0)
    grid = ProfileGrid(reps=reps, warmup=3, rounds=3)
    depth = grid.reps + grid.warmup + 2
    batches = [b for b in grid.decode_batches if b <= 64]
    contexts = step_contexts([c for c in (16, 64, 256, 1024, 2048) if c <= max_len], max_len, depth)
    if context not in contexts:
        contexts = sorted({*contexts, context})
    slots = max(batches)
    cache = KVCache(spec, slots + int(graphs), max_len, device=device, dtype=to_torch_dtype(spec.dtype))
    run = _Run(model, spec, model_name, spec.dtype, device, device_name(device), cache, grid, lambda m: None, graphs)
    rows = []
    with torch.inference_mode(), frozen_gc():
        for mass in (False, True):
            be = _backend(run, slots, max(contexts) + depth, 16, mass, graphs)
            plans = decode_plans(batches, contexts)
            times = {"profile": interleaved(list(plans), _step_timer(be, plans), grid.reps, grid.warmup,
                                            grid.rounds)[(batch, context)]}
            counts = {"profile-steady": _count_mass(be)}  # the interleaved steps hold other batches and contexts
            times["profile-steady"] = _step_times(be, plans[(batch, context)], reps, grid.warmup)
            counts["profile"] = counts["profile-steady"]
            del be
            small = KVCache(spec, batch + int(graphs), max_len, device=device, dtype=to_torch_dtype(spec.dtype))
            sized = _Run(model, spec, model_name, spec.dtype, device, run.device_name, small, grid, run.log, graphs)
            be = _backend(sized, batch, context + depth, 16, mass, graphs)
            counts["run-sized"] = _count_mass(be)
            times["run-sized"] = _step_times(be, decode_plans([batch], [context])[(batch, context)], reps,
                                             grid.warmup)
            del be, small
            times["engine"] = _engine_steps(run, batch, context, reps, grid.warmup, mass, counts)
            for case, ts in times.items():
                s = np.asarray(ts) * 1e3
                rows.append({"model": model_name, "dtype": spec.dtype, "batch": batch, "context": context,
                             "mass": mass, "case": case, "steps": len(s), "median_ms": float(np.median(s)),
                             "p10_ms": float(np.percentile(s, 10)), "p90_ms": float(np.percentile(s, 90)),
                             "mass_entries": float(np.median(counts[case])) if counts[case] else 0.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS), help="MODEL:DTYPE:MAX_LEN:BATCH:CONTEXT")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (no CUDA graphs): a smoke test")
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    rows: list[dict[str, Any]] = []
    for p in a.points:
        try:
            m, dt, ml, b, c = p.split(":")
            point = (m, dt, int(ml), int(b), int(c))
        except ValueError:
            print(f"--points: '{p}' is not MODEL:DTYPE:MAX_LEN:BATCH:CONTEXT", file=sys.stderr)
            return 2
        rows += probe_point(*point, device=device, reps=a.reps, graphs=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["model", "dtype", "batch", "context", "mass", "case", "steps", "median_ms", "p10_ms", "p90_ms",
            "mass_entries"]
    with open(out / "step_probe.csv", "w") as f:
        f.write(",".join(cols) + "\n")
        f.writelines(",".join(str(r[k]) for k in cols) + "\n" for r in rows)
    (out / "step_probe.json").write_text(json.dumps({"device": device_name(device), "torch": torch.__version__,
                                                     "rows": rows}, indent=1))
    print(f"device: {device_name(device)}")
    print(md_table(cols, [[r[k] if not isinstance(r[k], float) else f"{r[k]:.3f}" for k in cols] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
