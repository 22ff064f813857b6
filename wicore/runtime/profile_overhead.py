"""Host overhead of one engine iteration, measured on the real engine and driver.

Between two steps the torch driver runs ``engine.update`` (tokens, finishes,
metrics rows, tier usage), its own loop (clock, due arrivals) and
``engine.schedule`` (scheduler, placement ops), and ``TorchBackend.execute``
spends time outside the interval it reports (entering / leaving
``inference_mode``, freeing the step's tensors): host time the step's own
timings do not see. Both measurements run the real ``TorchDriver`` + ``Engine``
+ ``Scheduler`` (continuous batching, FCFS, static placement, a real
``Recorder``) for ``B`` closed-loop requests that all decode together, and
take the gaps between consecutive decode steps of all ``B``:

* ``measure_step_gaps`` (the table's ``step_overhead``): with the real
  ``TorchBackend`` on the model: from the ``end`` one step reports to the
  ``start`` of the next, exactly the gap a simulated step must leave;
* ``measure_step_overhead`` (``engine_overhead``): with a backend that does no
  work and returns one token per emitting item: the engine and driver alone;
* ``measure_admit_gaps_on`` (``admit_overhead``): the gap before a step that
  admits ``B`` new requests, in a closed loop where ``B`` finish together
  just before (the host work of finishing and admitting requests, which the
  gaps between decode steps do not hold);
* ``engine_decode_times`` (``decode_step(_mass)`` with the profile grid's
  ``engine_steps``): the durations of those full-batch decode steps themselves,
  at a batch and a context, as a run records them.

Nothing is guessed: the numbers are this host's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, cast

import pandas as pd

from sim.workload import LengthDist, Workload, WorkloadConfig
from wicore.devices import probe
from wicore.engine import Engine
from wicore.hal import GIB
from wicore.memory.page_pool import PagePool
from wicore.memory.placement import MemoryConfig, StaticPlacement
from wicore.metrics import Recorder
from wicore.model.kv_cache import KVCache
from wicore.model.spec import ModelSpec
from wicore.model.transformer import Transformer
from wicore.runtime.backend import TorchBackend
from wicore.runtime.driver import TorchDriver
from wicore.scheduler.batching import ContinuousBatching
from wicore.scheduler.queues import FCFS
from wicore.scheduler.scheduler import Scheduler
from wicore.types import Phase, Request, StepPlan, StepResult


class _NullBackend:
    """Does no work: one token per emitting item; records when each ``execute`` starts and ends."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.marks: list[tuple[float, float, int, bool]] = []  # (enter, leave, items, all decode)

    def add_request(self, req: Request) -> None:
        pass

    def release(self, request_id: int) -> None:
        pass

    def execute(self, plan: StepPlan) -> StepResult:
        enter = time.perf_counter()
        now = enter - self.t0
        result = StepResult(plan.step_id, now, now,
                            tokens={it.request_id: [1] for it in plan.items if it.emits_token})
        decode = all(it.phase is Phase.DECODE for it in plan.items)
        self.marks.append((enter, time.perf_counter(), len(plan.items), decode))
        return result


