"""SimBackend for calibrated runs: the step runs as the real runtime runs it.

* Before the step: the host time between two steps (``step_overhead`` of the
  table: ``engine.update`` of the previous step + ``engine.schedule`` of this
  one + the driver loop + what ``execute`` spends outside the interval it
  reports; before a step that admits new requests, ``admit_overhead`` at their
  number where the table has it), so the step's own start/end/duration are
  those the torch backend reports (its clock starts inside ``execute``) and the
  gap between steps is the measured host time.
* The step's forwards (one per prefill item, one for all decodes) run one after
  the other. With weight streaming from a static placement, every forward
  streams the non-resident layers again (``StreamingTorchBackend`` copies them
  inside each forward): a step with k forwards moves k times the bytes, each
  forward overlapping its copies with its own layers (``SimBackend``'s per-layer
  overlap, once per forward). Other memory ops (swaps, evictions, prefetches,
  an HMT manager's demand fetches, which stay resident) go with the first
  forward only.

Without streaming, or with a single forward, this is ``SimBackend.execute``
with the calibrated cost of the whole step.

A table profiled under the run's GPU budget (``wicore profile --gpu-budget-gib``,
meta ``streamed_layers``) timed its steps with the layers streamed: the copies,
and how well they hid behind the layers, are already inside the measured costs.
Such a step is not gated on modelled copies again: it lasts its measured time,
and its streamed bytes are reported as one ``fetch`` over the step, as
``StreamingTorchBackend`` reports them (no separate copy time).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import replace
from typing import Any

import simpy

from sim.backend import SimBackend
from sim.calibrated_cost import CalibratedCostModel, sum_costs
from sim.hardware import Machine
from wicore.types import MemoryOp, OpTiming, Phase, StepPlan, StepResult


def _merge(results: list[StepResult]) -> StepResult:
    """The forwards of one step as one result (times from the first start to the last end)."""
    first = results[0]
    out = StepResult(first.step_id, first.start, results[-1].end, attention_mass=first.attention_mass)
    for r in results:
        out.compute_s += r.compute_s
        out.transfer_s += r.transfer_s
        out.stall_s += r.stall_s
        out.flops += r.flops
        out.hbm_bytes += r.hbm_bytes
        out.link_bytes += r.link_bytes
        out.ops.extend(r.ops)
    return out


class CalibratedSimBackend(SimBackend):
    cost: CalibratedCostModel

    def __init__(self, env: simpy.Environment, machine: Machine, cost: CalibratedCostModel, gpus: list[int],
                 record_steps: int = 20000, restream: bool = True) -> None:
        super().__init__(env, machine, cost, gpus, record_steps=record_steps)
        self.restream = restream  # static placement: streamed layers are copied again by every forward
        self._streamed: tuple[Sequence[MemoryOp] | None, tuple[MemoryOp, ...]] = (None, ())

    def _streamed_ops(self, ops: Sequence[MemoryOp]) -> tuple[MemoryOp, ...]:
        """The weight-streaming fetches of ``ops`` (cached for the last ops object: a static placement
        returns the same tuple every step and the parent caches bookings by object identity)."""
        held, streamed = self._streamed
        if held is not ops:
            streamed = tuple(op for op in ops if op.op == "fetch" and op.blocks)
            self._streamed = (ops, streamed)
        return streamed

    def execute(self, plan: StepPlan, cost: Any = None) -> Generator[simpy.Event, Any, StepResult]:
        env = self.env
        admitted = sum(1 for it in plan.items if it.phase is Phase.PREFILL and it.context_len == 0)
        overhead = self.cost.overhead_s(len(plan.items), admitted)
        if overhead > 0:
            yield env.timeout(overhead)
        passes = self.cost.passes(plan.items)
        streamed = self._streamed_ops(plan.memory_ops) if self.restream else ()
        if streamed and self.cost.streams_measured:
            return (yield from self._measured_streaming(plan, passes, streamed))
        if not streamed or len(passes) <= 1:
            return (yield from SimBackend.execute(self, plan, sum_costs(passes)))
        results = [(yield from SimBackend.execute(self, plan, passes[0]))]
        again = StepPlan(plan.step_id, plan.replica, plan.created_at, [], memory_ops=streamed)
        for pc in passes[1:]:
            results.append((yield from SimBackend.execute(self, again, pc)))
        return _merge(results)

    def _measured_streaming(self, plan: StepPlan, passes: list[Any],
                            streamed: tuple[MemoryOp, ...]) -> Generator[simpy.Event, Any, StepResult]:
        """A step whose measured cost already holds its weight streaming: its other memory ops as usual, its
        time the measured one, and every forward's streamed bytes as one fetch over the step."""
        ids = {id(op) for op in streamed}
        rest = tuple(op for op in plan.memory_ops if id(op) not in ids)
        result = yield from SimBackend.execute(self, replace(plan, memory_ops=rest), sum_costs(passes))
        moved = len(passes) * sum(op.nbytes for op in streamed)
        result.link_bytes += moved
        if plan.step_id <= self.record_steps:
            result.ops.append(OpTiming("fetch", f"pcie{streamed[0].device}", result.start, result.end, moved))
        return result
