"""Warm-up of a real backend before a run's clock starts.

A serving process pays one-time costs on its first steps: the device allocator
growing its pool for the largest activations, kernel and cuBLAS heuristic
selection for each new shape, and, with ``backend.cuda_graphs``, the capture of
one graph per batch-size bucket. Left in the run they land on the first
requests (a first 1,024-token prefill of a Gemma-3-1B shape took 89 ms on an
H100 where the second took 33 ms) and turn a run's TTFT percentiles into a
measurement of start-up. A server warms up before it accepts requests; so does
the real backend here, through its public interface (``add_request`` /
``execute`` / ``release``), with throw-away requests that use negative ids:

* one prefill step of ``prefill_tokens`` tokens (the longest prefill chunk the
  run can schedule), emitting one token;
* decode steps at every batch size in ``decode_batches`` (the CUDA-graph
  buckets when graphs are on, else the largest batch), all rows one token deep;
* one prefill step at every length in ``prefill_sizes`` (the prefill-graph
  buckets a run's chunks can pad to, when prefill graphs are on), each by a
  request of its own, released right after.

Afterwards every warm-up request is released (their KV slots are free again),
the sampling generator is re-seeded, so the run samples exactly what a run
without warm-up samples, and the backend's clock and run counters start over
(``reset_stats``: the weight streamer's bytes and copy times count the run, not
the warm-up).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from wicore.types import BatchItem, Phase, Request, StepPlan


class WarmableBackend(Protocol):
    seed: int
    generator: Any
    t0: float

    def add_request(self, req: Request) -> None: ...
    def reset_stats(self) -> None: ...
    def execute(self, plan: StepPlan) -> Any: ...
    def release(self, request_id: int) -> None: ...


def warm_up(backend: WarmableBackend, prefill_tokens: int, decode_batches: Sequence[int],
            prefill_sizes: Sequence[int] = ()) -> dict[str, Any]:
    """Run the warm-up steps on ``backend``; returns what ran and how long it took (seconds)."""
    t0 = time.perf_counter()
    batches = sorted({int(b) for b in decode_batches if int(b) > 0})
    sizes = sorted({int(s) for s in prefill_sizes if int(s) > 0})
    rows = max(batches, default=1)
    rids = [-(i + 1) for i in range(rows)]
    prompt = max(1, int(prefill_tokens))
    steps = [0]

    def run(items: list[BatchItem]) -> None:
        steps[0] -= 1
        backend.execute(StepPlan(steps[0], 0, 0.0, items))

    try:
        try:
            for i, rid in enumerate(rids):
                # the first request carries the long prompt; the others one token (decode rows only)
                backend.add_request(Request(rid, 0.0, prompt if i == 0 else 1, 1 + len(batches)))
            run([BatchItem(rids[0], Phase.PREFILL, prompt, 0, True)])
            short = [BatchItem(rid, Phase.PREFILL, 1, 0, True) for rid in rids[1:]]
            if short:
                run(short)
            ctx = {rid: prompt if i == 0 else 1 for i, rid in enumerate(rids)}  # tokens in each row's KV
            for b in batches:
                run([BatchItem(rid, Phase.DECODE, 1, ctx[rid], True) for rid in rids[:b]])
                for rid in rids[:b]:
                    ctx[rid] += 1
        finally:
            for rid in rids:
                backend.release(rid)
        # one throw-away request per prefill size, after the decode rows gave their slots back
        for size in sizes:
            backend.add_request(Request(rids[0], 0.0, size, 1))
            try:
                run([BatchItem(rids[0], Phase.PREFILL, size, 0, True)])
            finally:
                backend.release(rids[0])
    finally:
        backend.generator.manual_seed(backend.seed)
    backend.reset_stats()
    seconds = time.perf_counter() - t0
    backend.t0 = time.perf_counter()  # the run's clock starts now
    return {"prefill_tokens": prompt, "decode_batches": batches, "prefill_sizes": sizes, "seconds": round(seconds, 4)}
