"""Batching policies: which tokens of which sequences run in the next step.

* ``StaticBatching`` - a batch is formed when the replica is idle and runs
  until every member finishes; arrivals meanwhile wait (request-level batching).
* ``ContinuousBatching`` - iteration-level batching (Orca / vLLM v0): when
  sequences wait and fit, the step prefills them (full prompts, up to the token
  budget); otherwise it decodes every running sequence. New requests join
  between steps; decodes pause while a prefill step runs.
* ``ChunkedPrefill`` - every step decodes all running sequences and fills the
  remaining token budget with prompt chunks (Sarathi-Serve / vLLM v1), so
  prefills never stall decodes for a whole prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wicore.types import BatchItem, Phase, RequestStatus

DECODE = Phase.DECODE
RUNNING = RequestStatus.RUNNING

if TYPE_CHECKING:
    from wicore.scheduler.scheduler import Scheduler


class BatchingPolicy:
    name = "base"

    def select(self, s: Scheduler, now: float) -> list[BatchItem]:
        """Return the items of the next step (possibly empty), admitting and
        preempting through ``s``'s helpers. Must not advance token progress."""
        raise NotImplementedError

    @staticmethod
    def _decodes(s: Scheduler) -> list[BatchItem]:
        """One decode item per running sequence past its prefill, reserving a
        KV slot for each (which may preempt the most recently admitted)."""
        items: list[BatchItem] = []
        append = items.append
        preempted_before = s.preemptions
        page = s.pool.page_tokens
        for seq in list(s.running):
            if seq.prefilled < seq.prefill_target or seq.status is not RUNNING:
                continue
            kv = seq.kv_len
            # fast path: the next token still fits the sequence's last page
            if (kv + page) // page <= seq.num_blocks or s.reserve_decode(seq):
                append(BatchItem(seq.request_id, DECODE, 1, kv, True))
        if s.preemptions != preempted_before:  # a later reservation preempted an earlier item's sequence
            live = {q.request_id for q in s.running}
            items = [i for i in items if i.request_id in live]
        return items


class StaticBatching(BatchingPolicy):
    name = "static"

    def select(self, s: Scheduler, now: float) -> list[BatchItem]:
        if not s.running:
            while s.admit_next(now) is not None:
                pass
        prefill = [q for q in s.running if q.in_prefill]
        if prefill:
            budget = s.max_batched_tokens
            items = []
            for q in prefill:
                n = min(q.prefill_target - q.prefilled, budget)
                if n <= 0:
                    break
                items.append(s.prefill_item(q, n))
                budget -= n
            return items
        return self._decodes(s)


class ContinuousBatching(BatchingPolicy):
    name = "continuous"

    def select(self, s: Scheduler, now: float) -> list[BatchItem]:
        items: list[BatchItem] = []
        budget = s.max_batched_tokens
        while s.can_admit_more():
            head = s.queue.peek()
            assert head is not None
            need = head.prefill_target - head.prefilled
            if head.swapped:
                need = 0
            if items and need > budget:
                break
            seq = s.admit_next(now)
            if seq is None:
                break
            if need:
                items.append(s.prefill_item(seq, need))
                budget -= need
            if budget <= 0:
                break
        if items:
            return items
        return self._decodes(s)


class ChunkedPrefill(BatchingPolicy):
    name = "chunked_prefill"

    def select(self, s: Scheduler, now: float) -> list[BatchItem]:
        items = self._decodes(s)
        budget = s.max_batched_tokens - len(items)
        for seq in s.running:
            if budget <= 0:
                return items
            if seq.in_prefill:
                n = min(seq.prefill_target - seq.prefilled, budget)
                items.append(s.prefill_item(seq, n))
                budget -= n
        while budget > 0 and s.can_admit_more():
            new = s.admit_next(now)
            if new is None:
                break
            if new.in_prefill:
                n = min(new.prefill_target - new.prefilled, budget)
                items.append(s.prefill_item(new, n))
                budget -= n
        return items
