"""Sequence: the engine's mutable state of one request."""

from __future__ import annotations

from dataclasses import dataclass, field

from wicore.types import Request, RequestStatus


@dataclass(slots=True, eq=False)
class Sequence:
    """A request as the scheduler tracks it.

    Token accounting: the KV cache holds ``kv_len`` tokens. Prefill processes
    ``prefill_target`` tokens (the prompt; after a recompute preemption the
    prompt plus the tokens generated so far) and its last chunk emits one
    output token. Each decode step processes the newest token (``kv_len`` grows
    by one) and emits the next one.
    """

    req: Request
    status: RequestStatus = RequestStatus.WAITING
    prefill_target: int = 0
    prefilled: int = 0
    generated: int = 0
    kv_len: int = 0  # tokens whose K/V are in the cache
    num_blocks: int = 0
    admitted_at: float = -1.0
    first_scheduled: float = -1.0
    first_token_time: float = -1.0
    last_token_time: float = -1.0
    finish_time: float = -1.0
    abort_reason: str = ""
    preemptions: int = 0
    swapped: bool = False
    itl: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    order: int = 0  # admission order, for LIFO preemption
    request_id: int = -1  # copy of req.request_id (hot path)

    def __post_init__(self) -> None:
        self.request_id = self.req.request_id
        if self.prefill_target == 0:
            self.prefill_target = self.req.prompt_tokens

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < self.prefill_target

    def restart_prefill(self) -> None:
        """Recompute preemption: the prompt and the tokens so far are prefilled again."""
        self.prefill_target = self.req.prompt_tokens + self.generated
        self.prefilled = 0
        self.kv_len = 0

    @property
    def remaining_output(self) -> int:
        return max(self.req.max_output_tokens - self.generated, 0)

    @property
    def deadline(self) -> float | None:
        d = self.req.deadline_s
        return None if d is None else self.req.arrival_time + d

    @property
    def done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED)
