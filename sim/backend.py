"""SimBackend: executes a StepPlan as SimPy events on the modelled machine.

A step of one replica:

1. every memory op becomes a flow on the PCIe link of its GPU (host->GPU for
   fetch / prefetch / swap-in, GPU->host for evict / swap-out; NVMe reads
   cross the NVMe and the PCIe link), sharing bandwidth with every other
   flow in the machine (``sim.hardware.FlowNetwork``);
2. the layers compute in order; a layer whose weights are being streamed
   starts when its last byte has arrived (bytes arrive in layer order at the
   rate the link gave the flow), so copies overlap with the compute of the
   layers before them and the rest shows up as stall time:
   ``end = max(compute, max_k(ready_k + compute of layers k..L))``;
3. KV swap-ins must complete before the step computes; swap-outs run
   alongside it;
4. with a token router (``routing``, set when routing is on), a plan whose
   decode tokens were split deep/shallow is costed by ``sim.routing_cost``
   (per-layer GPU times, the shallow layers on the CPU, KV fill, transfers);
   ``signals`` fills ``StepResult.signals`` for every item that emits a token.

``execute`` is a SimPy process body: the sim driver runs it with
``yield from`` and gets the ``StepResult``.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import simpy

from sim.attention_model import SyntheticAttention
from sim.cost_model import CostModel, StepCost
from sim.hardware import Machine, TransferRecord
from sim.route_signals import SyntheticSignals
from sim.routing_cost import RoutedStep, RoutingCost
from wicore.model.spec import ModelSpec
from wicore.types import MemoryOp, OpTiming, StepPlan, StepResult

UPLOADS = ("fetch", "prefetch", "swap_in")


class _Stream:
    """Per streamed-weights op: for each block k (in arrival order) the fraction
    of the op's bytes that has arrived when k is complete, the local / global
    layers from k's layer to the end, and the share of the op's format
    conversion still to do from k on."""

    __slots__ = ("matrix",)

    def __init__(self, layers: tuple[int, ...], sizes: tuple[int, ...], model: ModelSpec) -> None:
        w = np.asarray(sizes, dtype=float) if sizes else np.ones(len(layers))
        frac = np.cumsum(w) / w.sum()
        conv_suffix = (np.cumsum(w[::-1])[::-1]) / w.sum()
        glob = np.array([model.is_global(i) for i in range(model.num_layers)])
        suffix_g = np.cumsum(glob[::-1])[::-1]
        suffix_all = np.arange(model.num_layers, 0, -1)
        idx = np.asarray(layers)
        n_global = suffix_g[idx].astype(float)
        n_local = (suffix_all[idx] - suffix_g[idx]).astype(float)
        # finish_k = first_byte + D * frac_k + n_local_k * c_local + n_global_k * c_global + conv_k * C
        self.matrix = np.stack([frac, n_local, n_global, conv_suffix], axis=1)


class SimBackend:
    def __init__(self, env: simpy.Environment, machine: Machine, cost: CostModel, gpus: list[int],
                 record_steps: int = 20000) -> None:
        self.env = env
        self.machine = machine
        self.cost = cost
        self.gpus = gpus
        self.record_steps = record_steps  # keep op timings of the first N steps (trace.json)
        self._streams: dict[tuple[tuple[int, ...], tuple[int, ...]], _Stream] = {}
        self._by_id: dict[int, tuple[MemoryOp, _Stream]] = {}
        self.book_uncontended = True  # exact event-free path for transfers that provably run alone
        self._bookable: dict[int, tuple[Sequence[MemoryOp], list[Any]]] = {}  # ops (held) -> their links
        self.attention: SyntheticAttention | None = None  # set: report attention mass per KV page
        self.lookahead: int | None = None  # layers fetched ahead of compute (None: the whole step at once)
        self.routing: RoutingCost | None = None  # set: cost plans with MoR routing decisions
        self.signals: SyntheticSignals | None = None  # set: report routing signals per emitted token
        # dequantising fetched blocks on the GPU: read the stored bytes, write the hot ones
        self.convert_bw = machine.spec.gpu.mem_bandwidth_gbps * 1e9 * machine.spec.gpu.bandwidth_efficiency

    def _gated_finish(self, streams: list[tuple[MemoryOp, TransferRecord]], cost: StepCost,
                      start: float, layer_s: Sequence[float] | None = None) -> tuple[float, float]:
        """End of a step whose fetches are issued with a lookahead of ``self.lookahead`` layers:
        blocks of the first ``lookahead`` layers are requested at the step start, those of layer
        ``l + lookahead`` when layer ``l`` starts computing; each link moves its blocks one after
        another at the rate its flow got; a layer starts when its blocks (on every GPU) are in
        and runs its blocks' dequantisation, then its kernels. The flows themselves ran back to back, so the link is
        modelled busy for less time than the gating implies (a documented approximation).
        ``layer_s``: per-layer compute times (a routed step) instead of ``cost``'s local/global ones."""
        la = max(1, int(self.lookahead or 1))
        model = self.cost.model
        per_layer = {True: cost.global_layer_s + cost.comm_per_layer_s,
                     False: cost.local_layer_s + cost.comm_per_layer_s}
        # per op: its blocks (layer, seconds on the link, conversion seconds), next block, link free time
        queues: list[list[Any]] = []
        compute_conv = 0.0
        for op, rec in streams:
            busy = max(rec.end - rec.first_byte, 1e-15)
            sizes = op.block_bytes or tuple([1] * len(op.blocks))
            total = float(sum(sizes))
            conv = 2 * op.convert_bytes / self.convert_bw if op.convert_bytes else 0.0
            compute_conv += conv
            blocks = [(b.layer, busy * sz / total, conv * sz / total) for b, sz in zip(op.blocks, sizes)]
            queues.append([blocks, 0, rec.first_byte])
        ready: dict[int, float] = {}
        convert: dict[int, float] = {}  # dequantisation runs on the GPU before the layer

        def issue(upto: int, not_before: float) -> None:
            for q in queues:
                blocks, k, free = q
                while k < len(blocks) and blocks[k][0] <= upto:
                    layer, sec, conv_s = blocks[k]
                    free = max(free, not_before) + sec
                    ready[layer] = max(ready.get(layer, 0.0), free)
                    convert[layer] = convert.get(layer, 0.0) + conv_s
                    k += 1
                q[1], q[2] = k, free

        issue(la - 1, start)
        t = start
        for layer in range(model.num_layers):
            s_l = max(t, ready.get(layer, start))
            issue(layer + la, s_l)
            t = s_l + convert.get(layer, 0.0) + (per_layer[model.is_global(layer)] if layer_s is None
                                                 else layer_s[layer])
        return t + cost.head_s + cost.pp_transfer_s, compute_conv

    def _attention_feedback(self, plan: StepPlan, result: StepResult) -> None:
        """Attention mass per KV page of every decoding sequence, from the synthetic model."""
        assert self.attention is not None
        for it in plan.items:
            if it.num_tokens != 1:
                continue
            masses = self.attention.masses(it.request_id, it.context_len + 1)
            result.attention_mass[it.request_id] = masses.tolist()

    def _stream(self, op: MemoryOp) -> _Stream:
        """The op's arrival profile; cached by identity for ops reused every step (the
        held reference keeps the id from being recycled) and by content otherwise."""
        hit = self._by_id.get(id(op))
        if hit is not None and hit[0] is op:
            return hit[1]
        key = (tuple(b.layer for b in op.blocks), op.block_bytes)
        st = self._streams.get(key)
        if st is None:
            if len(self._streams) > 512:
                self._streams.clear()
            st = self._streams[key] = _Stream(key[0], key[1], self.cost.model)
        if len(self._by_id) > 512:
            self._by_id.clear()
        self._by_id[id(op)] = (op, st)
        return st

    def _book_alone(self, ops: Sequence[MemoryOp]) -> list[tuple[MemoryOp, TransferRecord]] | None:
        """Weight-streaming ops from host memory, one per GPU link, on idle links: book them
        exactly without events (``Machine.reserve_h2d``). None when any op needs the flow model."""
        links = self._bookable.get(id(ops))
        if links is None or links[0] is not ops:
            devices = set()
            for op in ops:
                if op.op != "fetch" or op.src != "cpu" or not op.blocks or op.device in devices:
                    return None
                devices.add(op.device)
            if self.machine.upstream is not None:
                return None
            if len(self._bookable) > 64:
                self._bookable.clear()
            links = self._bookable[id(ops)] = (ops, [self.machine.gpus[op.device].link for op in ops])
        now = float(self.env.now)
        for link in links[1]:
            if link.active or now < link.reserved_until:
                return None
        m = self.machine
        booked = []
        for op in ops:
            rec = m.reserve_h2d(op.device, op.nbytes, op.op)
            assert rec is not None
            booked.append((op, rec))
        return booked

    def _flow(self, op: MemoryOp) -> simpy.Event:
        m = self.machine
        name = f"{op.op} L{op.layer}" if op.layer >= 0 else op.op
        if op.op in UPLOADS:
            if op.src == "nvme":
                return m.nvme_to_gpu(op.device, op.nbytes, name=name)
            return m.h2d(op.device, op.nbytes, name=name)
        if op.dst == "nvme":
            return m.gpu_to_nvme(op.device, op.nbytes, name=name)
        return m.d2h(op.device, op.nbytes, name=name)

    def execute(self, plan: StepPlan, cost: StepCost | None = None) -> Generator[simpy.Event, Any, StepResult]:
        """Run ``plan``; ``cost``: its compute cost when the caller has it (calibrated forwards),
        else ``self.cost.step(plan.items)`` (or the routed cost of ``self.routing``)."""
        env = self.env
        t0 = float(env.now)
        routed: RoutedStep | None = None
        if cost is None:
            routed = self.routing.step(plan) if self.routing is not None and plan.routing else None
            cost = self.cost.step(plan.items) if routed is None else routed.gpu
        compute = cost.compute_s + cost.comm_s
        result = StepResult(plan.step_id, t0, t0, compute_s=compute, flops=cost.flops,
                            hbm_bytes=cost.hbm_bytes)
        if self.attention is not None:
            self._attention_feedback(plan, result)
        if self.signals is not None:
            self.signals.fill(plan.items, result.signals)
        ops = plan.memory_ops
        record = plan.step_id <= self.record_steps
        if not ops:
            yield env.timeout(compute if routed is None else routed.end(t0, t0 + routed.layers_s) - t0)
            result.end = float(env.now)
            if record:
                result.ops.append(OpTiming("compute", f"gpu{self.gpus[0]}", t0, result.end, 0, cost.flops))
            if routed is not None:
                self._routed_result(routed, result, t0, record)
            return result
        start = t0
        finish = start + compute
        compute_conv = 0.0
        booked = self._book_alone(ops) if self.book_uncontended else None
        streams: list[tuple[MemoryOp, TransferRecord]] = []
        if booked is not None:  # uncontended weight streaming: exact, no flow events
            flows: list[tuple[MemoryOp, Any]] = list(booked)
            streams = booked
        else:
            flows = [(op, self._flow(op)) for op in ops]
            swap_in = [ev for op, ev in flows if op.op == "swap_in"]
            if swap_in:  # the swapped-in KV must land before the step computes
                yield env.all_of(swap_in)
            start = float(env.now)
            finish = start + compute
            pending = [(op, ev) for op, ev in flows if op.blocks and op.op == "fetch"]
            if pending:
                yield env.all_of([ev for _, ev in pending]) if len(pending) > 1 else pending[0][1]
            streams = [(op, ev.value) for op, ev in pending]
        if routed is not None:
            finish, compute_conv = routed.finish(start, streams, self)
        elif streams and self.lookahead is not None:
            finish, compute_conv = self._gated_finish(streams, cost, start)
        elif streams:
            coef = np.array((0.0, cost.local_layer_s + cost.comm_per_layer_s,
                             cost.global_layer_s + cost.comm_per_layer_s, 0.0))
            tail = cost.head_s + cost.pp_transfer_s
            for op, rec in streams:
                st = self._stream(op)
                coef[0] = rec.end - rec.first_byte
                conv = 2 * op.convert_bytes / self.convert_bw if op.convert_bytes else 0.0
                coef[3] = conv
                compute_conv += conv
                finish = max(finish, rec.first_byte + float((st.matrix @ coef).max()) + tail)
            finish = max(finish, start + compute + compute_conv)
        now = float(env.now)
        if finish > now:
            yield env.timeout(finish - now)
        if booked is None:
            others = [ev for op, ev in flows if op.op != "swap_in" and not (op.op == "fetch" and op.blocks)]
            if others:  # swap-outs / evictions / prefetches finish before the next step reuses the pages
                yield env.all_of(others)
            flows = [(op, ev.value) for op, ev in flows]
        end = float(env.now)
        result.end = end
        result.compute_s = compute + compute_conv
        result.stall_s = max(0.0, end - t0 - compute - compute_conv)
        link_bytes = 0
        busy = 0.0
        for op, done in flows:
            link_bytes += op.nbytes
            busy = max(busy, done.end - done.start)
            if record:
                result.ops.append(OpTiming(op.op, f"pcie{op.device}", done.start, done.end, op.nbytes))
        result.link_bytes = link_bytes
        result.transfer_s = busy
        if record:
            result.ops.append(OpTiming("compute", f"gpu{self.gpus[0]}", start, start + compute, 0, cost.flops))
        if routed is not None:
            self._routed_result(routed, result, start, record)
        return result

    def _routed_result(self, routed: RoutedStep, result: StepResult, start: float, record: bool) -> None:
        """Add a routed step's CPU part and routing transfers (``sim.routing_cost``) to ``result``."""
        result.stall_s = max(0.0, result.end - result.start - result.compute_s)
        result.link_bytes += routed.link_bytes
        result.transfer_s = max(result.transfer_s, routed.xfer_s)
        if record and routed.cpu_s > 0:
            cpu_end = start + routed.cpu_s
            result.ops.append(OpTiming("shallow layers", "cpu", start, cpu_end, int(routed.cpu_bytes),
                                       routed.cpu_flops))
            if routed.xfer_s > 0:
                result.ops.append(OpTiming("routing transfers", f"pcie{self.gpus[0]}", cpu_end,
                                           cpu_end + routed.xfer_s, routed.link_bytes))
