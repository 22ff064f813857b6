"""The messages pipeline ranks exchange, and the control channel that carries them.

Two process groups join the ranks: the *data* group (NCCL on CUDA, gloo on the CPU) carries the
hidden states between consecutive stages (``dist.isend`` / ``dist.irecv``); the *control* group
(always gloo, CPU tensors) carries everything else, rank 0 <-> each worker:

* rank 0 -> worker: a header ``int64[8] = [kind, step_id, n_items, n_ids, n_emit, 0, 0, 0]``, and
  for a step its description as one ``int64`` payload: ``n_items`` rows of ``ITEM_FIELDS`` (request
  id, phase 0 prefill / 1 decode, context length, tokens, emits a token, KV slot, free the slot
  first), prefill rows first, then decode rows (the order the single-GPU backend runs them), the
  ``n_ids`` input token ids of the rows in that order, then the sampling parameters of the
  ``n_emit`` emitting rows (temperature, top-k, top-p as float64 bit patterns).
* worker -> rank 0: a reply header ``int64[8] = [status, step_id, n_floats, n_bytes, n_tokens,
  n_mass_rows, n_pages, 0]``, ``n_floats`` float64 (``STAT_FIELDS`` counters, then on the last rank
  the tokens and the attention mass rows) and ``n_bytes`` uint8 (an error report or JSON stats).

Why small int tensors and not ``broadcast_object_list``: a step description is a few hundred
integers with a fixed layout, so two tensor messages carry it with no pickling; a worker needs it
on the host anyway (the loop structure of the step depends on it) and copies it to its device in
one non-blocking copy, from which positions, slots and token ids are views. ``broadcast_object_list``
would pickle Python objects every step and, on an NCCL group, stage the bytes through the GPU with
a blocking device-to-host copy on every rank: an extra host sync per step. Both messages travel on
the gloo control group, so rank 0 never synchronises with its GPU to send them, and every receive
has a timeout (a stopped rank raises instead of hanging the others).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from wicore.errors import ConfigError

HEADER = 8
ITEM_FIELDS = 7  # request id, phase, context_len, num_tokens, emits, slot, free
STEP, STOP, STATS, RESET = 1, 2, 3, 4
OK, FAILED, CONFIG_FAILED = 0, 1, 2
STAT_FIELDS = 3  # copy seconds harvested since the last reply, bytes streamed in, forwards run


class PipelineError(RuntimeError):
    """A pipeline rank failed, exited or stopped answering; the message names the rank and why."""


@dataclass(frozen=True)
class Forward:
    """One forward pass of a step: rows ``rows`` of the description, ``ids`` its token-id range."""

    decode: bool
    rows: tuple[int, int]  # [start, end) in the item rows
    ids: tuple[int, int]  # [start, end) in the token ids
    batch: int
    tokens: int  # tokens per row (T)
    context: int  # first position (prefill rows)
    emits: bool


@dataclass
class StepDescription:
    step_id: int
    n_items: int
    n_ids: int
    n_emit: int
    payload: Tensor  # int64, CPU (see the module docstring)

    @classmethod
    def build(cls, step_id: int, rows: list[list[int]], ids: list[int],
              sampling: list[tuple[float, float, float]]) -> StepDescription:
        ints = torch.tensor([v for row in rows for v in row] + ids, dtype=torch.int64)
        floats = torch.tensor(sampling, dtype=torch.float64).view(torch.int64).reshape(-1)
        return cls(step_id, len(rows), len(ids), len(sampling), torch.cat([ints, floats]))

    def header(self) -> Tensor:
        return torch.tensor([STEP, self.step_id, self.n_items, self.n_ids, self.n_emit, 0, 0, 0],
                            dtype=torch.int64)

    @staticmethod
    def payload_len(header: list[int]) -> int:
        return header[2] * ITEM_FIELDS + header[3] + header[4] * 3

    def rows(self) -> list[list[int]]:
        flat = self.payload[:self.n_items * ITEM_FIELDS].tolist()  # a CPU tensor: no device sync
        return [flat[i:i + ITEM_FIELDS] for i in range(0, len(flat), ITEM_FIELDS)]

    def forwards(self) -> list[Forward]:
        """Each prefill row alone, then all decode rows batched (the single-GPU backend's order)."""
        out: list[Forward] = []
        rows, off, n_dec = self.rows(), 0, 0
        for i, (_, phase, ctx, n, emits, _, _) in enumerate(rows):
            if phase == 0:
                out.append(Forward(False, (i, i + 1), (off, off + n), 1, n, ctx, bool(emits)))
                off += n
            else:
                n_dec += 1
        if n_dec:
            out.append(Forward(True, (len(rows) - n_dec, len(rows)), (off, off + n_dec), n_dec, 1, 0, True))
        return out

    def device_views(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(items [n, ITEM_FIELDS], ids [n_ids], sampling [n_emit, 3] float64) on ``device``: one
        non-blocking copy of the payload, the rest are views."""
        dev = self.payload.to(device, non_blocking=True)
        a, b = self.n_items * ITEM_FIELDS, self.n_items * ITEM_FIELDS + self.n_ids
        return (dev[:a].view(self.n_items, ITEM_FIELDS), dev[a:b],
                dev[b:].view(torch.float64).view(self.n_emit, 3))


class Control:
    """The gloo control group seen from one rank: tensor messages with timeouts."""

    def __init__(self, group: Any, step_timeout_s: float) -> None:
        self.group = group
        self.timeout = timedelta(seconds=step_timeout_s)

    def send(self, dst: int, *tensors: Tensor) -> list[Any]:
        """Start sending ``tensors`` to ``dst``; keep the returned works (and so the tensors) until done."""
        return [dist.isend(t, dst, group=self.group) for t in tensors]

    def recv(self, src: int, n: int, dtype: torch.dtype, timeout_s: float | None = None) -> Tensor:
        t = torch.empty(n, dtype=dtype)
        if n:
            work = dist.irecv(t, src, group=self.group)
            assert work is not None
            work.wait(self.timeout if timeout_s is None else timedelta(seconds=timeout_s))
        return t

    def wait(self, works: list[Any]) -> None:
        for w in works:
            w.wait(self.timeout)
        works.clear()

    # ----- replies (worker -> rank 0) ------------------------------------------------------------
    def reply(self, status: int, step_id: int, floats: Tensor | None = None, data: bytes = b"",
              counts: tuple[int, int, int] = (0, 0, 0)) -> None:
        f = floats if floats is not None else torch.zeros(0, dtype=torch.float64)
        b = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        head = torch.tensor([status, step_id, f.numel(), b.numel(), *counts, 0], dtype=torch.int64)
        self.wait(self.send(0, *[t for t in (head, f, b) if t.numel()]))

    def receive_reply(self, src: int) -> tuple[list[int], Tensor, bytes]:
        head = self.recv(src, HEADER, torch.int64).tolist()
        floats = self.recv(src, head[2], torch.float64)
        data = self.recv(src, head[3], torch.uint8).numpy().tobytes() if head[3] else b""
        return head, floats, data


def error_of(rank: int, head: list[int], data: bytes, what: str) -> Exception | None:
    """The exception a failed reply stands for (None if it is a success)."""
    if head[0] == OK:
        return None
    text = data.decode(errors="replace")
    if head[0] == CONFIG_FAILED:
        return ConfigError(f"pipeline rank {rank}: {text}")
    return PipelineError(f"pipeline rank {rank} failed {what}:\n{text}")


def decode_json(data: bytes) -> dict[str, Any]:
    out = json.loads(data.decode()) if data else {}
    assert isinstance(out, dict)
    return out
