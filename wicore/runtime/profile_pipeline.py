"""Whole pipeline-parallel steps for a calibration table: ``wicore profile --pp N``.

A pipeline step (``wicore.runtime.pipeline``) is not a single-GPU step split in N: rank 0 describes the
step to every worker over gloo, each stage runs its layers eagerly and sends its hidden states on over
NCCL, the last rank samples and replies, and none of that overlaps across steps (no micro-batching).
Composing it from single-GPU rows would guess at every one of those costs, so this measures the step
itself, through ``PipelineBackend.execute`` on the ranks a run with ``parallel.pp=N`` uses:

* ``decode_step`` (pipeline launched with ``measure_attention=false``) and ``decode_step_mass`` (launched
  again with it on: the mass is summed across stages), batch x context;
* ``prefill_step`` and ``prefill_step_pair`` (one and two prefill items), tokens x context;
* ``step_overhead`` (running sequences): the host time between two decode steps of the real driver and
  engine on the pipeline backend (``profile_overhead.measure_gaps_on``);

each timed by the interval the step reports, in interleaved rounds (``timing.interleaved``), as the
single-GPU whole steps are (``wicore.runtime.profiler``). The meta records ``pp`` and the devices; the
calibrated simulator takes a table whose ``pp`` equals the run's ``parallel.pp`` and costs each step as
the measured whole step (every stage, every send, the sampling on the last rank). Not measured here:
the sampling alone and the forwards alone, and streamed layers (the stages are profiled with every
layer resident).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wicore.errors import ConfigError
from wicore.model.spec import ModelSpec
from wicore.runtime.gc_freeze import frozen_gc
from wicore.runtime.timing import interleaved, point
from wicore.types import Request

Log = Callable[[str], None]


def profile_pipeline(spec: ModelSpec, checkpoint: Path | None, device: torch.device, pp: int, grid: Any,
                     name: str, max_len: int, page_tokens: int, seed: int,
                     log: Log, cuda_graphs: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, meta entries) of the whole pipeline steps of ``grid`` (a ``ProfileGrid``) on ``pp`` ranks
    (``cuda_graphs``: the stages decode through their CUDA graphs, as runs with ``backend.cuda_graphs=true``)."""
    from wicore.runtime.pipeline import launch
    from wicore.runtime.pipeline_config import PipelineConfig, pipeline_devices
    from wicore.runtime.profile_overhead import engine_decode_times, measure_admit_gaps_on, measure_gaps_on
    from wicore.runtime.profiler import (
        _prefill_timer,
        _step_timer,
        decode_plans,
        device_name,
        prefill_step_ops,
        step_contexts,
    )

    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    devices = pipeline_devices(device, pp, spec.num_layers, visible)
    depth = grid.reps + grid.warmup + 2  # every timed execution appends one token per row
    batches = sorted({int(b) for b in grid.decode_batches})
    contexts = step_contexts(grid.decode_contexts, max_len, depth)
    prefill = [(int(t), 0) for t in grid.prefill_tokens if t + depth <= max_len]
    prefill += [(int(t), int(c)) for t, c in grid.prefill_context_points if t + c + depth <= max_len]
    if not batches or not contexts or not prefill:
        raise ConfigError(f"profile --pp {pp}: no decode or prefill point fits max_len={max_len} with the grid's "
                          f"{depth} timed tokens per point; raise --max-len or shrink the grid")
    slots = max(*batches, 2, grid.prefill_many)
    dname = " + ".join(device_name(torch.device(d)) for d in devices)
    rows: list[dict[str, Any]] = []

    def add(op: str, seconds: list[float], **coords: int) -> None:
        rows.append(point(op, name, spec.dtype, dname, seconds, **coords))

    prompt = max(max(contexts), max(t + c for t, c in prefill)) + depth
    g = torch.Generator().manual_seed(seed)
    for mass in (False, True):
        cfg = PipelineConfig(spec=spec, devices=devices, slots=slots, max_len=max_len, seed=seed,
                             checkpoint=str(checkpoint) if checkpoint is not None else None, measure_attention=mass,
                             page_tokens=page_tokens, threads=torch.get_num_threads(), cuda_graphs=cuda_graphs)
        log(f"pipeline on {', '.join(devices)}: launching (measure_attention={mass})")
        with launch(cfg) as be, frozen_gc():  # as runs time their steps (backend.gc_freeze)
            be.t0 = time.perf_counter()
            op = "decode_step_mass" if mass else "decode_step"
            log(f"{op} (pp={pp}){' (engine-driven)' if grid.engine_steps else ''}: batch {batches} x context "
                f"{contexts}")
            if grid.engine_steps:  # before the timers' requests are added: the engine brings its own
                times = engine_decode_times(be, spec, batches, contexts, grid.reps, grid.warmup, page_tokens)
            for rid in range(slots):
                ids = torch.randint(0, spec.vocab_size, (prompt,), generator=g).tolist()
                be.add_request(Request(rid, 0.0, prompt, 1 << 30, prompt_ids=ids))
            if not grid.engine_steps:
                plans = decode_plans(batches, contexts)
                times = interleaved(list(plans), _step_timer(be, plans), grid.reps, grid.warmup, grid.rounds)
            for (b, c), ts in times.items():
                add(op, ts, batch=b, context=c)
            if mass:  # the host time between steps, with the mass measured as runs do by default
                for rid in range(slots):
                    be.release(rid)
                over = [b for b in grid.overhead_batches if b <= slots]
                log(f"step_overhead (pp={pp}): batch {over}")
                for b in over:
                    add("step_overhead", measure_gaps_on(be, spec, b, steps=grid.overhead_steps, warmup=grid.warmup,
                                                         prompt_tokens=16, page_tokens=page_tokens), batch=b)
                log(f"admit_overhead (pp={pp}): batch {over}")
                for b in over:
                    add("admit_overhead", measure_admit_gaps_on(be, spec, b, rounds=grid.admit_rounds,
                                                                prompt_tokens=16, page_tokens=page_tokens), batch=b)
            else:
                for op, n in prefill_step_ops(grid, slots):
                    log(f"{op} (pp={pp}): (tokens, context) {prefill}")
                    for (t, c), ts in interleaved(prefill, _prefill_timer(be, n), grid.reps, grid.warmup,
                                                  grid.rounds).items():
                        add(op, ts, batch=n, tokens=t, context=c)
    return rows, {"pp": pp, "devices": list(devices), "kv_slots": slots}
