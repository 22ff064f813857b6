"""Timing of device work for the profiler: CUDA events on a GPU, ``perf_counter`` on the CPU.

``time_op`` runs ``fn`` ``warmup`` times, then ``reps`` times, each timed alone
(the device is idle before each run). ``wall=True`` times with the host clock
around a synchronisation on both sides: for ops that synchronise the host
themselves (sampling with ``.tolist()``, the attention-mass read-back), whose
cost is the host's wait, not only the GPU's work. ``point`` turns the timings
into a table row (median, 10th and 90th percentile). ``interleaved`` spreads the
timings of many points over rounds in a shuffled order, so that a slow phase of
the host (a burst of other work, a clock change) lands on every point a little
instead of on a few consecutive points entirely.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int, wall: bool = False) -> list[float]:
    """Seconds of each of ``reps`` runs of ``fn`` after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out: list[float] = []
    events = device.type == "cuda" and not wall
    for _ in range(reps):
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - t0)
    return out


K = TypeVar("K", bound=Hashable)


def interleaved(points: Sequence[K], timer: Callable[[K, int, int], list[float]], reps: int, warmup: int,
                rounds: int = 1, seed: int = 0) -> dict[K, list[float]]:
    """``reps`` timings of every point, taken over ``rounds`` rounds that each visit every point once in a
    freshly shuffled order. ``timer(point, n, warmup)`` returns ``n`` timings after ``warmup`` untimed
    runs; the warm-up is asked for on a point's first visit only."""
    rounds = max(1, min(int(rounds), int(reps)))
    per = math.ceil(reps / rounds)
    out: dict[K, list[float]] = {p: [] for p in points}
    order = list(points)
    rng = random.Random(seed)
    for r in range(rounds):
        if r:
            rng.shuffle(order)
        for p in order:
            n = min(per, reps - len(out[p]))
            if n > 0:
                out[p] += timer(p, n, warmup if r == 0 else 0)
    return out


def point(op: str, model: str, dtype: str, device_name: str, seconds: list[float], *, batch: int = 0,
          tokens: int = 0, context: int = 0, nbytes: int = 0) -> dict[str, Any]:
    """A calibration-table row (``sim.calibration.COLUMNS``) from the timings of one point."""
    s = np.asarray(seconds, dtype=float)
    return {"op": op, "model": model, "dtype": dtype, "device_name": device_name, "batch": batch,
            "tokens": tokens, "context": context, "nbytes": nbytes, "seconds": float(np.median(s)),
            "p10_s": float(np.percentile(s, 10)), "p90_s": float(np.percentile(s, 90)), "mean_s": float(np.mean(s)),
            "samples": len(s)}
