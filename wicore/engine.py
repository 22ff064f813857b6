"""The engine loop, written once for every backend.

::

    plan   = engine.schedule(now)          # scheduler + router + memory manager: pure decisions
    result = backend.execute(plan)         # sim: SimPy events; torch: real kernels and copies
    engine.update(plan, result, now)       # tokens produced, timings, feedback

The engine never reads a clock: the driver passes ``now``. One engine serves
one model replica; several replicas sit behind a load balancer
(``wicore.scheduler.load_balance``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from wicore.memory.placement import StaticPlacement
from wicore.scheduler.scheduler import Scheduler
from wicore.scheduler.sequence import Sequence
from wicore.types import MemoryOp, Phase, Request, RequestStatus, StepPlan, StepResult

PREFILL = Phase.PREFILL
RUNNING = RequestStatus.RUNNING

if TYPE_CHECKING:
    from wicore.metrics import Recorder


class Engine:
    def __init__(self, scheduler: Scheduler, placement: StaticPlacement, recorder: Recorder,
                 replica: int = 0, on_done: Callable[[Sequence], None] | None = None) -> None:
        self.scheduler = scheduler
        self.placement = placement
        self.recorder = recorder
        self.replica = replica
        self.on_done = on_done
        self.seqs: dict[int, Sequence] = {}
        self._step_id = 0
        self._last_pages = (-1, -1)

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
        ops: list[MemoryOp] | tuple[MemoryOp, ...] = self.placement.step_ops(now, out.items)
        if out.swap_out_pages or out.swap_in_pages:
            ops = list(ops)
            for g, gpb in zip(self.placement.gpus, self.placement.page_bytes_per_gpu):
                if out.swap_out_pages:
                    ops.append(MemoryOp("swap_out", f"gpu{g}", "cpu", out.swap_out_pages * gpb, device=g))
                if out.swap_in_pages:
                    ops.append(MemoryOp("swap_in", "cpu", f"gpu{g}", out.swap_in_pages * gpb, device=g))
        for seq in self.scheduler.running:
            if seq.first_scheduled < 0:
                seq.first_scheduled = now
        self._step_id += 1
        return StepPlan(self._step_id, self.replica, now, out.items, [], ops,
                        [s.request_id for s in out.preempted])

    def update(self, plan: StepPlan, result: StepResult, now: float) -> None:
        """Apply the executed step: advance prefill, emit tokens, finish requests."""
        t = result.end
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
