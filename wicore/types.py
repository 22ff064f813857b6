"""The data that crosses the engine/backend boundary.

Plain dataclasses only: no simpy, no torch, no clock. Times are seconds on the
driver's clock (simulated seconds in the SimPy driver, wall seconds since the
run started in the torch driver); sizes are bytes; token counts are tokens.

The engine loop is::

    plan   = engine.schedule(now)      # StepPlan: what to run, route and move
    result = backend.execute(plan)     # StepResult: how long each part took + feedback
    engine.update(plan, result, now)

A ``StepPlan`` carries everything a backend needs to do one iteration of one
model replica: the per-request token work (prefill chunks and decodes), the
routing decisions of a token router (empty when routing is off) and the memory
operations (fetch / prefetch / evict / swap of blocks between tiers). A
``StepResult`` carries the timing of each part and feedback for the policies
(tokens produced, attention mass per KV block).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class Phase(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"  # queued, holds no KV memory
    RUNNING = "running"  # admitted, holds KV memory
    PREEMPTED = "preempted"  # evicted back to the queue (recompute) or swapped out
    FINISHED = "finished"  # produced all its tokens (or hit a stop condition)
    ABORTED = "aborted"  # deadline passed, cancelled, or could never fit


@dataclass(slots=True)
class Request:
    """One inference request as the workload (or the server) submits it.

    ``deadline_s`` is relative to ``arrival_time``; a request still unfinished
    then is aborted with reason ``"deadline"``. Higher ``priority`` is served
    first by the priority queue policy. ``prompt_ids`` are only needed by the
    real runtime; the simulator works from ``prompt_tokens``.
    """

    request_id: int
    arrival_time: float
    prompt_tokens: int
    max_output_tokens: int
    priority: int = 0
    deadline_s: float | None = None
    user_id: int | None = None
    prompt_ids: list[int] | None = None
    sampling: dict[str, float | int] | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class BlockRef:
    """A block of memory the tiered memory manager moves as a unit.

    ``kind`` is ``"weight"`` (``layer`` + parameter ``group`` such as
    ``"attn"``/``"mlp"``/``"embed"``) or ``"kv"`` (``layer`` + ``seq`` + page
    ``index`` of a fixed number of tokens).
    """

    kind: str
    layer: int
    group: str = ""
    seq: int = -1
    index: int = 0
    device: int = 0

    def key(self) -> tuple[str, int, str, int, int, int]:
        return (self.kind, self.layer, self.group, self.seq, self.index, self.device)

    def __hash__(self) -> int:
        return hash(self.key())


def kv_pages(tokens: int, page_tokens: int) -> int:
    """KV pages that hold ``tokens`` tokens, ``page_tokens`` to a page."""
    return -(-tokens // page_tokens)


def add_page_mass(feedback: dict[int, list[float]], seqs: Iterable[int], rows: Iterable[list[float]],
                  pages: Iterable[int]) -> None:
    """Record each sequence's attention mass per KV page: ``feedback[seqs[i]] = rows[i][:pages[i]]``, one value
    per page that holds its tokens (a row read from a wider buffer, such as a CUDA graph's bucket or a batch
    padded to its longest context, is cut to the sequence's own pages)."""
    for seq, row, n in zip(seqs, rows, pages):
        feedback[seq] = row[:n]


@dataclass(slots=True)
class MemoryOp:
    """Move ``nbytes`` of blocks from tier ``src`` to tier ``dst``.

    ``op`` is one of ``fetch`` (needed by this step, the layer waits for it),
    ``prefetch`` (needed by a later step, never waited on), ``evict`` (demote to
    a lower tier), ``swap_out`` / ``swap_in`` (preempted sequences' KV: ``nbytes``
    counts every page the scheduler moved, ``blocks`` name the pages
    ``BlockRef("kv", -1, seq=request_id, index=page)`` of each sequence whose KV
    ends the step on the other side). Tier names are ``gpu<i>``, ``cpu``,
    ``nvme``. ``layer`` is the first layer that needs the data (``-1``: not
    tied to a layer); ``device`` is the GPU whose link carries it.
    ``convert_bytes`` is the size after a format conversion on arrival (for
    example 4-bit on NVMe to fp16 on the GPU), used to cost the conversion. The
    blocks of one op arrive in order.
    """

    op: str
    src: str
    dst: str
    nbytes: int
    layer: int = -1
    device: int = 0
    blocks: tuple[BlockRef, ...] = ()
    convert_bytes: int = 0
    block_bytes: tuple[int, ...] = ()  # bytes of each block, in order (empty: equal shares)


@dataclass(slots=True)
class BatchItem:
    """The work of one request in one step.

    ``context_len`` is the number of this request's tokens already in the KV
    cache before the step; the step adds ``num_tokens`` more. ``emits_token`` is
    true for a decode and for the last prefill chunk (which yields the first
    output token).
    """

    request_id: int
    phase: Phase
    num_tokens: int
    context_len: int
    emits_token: bool


@dataclass(slots=True)
class RouteDecision:
    """A token router's decision for the tokens of one request in one step.

    ``path`` is ``"deep"`` (all ``depth`` layers on the accelerator) or
    ``"shallow"`` (``depth`` layers, on the router's shallow device - the CPU
    by default - then early exit). Semantics: ``wicore.routing``.
    """

    request_id: int
    path: str
    depth: int
    num_tokens: int = 1


@dataclass(slots=True)
class StepPlan:
    """One step of one replica. ``preempted``: request ids preempted while planning it (either
    mode); ``kv_dropped``: those whose KV a recompute preemption dropped (they prefill again from
    position 0, and a swapped-out copy of theirs is gone too): a backend frees what it holds for them.
    Swapped sequences are named by the ``swap_out`` / ``swap_in`` memory ops."""

    step_id: int
    replica: int
    created_at: float
    items: list[BatchItem]
    routing: list[RouteDecision] = field(default_factory=list)
    memory_ops: list[MemoryOp] | tuple[MemoryOp, ...] = ()
    preempted: list[int] = field(default_factory=list)
    kv_dropped: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items if i.phase is Phase.PREFILL)

    @property
    def num_decode_tokens(self) -> int:
        return sum(i.num_tokens for i in self.items if i.phase is Phase.DECODE)


