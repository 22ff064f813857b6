"""Load balancing of requests across model replicas (pure policy)."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from wicore.types import Request


class LoadBalancer:
    name = "base"

    def choose(self, request: Request, outstanding_tokens: Seq[int]) -> int:
        """Index of the replica that gets ``request``; ``outstanding_tokens[i]``
        is replica i's remaining prefill + output tokens."""
        raise NotImplementedError


class RoundRobin(LoadBalancer):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: Request, outstanding_tokens: Seq[int]) -> int:
        i = self._next % len(outstanding_tokens)
        self._next += 1
        return i


class LeastOutstandingTokens(LoadBalancer):
    name = "least_outstanding_tokens"

    def choose(self, request: Request, outstanding_tokens: Seq[int]) -> int:
        return min(range(len(outstanding_tokens)), key=lambda i: (outstanding_tokens[i], i))
