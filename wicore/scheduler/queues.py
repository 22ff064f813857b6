"""Waiting-queue policies: which waiting request is considered first.

A policy only defines an ordering key; ``WaitingQueue`` does the bookkeeping
(a heap with lazy deletion). Preempted sequences always go before new ones so
a preempted request is not starved by later arrivals.
"""

from __future__ import annotations

import heapq
from typing import Any

from wicore.scheduler.sequence import Sequence


class QueuePolicy:
    """Orders waiting sequences; smaller key = served first."""

    name = "base"

    def key(self, seq: Sequence) -> tuple[Any, ...]:
        raise NotImplementedError


class FCFS(QueuePolicy):
    """First come, first served (arrival time)."""

    name = "fcfs"

    def key(self, seq: Sequence) -> tuple[Any, ...]:
        return (seq.req.arrival_time, seq.request_id)


class Priority(QueuePolicy):
    """Higher ``Request.priority`` first, then arrival time."""

    name = "priority"

    def key(self, seq: Sequence) -> tuple[Any, ...]:
        return (-seq.req.priority, seq.req.arrival_time, seq.request_id)


class ShortestPromptFirst(QueuePolicy):
    """Shortest prompt first (minimises mean TTFT; can starve long prompts)."""

    name = "spf"

    def key(self, seq: Sequence) -> tuple[Any, ...]:
        return (seq.req.prompt_tokens, seq.req.arrival_time, seq.request_id)


class WaitingQueue:
    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self._heap: list[tuple[Any, ...]] = []
        self._live: dict[int, Sequence] = {}
        self._counter = 0

    def push(self, seq: Sequence) -> None:
        self._counter += 1
        rank = 0 if seq.preemptions else 1
        heapq.heappush(self._heap, (rank, self.policy.key(seq), self._counter, seq))
        self._live[seq.request_id] = seq

    def _clean(self) -> None:
        heap = self._heap
        while heap and self._live.get(heap[0][3].request_id) is not heap[0][3]:
            heapq.heappop(heap)

    def peek(self) -> Sequence | None:
        self._clean()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Sequence:
        self._clean()
        seq = heapq.heappop(self._heap)[3]
        del self._live[seq.request_id]
        return seq

    def remove(self, seq: Sequence) -> None:
        self._live.pop(seq.request_id, None)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(sorted(self._live.values(), key=lambda s: (0 if s.preemptions else 1, self.policy.key(s))))

    def __contains__(self, seq: Sequence) -> bool:
        return self._live.get(seq.request_id) is seq