@dataclass(slots=True)
class OpTiming:
    """When one part of a step ran, on which resource (``gpu0``, ``pcie0`` ...)."""

    name: str
    resource: str
    start: float
    end: float
    nbytes: int = 0
    flops: float = 0.0


@dataclass(slots=True)
class StepResult:
    """What a backend reports after executing a plan.

    ``compute_s`` is time the accelerators were busy with kernels;
    ``transfer_s`` the time any link was busy with this step's memory ops;
    ``stall_s`` the time compute waited for data that was not resident.
    ``tokens`` maps request id to the token ids produced (the real runtime);
    the simulator leaves it empty and every ``emits_token`` item counts as one
    token. ``attention_mass`` is the feedback for attention-aware replacement:
    per decoding request id, the fraction of attention probability each of its
    KV pages received in this step (list index = page index, one value per page
    holding its tokens; see ``add_page_mass``).
    ``signals`` is the feedback for a token router (``wicore.routing``): per
    request id, signals measured on the token that request emitted in this step
    (keys ``confidence``, ``entropy``, ``router``, ``attention_peak``, floats in
    [0, 1]; a signal that was not measured is left out), used to route that
    request's next token.
    """

    step_id: int
    start: float
    end: float
    compute_s: float = 0.0
    transfer_s: float = 0.0
    stall_s: float = 0.0
    flops: float = 0.0
    hbm_bytes: float = 0.0
    link_bytes: int = 0
    ops: list[OpTiming] = field(default_factory=list)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    attention_mass: dict[int, list[float]] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)
    signals: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start
