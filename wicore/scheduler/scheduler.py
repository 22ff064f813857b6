"""The request scheduler of one model replica.

Bookkeeping lives here (waiting queue, running set, KV page accounting,
admission, preemption, deadlines); the decisions of *which* tokens run in a
step belong to the batching policy (``wicore.scheduler.batching``) and the
order of the queue to the queue policy (``wicore.scheduler.queues``).

Pure policy code: no clock (``now`` is an argument), no I/O, no simpy/torch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from wicore.errors import ConfigError
from wicore.memory.page_pool import PagePool
from wicore.scheduler.batching import BatchingPolicy
from wicore.scheduler.queues import QueuePolicy, WaitingQueue
from wicore.scheduler.sequence import Sequence
from wicore.types import BatchItem, Phase, RequestStatus

PREEMPTION_MODES = ("recompute", "swap")


@dataclass
class SchedulerOutput:
    """One step's decisions. ``kv_moves``: in the order they were decided, what happened to a
    sequence's KV pages: ``swap_out`` (to ``swap_pool``), ``swap_in`` (back) or ``drop`` (recompute
    preemption); ``swap_out_pages`` / ``swap_in_pages`` count the pages of every swap (a sequence
    swapped in and out again in one step counts both ways)."""

    items: list[BatchItem] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    aborted: list[Sequence] = field(default_factory=list)
    swap_out_pages: int = 0
    swap_in_pages: int = 0
    kv_moves: list[tuple[Sequence, str]] = field(default_factory=list)

    def net_kv_moves(self) -> tuple[list[Sequence], list[Sequence], list[Sequence]]:
        """Where each moved sequence's KV is after the step compared with before it:
        (swapped out: accelerator -> host, swapped in: host -> accelerator, dropped: gone, from
        either). A sequence moved there and back in one step is in none of them."""
        first: dict[int, str] = {}
        last: dict[int, tuple[Sequence, str]] = {}
        for seq, move in self.kv_moves:
            first.setdefault(seq.request_id, move)
            last[seq.request_id] = (seq, move)
        out: list[Sequence] = []
        back: list[Sequence] = []
        dropped: list[Sequence] = []
        for rid, (seq, move) in last.items():
            on_host_before = first[rid] == "swap_in"
            if move == "drop":
                dropped.append(seq)
            elif move == "swap_out" and not on_host_before:
                out.append(seq)
            elif move == "swap_in" and on_host_before:
                back.append(seq)
        return out, back, dropped


class Scheduler:
    """Admission by KV memory, preemption, deadlines and limits for one replica.

    ``max_num_seqs``: most sequences running at once (max concurrency).
    ``max_batched_tokens``: most tokens in one step (the chunked-prefill token
    budget; for continuous batching the largest prefill batch).
    ``preemption``: ``recompute`` (drop KV, prefill again later) or ``swap``
    (move KV pages to ``swap_pool`` in host memory and back).
    """

    def __init__(self, batching: BatchingPolicy, queue: QueuePolicy, pool: PagePool,
                 max_num_seqs: int, max_batched_tokens: int, max_context: int,
                 preemption: str = "recompute", swap_pool: PagePool | None = None) -> None:
        if max_num_seqs <= 0:
            raise ConfigError(f"scheduler.max_num_seqs: must be > 0, got {max_num_seqs}")
        if max_batched_tokens <= 0:
            raise ConfigError(f"scheduler.max_batched_tokens: must be > 0, got {max_batched_tokens}")
        if preemption not in PREEMPTION_MODES:
            raise ConfigError(f"scheduler.preemption: unknown '{preemption}', use one of {PREEMPTION_MODES}")
        if preemption == "swap" and swap_pool is None:
            raise ConfigError("scheduler.preemption=swap needs host memory for swapped KV pages")
        self.batching = batching
        self.queue = WaitingQueue(queue)
        self.pool = pool
        self.swap_pool = swap_pool
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_context = max_context
        self.preemption = preemption
        self.running: list[Sequence] = []
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._order = 0
        self.preemptions = 0
        self._out = SchedulerOutput()

    # ----- requests in / out -------------------------------------------------
    def add(self, seq: Sequence) -> str:
        """Queue a sequence. Returns '' or the reason it was rejected (aborted)."""
        total = seq.req.prompt_tokens + seq.req.max_output_tokens
        reason = ""
        if seq.req.prompt_tokens <= 0 or seq.req.max_output_tokens <= 0:
            reason = "empty_request"
        elif total > self.max_context:
            reason = "exceeds_context"
        elif self.pool.pages_for(total) > self.pool.num_pages:
            reason = "exceeds_kv_capacity"
        if reason:
            seq.status = RequestStatus.ABORTED
            seq.abort_reason = reason
            return reason
        seq.status = RequestStatus.WAITING
        self.queue.push(seq)
        if seq.deadline is not None:
            heapq.heappush(self._deadlines, (seq.deadline, seq.request_id, seq))
        return ""

    def abort(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        if seq in self.queue:
            self.queue.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._free(seq)
        seq.status = RequestStatus.ABORTED
        seq.abort_reason = reason

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = RequestStatus.FINISHED

    def _free(self, seq: Sequence) -> None:
        if seq.swapped and self.swap_pool is not None:
            self.swap_pool.release(seq.num_blocks)
            seq.swapped = False
        elif seq.num_blocks:
            self.pool.release(seq.num_blocks)
        seq.num_blocks = 0

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.queue) > 0

    def outstanding_tokens(self) -> int:
        """Tokens still to process: remaining prefill + remaining output (load balancing)."""
        total = 0
        for s in self.running:
            total += s.prefill_target - s.prefilled + s.remaining_output
        for s in self.queue._live.values():
            total += s.prefill_target - s.prefilled + s.remaining_output
        return total

    # ----- one step ----------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        self._out = out = SchedulerOutput()
        self._expire(now)
        out.items = self.batching.select(self, now)
        return out

    def _expire(self, now: float) -> None:
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, _, seq = heapq.heappop(dl)
            if not seq.done:
                self.abort(seq, "deadline")
                self._out.aborted.append(seq)

    # ----- helpers for batching policies -------------------------------------
    def can_admit_more(self) -> bool:
        return len(self.running) < self.max_num_seqs and len(self.queue) > 0

    def admit_next(self, now: float) -> Sequence | None:
        """Move the head of the queue to running if its KV pages fit (else None:
        the head blocks the queue, which keeps the queue policy's order)."""
        if len(self.running) >= self.max_num_seqs:
            return None
        seq = self.queue.peek()
        if seq is None:
            return None
        if seq.swapped:
            assert self.swap_pool is not None
            if not self.pool.allocate(seq.num_blocks):
                return None
            self.swap_pool.release(seq.num_blocks)
            seq.swapped = False
            self._out.swap_in_pages += seq.num_blocks
            self._out.kv_moves.append((seq, "swap_in"))
        else:
            need = self.pool.pages_for(seq.prefill_target)
            if not self.pool.allocate(need):
                return None
            seq.num_blocks = need
        self.queue.pop()
        seq.status = RequestStatus.RUNNING
        self._order += 1
        seq.order = self._order
        if seq.admitted_at < 0:
            seq.admitted_at = now
        self.running.append(seq)
        return seq

    def reserve_decode(self, seq: Sequence) -> bool:
        """Make room for one more token of ``seq``, preempting the most recently
        admitted other sequences if needed. False if ``seq`` itself was preempted."""
        pool = self.pool
        need = (seq.kv_len + pool.page_tokens) // pool.page_tokens - seq.num_blocks
        if need <= 0:
            return True
        while not pool.allocate(need):
            victim = max(self.running, key=lambda s: s.order)
            self.preempt(victim)
            if victim is seq:
                return False
        seq.num_blocks += need
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.preemptions += 1
        seq.preemptions += 1
        seq.status = RequestStatus.PREEMPTED
        if (self.preemption == "swap" and self.swap_pool is not None and not seq.in_prefill
                and self.swap_pool.allocate(seq.num_blocks)):
            self.pool.release(seq.num_blocks)
            seq.swapped = True
            self._out.swap_out_pages += seq.num_blocks
            self._out.kv_moves.append((seq, "swap_out"))
        else:
            self.pool.release(seq.num_blocks)
            seq.num_blocks = 0
            seq.restart_prefill()
            self._out.kv_moves.append((seq, "drop"))
        self._out.preempted.append(seq)
        self.queue.push(seq)

    @staticmethod
    def decode_item(seq: Sequence) -> BatchItem:
        return BatchItem(seq.request_id, Phase.DECODE, 1, seq.kv_len, True)

    @staticmethod
    def prefill_item(seq: Sequence, n: int) -> BatchItem:
        return BatchItem(seq.request_id, Phase.PREFILL, n, seq.prefilled,
                         seq.prefilled + n >= seq.prefill_target)
