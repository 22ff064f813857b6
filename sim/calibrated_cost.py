"""A step's cost from measured composite ops, shaped like the real runtime's step.

``TorchBackend.execute`` runs a step as: one forward per prefill item (its chunk
at its context), one batched forward for all decode items, then sampling of
the emitting rows with the step's one host sync; between steps the driver runs
``engine.update`` + ``engine.schedule`` on the host. With a calibration table
for the model and dtype (``sim.calibration``) a step therefore costs::

    sum_prefill prefill_forward(T_i, context_i)
    + decode_forward(B, mean decode context)      (decode_forward_mass when the run measures attention)
    + sample(emitting rows)
    and, before the step starts, step_overhead(items in the step)

Each forward's measured time is spread over the layers and the head in the
proportions of the roofline of that forward alone (``CostModel.step``), so the
``StepCost`` fields keep the per-layer shape the weight-streaming overlap of
``sim.backend`` needs; sampling is added to the last forward's head. An op the
table lacks for this model falls back to the roofline (that forward alone;
sample and step overhead are 0 there, as in the plain roofline) and is
reported as "roofline"; a table without forward timings for this model and
dtype leaves the step exactly the plain (one fused forward) roofline.

Whole steps: a table that also has ``decode_step(_mass)`` / ``prefill_step``
(steps timed through ``TorchBackend.execute`` itself: forward, sampling, the
host sync and the host work inside ``execute``) costs a step from them
instead, which needs no assumption about how those parts add up::

    sum_prefill [prefill_step(T_i, context_i) - sample(1)]
    + decode_step(B, mean decode context) - sample(B)
    + sample(emitting rows)

exact at the profiled points for a step of one prefill item or of decodes
only. Each whole step carries the step's fixed cost (the host work of
``execute``, its sync, building the result), so a step with more parts must
not add it once per part: when the table also has ``prefill_step_pair`` (a step
of two prefill items of the same length and context), an item after the
first, and every prefill item of a step that also decodes, costs its marginal
``prefill_step_pair(T, C) - prefill_step(T, C)`` instead::

    prefill-only: prefill_step(T_1, C_1) - sample(1) + sum_{i>1} marginal(T_i, C_i) + sample(emitting rows)
    with decodes: decode_step(B, mean context) - sample(B) + sum_i marginal(T_i, C_i) + sample(emitting rows)
    marginal(T, C) = [prefill_step_pair(T, C) - sample(2)] - [prefill_step(T, C) - sample(1)]

(a marginal is held at >= 10 % of its single-item step less sampling, so
timing noise never makes an item free). Where the table also has
``prefill_step_many`` (one step of N items, N > 2, the same for every point),
the items after the first one costed at a marginal cost
``([prefill_step_many(T, C) - sample(N)] - [prefill_step_pair(T, C) - sample(2)]) / (N - 2)``
each: what the third and later items add, which a pair cannot show. When the table was measured with CUDA-graph decode (its meta says
``cuda_graphs: true``, as for runs with ``backend.cuda_graphs=true``) a decode
of B rows runs the graph of the smallest bucket >= B (1, 2, 4, ... then the
run's ``scheduler.max_num_seqs``), so the decode ops are looked up at that
bucket size. Likewise a table measured with CUDA-graph prefill (its meta lists
``prefill_graph_buckets``, as for runs with ``backend.prefill_graphs=true``)
costs a prefill chunk of T tokens at context C as ``prefill_step`` at the
smallest length bucket >= T, the length the runtime pads it to, unless the
padded chunk would pass the table's ``max_len`` (the runtime then runs it
eagerly, and it is looked up at T).

Pipeline parallel: a table profiled with ``wicore profile --pp N`` (meta ``pp: N``)
holds whole steps through the pipeline backend, every stage and every send in
them; a run with ``parallel.pp=N`` costs its steps from those rows exactly as
above (the roofline only spreads the measured time over the layers). Any other
``tp`` / ``pp`` than the table's is refused at start-up.

A subclass rather than a flag on ``CostModel``: without a table the simulator
keeps the plain class, so roofline runs stay bit-identical and the hot path of
``CostModel.step`` is untouched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from sim.calibration import EXTRAPOLATED, INTERPOLATED, MEASURED, ROOFLINE, CalibrationTable
from sim.cost_model import CostModel, StepCost
from wicore.errors import ConfigError
from wicore.hal import HardwareSpec
from wicore.model.spec import ModelSpec
from wicore.runtime.buckets import bucket_of, default_buckets
from wicore.types import BatchItem, Phase

COMPOSITE_OPS = ("prefill_forward", "decode_forward", "decode_forward_mass", "sample", "step_overhead",
                 "admit_overhead", "prefill_step", "prefill_step_pair", "prefill_step_many", "decode_step",
                 "decode_step_mass")
_CACHE_MAX = 8192


def sum_costs(costs: list[StepCost]) -> StepCost:
    """One StepCost for forwards run one after the other (field-wise sum)."""
    if len(costs) == 1:
        return costs[0]
    fields = [f.name for f in dataclasses.fields(StepCost)]
    return StepCost(**{f: sum(getattr(c, f) for c in costs) for f in fields})


def measured_links(hw: HardwareSpec, table: CalibrationTable) -> tuple[HardwareSpec, dict[str, Any]]:
    """``hw`` with the host->GPU link bandwidth the table measured (pinned: ``h2d_pinned`` at its
    largest size; pageable: ``h2d_pageable``), and a note of what was replaced."""
    pcie = hw.pcie
    note: dict[str, Any] = {"pcie.bandwidth_gbps": {"value": pcie.bandwidth_gbps, "source": "datasheet"}}
    pinned = table.bandwidth_gbps("h2d_pinned")
    if math.isfinite(pinned) and pinned > 0:
        pcie = dataclasses.replace(pcie, bandwidth_gbps=pinned)
        note["pcie.bandwidth_gbps"] = {"value": pinned, "source": "measured h2d_pinned"}
    pageable = table.bandwidth_gbps("h2d_pageable")
    if math.isfinite(pageable) and pageable > 0 and table.has("h2d_pinned"):
        pcie = dataclasses.replace(pcie, pageable_bandwidth_gbps=pageable)
        note["pcie.pageable_bandwidth_gbps"] = {"value": pageable, "source": "measured h2d_pageable"}
    return dataclasses.replace(hw, pcie=pcie), note


class CalibratedCostModel(CostModel):
    """``CostModel`` whose step costs come from a calibration table where it has them."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, table: CalibrationTable, tp: int = 1, pp: int = 1,
                 kernels_per_layer: int = 12, measure_attention: bool = False,
                 links: dict[str, Any] | None = None, max_num_seqs: int | None = None) -> None:
        super().__init__(model, hw, tp=tp, pp=pp, kernels_per_layer=kernels_per_layer)
        name, dtype = model.name, model.dtype
        meta = table.meta_for(name, dtype)  # a merged table keeps each model's run shape
        measured_pp = int(meta.get("pp") or 1)
        if tp != 1 or pp != measured_pp:
            how = "`wicore profile` without --pp" if pp == 1 else f"`wicore profile --pp {pp}` on {pp} GPUs"
            raise ConfigError(f"backend.calibration: the table's steps were measured with pp={measured_pp} (tp=1), but "
                              f"the run uses parallel tp={tp} pp={pp}; use a table of the run's shape ({how}), set "
                              "parallel.replicas to the GPU count (tp=pp=1) or drop the table")
        self.table = table
        self.measure_attention = measure_attention
        self.links = links or {}  # link figures the table replaced (``measured_links``)
        # the attention-mass variant when the run measures attention (plain decode_forward stands in for
        # it when the table lacks it: the read-back of the mass is then not costed, and sources() says so)
        self.decode_op = "decode_forward"
        if measure_attention and (table.has("decode_forward_mass", name, dtype)
                                  or not table.has("decode_forward", name, dtype)):
            self.decode_op = "decode_forward_mass"
        # whole steps through TorchBackend.execute, preferred to the composition when the table has them
        self.step_op = "decode_step_mass" if self.decode_op == "decode_forward_mass" else "decode_step"
        self.whole_decode = table.has(self.step_op, name, dtype)
        self.whole_prefill = table.has("prefill_step", name, dtype)
        self.pair_prefill = self.whole_prefill and table.has("prefill_step_pair", name, dtype)
        # prefill_step_many: N items (its rows' batch); the items past the second add (many - pair) / (N - 2) each
        many = {int(r["batch"]) for r in table.rows
                if r["op"] == "prefill_step_many" and r["model"] == name and r["dtype"] == dtype}
        self.many_items = max(many) if self.pair_prefill and len(many) == 1 and max(many) > 2 else 0
        self.admit_measured = table.has("admit_overhead", name, dtype)
        # CUDA-graph decode: a batch of B rows runs (and costs) the bucket >= B
        self.cuda_graphs = bool(meta.get("cuda_graphs", False))
        self.buckets = default_buckets(max_num_seqs) if self.cuda_graphs and max_num_seqs else ()
        # CUDA-graph prefill: a chunk runs (and costs) its length bucket while the padded chunk fits max_len
        self.prefill_buckets = tuple(int(b) for b in meta.get("prefill_graph_buckets") or ())
        self.max_len = int(meta.get("max_len") or 0)
        # profiled under a GPU budget (``wicore profile --gpu-budget-gib``): the steps were timed with the non-resident
        # layers streamed, so the copies (and how far they hid behind the layers) are inside the measured times
        self.streams_measured = bool(meta.get("streamed_layers"))
        # without forward timings for this model the step is the plain (fused) roofline
        self.active = (table.has("prefill_forward", name, dtype) or table.has(self.decode_op, name, dtype)
                       or self.whole_decode or self.whole_prefill)
        self.counts: dict[str, dict[str, int]] = {op: {} for op in COMPOSITE_OPS}
        self.steps = 0
        self._cache: dict[tuple[Any, ...], tuple[float, str]] = {}

    # ----- table access ---------------------------------------------------------------------
    def _lookup(self, op: str, **coords: float) -> float | None:
        """Measured seconds (None: roofline), counting where the number came from."""
        key = (op, *coords.values())
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > _CACHE_MAX:
                self._cache.clear()
            hit = self._cache[key] = self.table.lookup(op, self.model.name, self.model.dtype, **coords)
        seconds, source = hit
        c = self.counts.setdefault(op, {})
        c[source] = c.get(source, 0) + 1
        return None if source == ROOFLINE else seconds

    def _forward(self, items: list[BatchItem], measured: float | None) -> StepCost:
        """The roofline of one forward, scaled to ``measured`` seconds (kept as is when None)."""
        r = CostModel.step(self, items)
        if measured is None or r.compute_s <= 0:
            return r
        s = measured / r.compute_s
        return StepCost(r.local_layer_s * s, r.global_layer_s * s, 0.0, r.head_s * s, 0.0, measured, 0.0,
                        r.flops, r.hbm_bytes, 0.0)

    # ----- the step ---------------------------------------------------------------------------
    def passes(self, items: Iterable[BatchItem]) -> list[StepCost]:
        """One StepCost per forward of the step, in the order the runtime runs them (prefill items,
        then the batched decode); sampling is part of the last one's head."""
        items = list(items)
        self.steps += 1
        if not self.active:
            for it in items:
                op = "prefill_forward" if it.phase is Phase.PREFILL else self.decode_op
                c = self.counts[op]
                c[ROOFLINE] = c.get(ROOFLINE, 0) + 1
            return [CostModel.step(self, items)]
        out: list[StepCost] = []
        decode = [it for it in items if it.phase is not Phase.PREFILL]
        emit = sum(it.emits_token for it in items)
        # the step's fixed cost rides on its first prefill item unless a whole decode step carries it
        first = not (decode and self.whole_decode)
        marginal = 0  # prefill items costed at their margin so far
        for it in items:
            if it.phase is not Phase.PREFILL:
                continue
            if self.whole_prefill:
                tokens = self._prefill_tokens(it)
                m = self._lookup("prefill_step", tokens=tokens, context=it.context_len)
                single = self._less_sample(m, 1)
                if self.pair_prefill and not first and single is not None:
                    single = self._margin(tokens, it.context_len, single, marginal)
                    marginal += 1
                first = False
                out.append(self._forward([it], single))
            else:
                m = self._lookup("prefill_forward", tokens=it.num_tokens, context=it.context_len)
                out.append(self._forward([it], m))
        if decode:
            ctx = sum(it.context_len for it in decode) / len(decode)
            rows = self._bucket(len(decode))
            if self.whole_decode:
                m = self._less_sample(self._lookup(self.step_op, batch=rows, context=ctx), len(decode))
            else:
                m = self._lookup(self.decode_op, batch=rows, context=ctx)
            out.append(self._forward(decode, m))
        if not out:
            out.append(CostModel.step(self, items))
        if emit:
            sample = self._lookup("sample", batch=emit) or 0.0
            last = out[-1]
            out[-1] = dataclasses.replace(last, head_s=last.head_s + sample, compute_s=last.compute_s + sample)
        return out

    def _margin(self, tokens: int, context: int, single: float, before: int) -> float:
        """What one more prefill item of ``tokens`` at ``context`` adds to a step, less sampling, when ``before``
        items were added at their margin already: the pair's margin for the first, the many-item step's
        margin per item past the pair for the others (where the table has ``prefill_step_many``); held at
        >= 10 % of the single-item step."""
        pair = self._less_sample(self._lookup("prefill_step_pair", tokens=tokens, context=context), 2)
        if pair is None:
            return single
        margin = pair - single
        if before and self.many_items:
            many = self._less_sample(self._lookup("prefill_step_many", tokens=tokens, context=context),
                                     self.many_items)
            if many is not None:
                margin = (many - pair) / (self.many_items - 2)
        return max(margin, 0.1 * single)

    def _bucket(self, rows: int) -> int:
        """The batch size a decode of ``rows`` rows runs at (its CUDA-graph bucket; ``rows`` without graphs)."""
        return bucket_of(rows, self.buckets) or rows

    def _prefill_tokens(self, it: BatchItem) -> int:
        """The length a prefill chunk runs at (its CUDA-graph bucket when it fits; its own without graphs)."""
        b = bucket_of(it.num_tokens, self.prefill_buckets) if self.prefill_buckets else None
        if b is None or (self.max_len and it.context_len + b > self.max_len):
            return it.num_tokens
        return b

    def _less_sample(self, whole: float | None, rows: int) -> float | None:
        """A whole step's time without its sampling of ``rows`` rows (added back once for the whole step)."""
        if whole is None:
            return None
        sample = self._lookup("sample", batch=rows) or 0.0
        return max(whole - sample, 0.05 * whole)

    def step(self, items: Iterable[BatchItem]) -> StepCost:
        return sum_costs(self.passes(items))

    def overhead_s(self, running: int, admitted: int = 0) -> float:
        """Host time before a step of ``running`` sequences (engine.update + engine.schedule): ``admit_overhead``
        at the number of requests the step admits where it admits some and the table has it (finishing and
        admitting requests costs more host time than a step between decodes), else ``step_overhead``."""
        if not self.active:
            return 0.0
        if admitted and self.admit_measured:
            return self._lookup("admit_overhead", batch=admitted) or 0.0
        return self._lookup("step_overhead", batch=running) or 0.0

    # ----- results ------------------------------------------------------------------------------
    def sources(self) -> dict[str, Any]:
        """Per composite op: "measured" (the table has it for this model and dtype) or "roofline",
        and how many lookups were exact, interpolated, extrapolated or fell back to the roofline."""
        name, dtype = self.model.name, self.model.dtype
        ops: dict[str, Any] = {}
        many = ("prefill_step_many",) if self.many_items else ()  # used only with one item count, past a pair
        used = [op for op in ("prefill_step", "prefill_step_pair", *many, self.step_op)
                if self.active and self.table.has(op, name, dtype)]
        overheads = ("step_overhead", "admit_overhead") if self.admit_measured else ("step_overhead",)
        for op in (*used, "prefill_forward", self.decode_op, "sample", *overheads):
            c = self.counts.get(op, {})
            ops[op] = {"source": MEASURED if self.active and self.table.has(op, name, dtype) else ROOFLINE,
                       "lookups": {k: c.get(k, 0) for k in (MEASURED, INTERPOLATED, EXTRAPOLATED, ROOFLINE)}}
        if self.measure_attention and self.decode_op == "decode_forward":
            ops["decode_forward"]["note"] = ("the table has no decode_forward_mass for this model: the attention-"
                                             "mass read-back is not costed")
        return {"calibrated": True, "table": self.table.describe(), "model": name, "dtype": dtype,
                "measure_attention": self.measure_attention, "steps": self.steps, "ops": ops,
                "whole_steps": used, "cuda_graphs": self.cuda_graphs, "graph_buckets": list(self.buckets),
                "prefill_graph_buckets": list(self.prefill_buckets), "pp": self.pp,
                "weight_streaming": ("measured: inside the steps' times (profiled under the GPU budget)"
                                     if self.streams_measured else "modelled: link bandwidth, overlapped per layer"),
                "links": self.links}


def roofline_sources(model: ModelSpec) -> dict[str, Any]:
    """``sources()`` of a run without a table: every op from the datasheet roofline."""
    return {"calibrated": False, "table": None, "model": model.name, "dtype": model.dtype,
            "ops": {op: {"source": ROOFLINE} for op in ("prefill_forward", "decode_forward", "sample",
                                                        "step_overhead")}}
