"""The engine loop, written once for every backend.

::

    plan   = engine.schedule(now)          # scheduler + router + memory manager: pure decisions
    result = backend.execute(plan)         # sim: SimPy events; torch: real kernels and copies
    engine.update(plan, result, now)       # tokens produced, timings, feedback

The engine never reads a clock: the driver passes ``now``. One engine serves
one model replica; several replicas sit behind a load balancer
(``wicore.scheduler.load_balance``).

Token routing (``router``, ``wicore.routing``): ``schedule`` sets
``plan.routing`` to one decision per decode item, ``update`` feeds the step's
``StepResult.signals`` to the router, and a finished request is released from
it. In a step where routing is on and no item is deep (no prefill chunk, every
decode shallow) the GPU does not run the layers past the shallow depth, so the
weight fetches for them are dropped from the plan: with ``shallow_device=gpu``
the weight blocks of layers ``>= cpu_depth`` (an op keeps its blocks of earlier
layers, with their bytes), with ``shallow_device=cpu`` every weight fetch. Ops
not tied to a layer (``layer == -1``), KV-page fetches, prefetches, evictions
and swaps are kept. Approximations: a caching memory manager (HMT) has already
counted the dropped blocks as fetched (it believes them resident afterwards),
and the K/V weights that the KV fill of skipped layers reads are assumed to be
on the GPU.

Preemption: the ``swap_out`` / ``swap_in`` ops carry the bytes of every page the
scheduler swapped and name, in ``blocks``, the pages of each sequence whose KV
ends the step on the other side (``SchedulerOutput.net_kv_moves``: swapped in
and out again in one step, a sequence moves nowhere); ``plan.kv_dropped`` lists
the requests whose KV a recompute preemption dropped. The simulator times the
bytes; the real runtime moves the named sequences (``wicore.runtime.kv_swap``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from wicore.memory.placement import StaticPlacement
from wicore.scheduler.scheduler import Scheduler
from wicore.scheduler.sequence import Sequence
from wicore.types import (
    BlockRef,
    MemoryOp,
    Phase,
    Request,
    RequestStatus,
    RouteDecision,
    StepPlan,
    StepResult,
)

PREFILL = Phase.PREFILL
RUNNING = RequestStatus.RUNNING

if TYPE_CHECKING:
    from wicore.metrics import Recorder
    from wicore.routing.router import MoRRouter


class Engine:
    def __init__(self, scheduler: Scheduler, placement: StaticPlacement, recorder: Recorder,
                 replica: int = 0, on_done: Callable[[Sequence], None] | None = None,
                 router: MoRRouter | None = None) -> None:
        self.scheduler = scheduler
        self.router = router
        self.placement = placement
        self.recorder = recorder
        self.replica = replica
        self.on_done = on_done
        self.seqs: dict[int, Sequence] = {}
        self._step_id = 0
        self._last_pages = (-1, -1)
        self._trimmed: tuple[object, int, tuple[MemoryOp, ...]] | None = None  # ops in, layer, ops out

    # ----- requests ------------------------------------------------------------
    def add_request(self, req: Request, now: float) -> Sequence:
        seq = Sequence(req)
        reason = self.scheduler.add(seq)
        if reason:
            seq.finish_time = now
            self._done(seq)
        else:
            self.seqs[req.request_id] = seq
        return seq

    def cancel(self, request_id: int, now: float, reason: str = "cancelled") -> None:
        """Abort a request (client went away): its KV pages are freed at once."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.done:
            return
        self.scheduler.abort(seq, reason)
        seq.finish_time = now
        self._done(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def outstanding_tokens(self) -> int:
        return self.scheduler.outstanding_tokens()

    def _done(self, seq: Sequence) -> None:
        self.seqs.pop(seq.request_id, None)
        self.placement.release(seq.request_id)
        if self.router is not None:
            self.router.release(seq.request_id)
        self.recorder.request(seq, self.replica)
        if self.on_done is not None:
            self.on_done(seq)

    # ----- the loop --------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan | None:
        """Decide the next step, or None when there is nothing to run now."""
        out = self.scheduler.schedule(now)
        for seq in out.aborted:
            seq.finish_time = now
            self._done(seq)
        if not out.items:
            return None
        for seq in out.preempted:
            self.placement.release(seq.request_id)
        router = self.router
        routing: list[RouteDecision] = router.route(out.items) if router is not None else []
        ops: list[MemoryOp] | tuple[MemoryOp, ...] = self.placement.step_ops(now, out.items)
        if (router is not None and ops and len(routing) == len(out.items)
                and all(d.path != "deep" for d in routing)):  # no token deep: skip the unneeded fetches
            ops = self._without_deep_fetches(ops, router.drop_ops_layer())
        dropped: list[int] = []
        if out.kv_moves:
            to_host, to_gpu, gone = out.net_kv_moves()
            dropped = [s.request_id for s in gone]
            if to_host or to_gpu:  # only the KV that changes side moves (a swap in and straight out does not)
                ops = list(ops)
                for g, gpb in zip(self.placement.gpus, self.placement.page_bytes_per_gpu):
                    for kind, src, dst, seqs in (("swap_out", f"gpu{g}", "cpu", to_host),
                                                 ("swap_in", "cpu", f"gpu{g}", to_gpu)):
                        pages = _kv_pages(seqs, g)
                        if pages:
                            ops.append(MemoryOp(kind, src, dst, len(pages) * gpb, device=g, blocks=pages))
        for seq in self.scheduler.running:
            if seq.first_scheduled < 0:
                seq.first_scheduled = now
        self._step_id += 1
        return StepPlan(self._step_id, self.replica, now, out.items, routing, ops,
                        [s.request_id for s in out.preempted], dropped)

    def _without_deep_fetches(self, ops: list[MemoryOp] | tuple[MemoryOp, ...],
                              first_unneeded: int) -> list[MemoryOp] | tuple[MemoryOp, ...]:
        """``_drop_weight_fetches``, remembered for the last ``ops`` object (a static placement
        returns the same tuple every step, and the backend caches per op object)."""
        last = self._trimmed
        if last is not None and last[0] is ops and last[1] == first_unneeded:
            return last[2]
        out = tuple(_drop_weight_fetches(ops, first_unneeded))
        self._trimmed = (ops, first_unneeded, out)
        return out

    def update(self, plan: StepPlan, result: StepResult, now: float) -> None:
        """Apply the executed step: advance prefill, emit tokens, finish requests."""
        t = result.end
        if self.router is not None:  # before finished requests are released
            self.router.observe(result)
        finish = self.scheduler.finish
        seqs = self.seqs
        tokens = result.tokens
        prefill = decode = 0
        for item in plan.items:
            n = item.num_tokens
            is_prefill = item.phase is PREFILL
            if is_prefill:
                prefill += n
            else:
                decode += n
            seq = seqs.get(item.request_id)
            if seq is None or seq.status is not RUNNING:
                continue  # cancelled while the step ran
            seq.kv_len += n
            if is_prefill:
                seq.prefilled += n
            if not item.emits_token:
                continue
            seq.generated += 1
            stop = False
            if tokens:
                toks = tokens.get(item.request_id)
                if toks:
                    seq.token_ids.extend(toks)
                    stop = toks[-1] in seq.req.stop_token_ids
            if seq.first_token_time < 0:
                seq.first_token_time = t
            else:
                seq.itl.append(t - seq.last_token_time)
            seq.last_token_time = t
            if stop or seq.generated >= seq.req.max_output_tokens:
                finish(seq)
                seq.finish_time = t
                self._done(seq)
        self.placement.feedback(plan, result, now)
        sched = self.scheduler
        used = sched.pool.used_pages
        swapped = sched.swap_pool.used_pages if sched.swap_pool else 0
        self.recorder.step(plan, result, prefill, decode, used, len(sched.queue), len(sched.running))
        if (used, swapped) != self._last_pages or self.placement.usage_changes_every_step:
            self._last_pages = (used, swapped)
            self.recorder.tiers(t, self.replica, self.placement.tier_usage(used, swapped))


def _kv_pages(seqs: list[Sequence], device: int) -> tuple[BlockRef, ...]:
    """The KV pages of ``seqs`` on GPU ``device``, named for a swap op (the real runtime moves them;
    the simulator times the op's bytes only)."""
    return tuple(BlockRef("kv", -1, seq=s.request_id, index=p, device=device)
                 for s in seqs for p in range(s.num_blocks))


def _drop_weight_fetches(ops: list[MemoryOp] | tuple[MemoryOp, ...], first_unneeded: int) -> list[MemoryOp]:
    """``ops`` without the weight fetches of layers ``>= first_unneeded`` (0: every weight fetch).

    A fetch of weight blocks keeps its blocks of earlier layers (and their bytes, or an equal
    share per block when the op lists no sizes); a fetch without blocks is dropped when its
    ``layer >= first_unneeded``. Other ops, KV-page fetches and ops with ``layer == -1`` are kept.
    """
    out: list[MemoryOp] = []
    for op in ops:
        if op.op != "fetch" or op.layer == -1:
            out.append(op)
            continue
        if not op.blocks:
            if op.layer < first_unneeded:
                out.append(op)
            continue
        if op.blocks[0].kind != "weight":
            out.append(op)
            continue
        keep = [k for k, b in enumerate(op.blocks) if b.layer < first_unneeded]
        if len(keep) == len(op.blocks):
            out.append(op)
        elif keep:
            n = len(op.blocks)
            sizes = op.block_bytes
            nbytes = sum(sizes[k] for k in keep) if sizes else op.nbytes * len(keep) // n
            out.append(MemoryOp(op.op, op.src, op.dst, nbytes, layer=op.blocks[keep[0]].layer, device=op.device,
                                blocks=tuple(op.blocks[k] for k in keep),
                                convert_bytes=op.convert_bytes * nbytes // max(op.nbytes, 1),
                                block_bytes=tuple(sizes[k] for k in keep) if sizes else ()))
    return out