def _engine(spec: ModelSpec, batch: int, prompt_tokens: int, output: int, page_tokens: int,
            requests: int | None = None) -> tuple[Engine, Workload]:
    hw = probe(measure=False)
    room = max(hw.gpu.memory_gib, 2 * spec.weight_bytes / GIB + 64)  # the placement only plans here
    hw = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, memory_gib=room))
    placement = StaticPlacement(spec, hw, [0], 1, 1, MemoryConfig(page_tokens=page_tokens))
    per_seq = -(-(prompt_tokens + output) // page_tokens)
    pool = PagePool(batch * per_seq + 1, page_tokens, placement.page_bytes)
    sched = Scheduler(ContinuousBatching(), FCFS(), pool, max_num_seqs=batch, max_batched_tokens=max(
        2048, batch * prompt_tokens), max_context=max(spec.max_context, prompt_tokens + output))
    engine = Engine(sched, placement, Recorder())
    wl = Workload(WorkloadConfig(kind="closed_loop", num_requests=requests or batch, concurrency=batch,
                                 prompt=LengthDist(value=prompt_tokens), output=LengthDist(value=output)))
    return engine, wl


def measure_step_overhead(spec: ModelSpec, batch: int, steps: int = 30, warmup: int = 3,
                          prompt_tokens: int = 16, page_tokens: int = 16) -> list[float]:
    """Seconds between consecutive ``execute`` calls of the real driver with a backend that does no work,
    while ``batch`` sequences decode (``steps`` samples after ``warmup`` gaps)."""
    engine, wl = _engine(spec, batch, prompt_tokens, steps + warmup + 2, page_tokens)
    t0 = time.perf_counter()
    backend = _NullBackend(t0)
    TorchDriver(engine, cast(Any, backend), wl, t0).run()
    gaps = [b[0] - a[1] for a, b in zip(backend.marks, backend.marks[1:])
            if a[2] == b[2] == batch and a[3] and b[3]]
    return gaps[warmup:warmup + steps] if len(gaps) > warmup else gaps


def measure_step_gaps(model: Transformer, cache: KVCache, batch: int, steps: int = 30, warmup: int = 3,
                      prompt_tokens: int = 16, page_tokens: int = 16, measure_attention: bool = True,
                      cuda_graphs: bool = False) -> list[float]:
    """Seconds from the end one decode step of ``batch`` rows reports to the start the next one reports,
    with the real ``TorchBackend`` on ``model`` / ``cache`` (``cache.max_slots >= batch``; one more with
    ``cuda_graphs``, whose padding rows use the last slot)."""
    output = steps + warmup + 2
    if cache.max_slots - int(cuda_graphs) < batch or cache.max_len < prompt_tokens + output:
        raise ValueError(f"step gaps: the cache ({cache.max_slots} slots of {cache.max_len}) cannot hold "
                         f"{batch} requests of {prompt_tokens + output} tokens")
    cache.reset()
    backend = TorchBackend(model, cache, time.perf_counter(), measure_attention=measure_attention,
                           page_tokens=page_tokens, cuda_graphs=cuda_graphs)
    return measure_gaps_on(backend, model.spec, batch, steps, warmup, prompt_tokens, page_tokens)


def drive_engine(backend: Any, spec: ModelSpec, batch: int, prompt_tokens: int, output: int, page_tokens: int = 16,
                 requests: int | None = None) -> tuple[pd.DataFrame, list[bool]]:
    """The steps frame of the real engine and driver running ``requests`` (default ``batch``) closed-loop requests,
    ``batch`` at a time, of ``prompt_tokens`` prompt and ``output`` tokens on ``backend`` (its clock restarts here),
    and which steps decode all ``batch`` and prefill nothing."""
    engine, wl = _engine(spec, batch, prompt_tokens, output, page_tokens, requests)
    t0 = backend.t0 = time.perf_counter()
    TorchDriver(engine, backend, wl, t0).run()
    st = engine.recorder.frames()[1]
    return st, ((st["decode_tokens"] == batch) & (st["prefill_tokens"] == 0)).tolist()


def engine_decode_times(backend: TorchBackend, spec: ModelSpec, batches: list[int], contexts: list[int],
                        steps: int = 30, warmup: int = 3, page_tokens: int = 16) -> dict[tuple[int, int], list[float]]:
    """Per (batch, context): the durations of ``steps`` decode steps of all ``batch`` requests, driven by the
    real engine and driver on ``backend`` (which must hold no request with an id below the batch and have its
    free KV slots), after ``warmup`` such steps; the prompts are sized so that the timed steps' contexts are
    centred on ``context``."""
    out = {}
    for b in batches:
        for c in contexts:
            prompt = max(1, c - warmup - steps // 2)
            st, full = drive_engine(backend, spec, b, prompt, steps + warmup + 2, page_tokens)
            out[(b, c)] = [d for d, f in zip(st["duration"].tolist(), full) if f][warmup:warmup + steps]
    return out


def measure_admit_gaps_on(backend: TorchBackend, spec: ModelSpec, batch: int, rounds: int = 10, warmup: int = 1,
                          prompt_tokens: int = 16, page_tokens: int = 16) -> list[float]:
    """Seconds from the end of the step in which ``batch`` closed-loop requests finish to the start of the step
    that admits the ``batch`` requests replacing them (engine.update finishing the old ones, the arrivals,
    engine.schedule admitting the new ones, backend.add_request), on ``backend`` with the real engine and driver:
    ``rounds`` such gaps after ``warmup``. Each request prefills ``prompt_tokens`` and decodes one token more, so
    a round is two steps. The backend must hold no request with an id below ``batch * (rounds + warmup + 1)``
    and have ``batch`` free KV slots; its clock restarts here."""
    st, _ = drive_engine(backend, spec, batch, prompt_tokens, 2, page_tokens, requests=batch * (rounds + warmup + 1))
    start, end = st["start"].tolist(), st["end"].tolist()
    admits = ((st["prefill_tokens"] == batch * prompt_tokens) & (st["decode_tokens"] == 0)).tolist()
    gaps = [start[k] - end[k - 1] for k in range(1, len(st)) if admits[k]]
    return gaps[warmup:warmup + rounds]


def measure_gaps_on(backend: TorchBackend, spec: ModelSpec, batch: int, steps: int = 30, warmup: int = 3,
                    prompt_tokens: int = 16, page_tokens: int = 16) -> list[float]:
    """``measure_step_gaps`` on a given backend (a ``PipelineBackend`` too), which must hold no request with an
    id below ``batch`` and have ``batch`` free KV slots; its clock restarts here."""
    st, full = drive_engine(backend, spec, batch, prompt_tokens, steps + warmup + 2, page_tokens)
    start, end = st["start"].tolist(), st["end"].tolist()
    gaps = [start[k + 1] - end[k] for k in range(len(st) - 1) if full[k] and full[k + 1]]
    return gaps[warmup:warmup + steps] if len(gaps) > warmup else gaps
