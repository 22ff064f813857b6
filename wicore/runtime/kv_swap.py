"""KV swapping on the real runtime: a preempted sequence's KV slot goes to host memory and comes back.

What moves: with ``scheduler.preemption=swap`` the engine's ``swap_out`` / ``swap_in`` memory ops name
the sequences whose KV changes side in a step (``wicore.engine``). For a swap-out of request ``r``,
``KVSwapper.swap_out`` copies K and V of every layer of ``r``'s slot, positions ``[0, tokens)`` only
(the tokens actually written), into one host tensor ``[2, layers, kv_heads, tokens, head_dim]`` in the
cache dtype (bit-identical), then zeroes the slot (``KVCache.free``); the backend gives the slot back
to its free list, so another sequence, or ``r`` itself later, can take it. ``swap_in`` copies the host
tensor into a free slot (maybe another one) and drops the host copy. The backend runs a step's
swap-outs first, then its swap-ins, then the step's forwards.

Streams (CUDA): every copy runs on one dedicated copy stream: it first waits for the compute stream
(the slot's last writes), the device->host copy goes into page-locked memory with ``non_blocking=True``
(one gather of the slot's layers into a contiguous device buffer, one copy), the slot is zeroed on the
copy stream behind it; a swap-in is one host->device copy plus a scatter into the slot. ``finish``
records an event on the copy stream and the compute stream waits on it when the step swapped something
in (its forwards read those slots); otherwise only a forward that takes a slot freed by a swap-out
waits (``slot_ready``), so swap-outs overlap the step's compute. Nothing here synchronises the host;
the pinned host buffers are held by the caching host allocator until their copies are done. On any
other device (tests on CPU) the same code runs with plain synchronous copies.

What is counted: bytes per direction (K and V of the copied positions, every layer) and the copy time:
CUDA events around the swap-outs and the swap-ins on the copy stream (read after the step's closing
``torch.cuda.synchronize``, so no extra sync), else ``perf_counter`` around the copies. ``report`` adds
them to the step's ``StepResult``: ``link_bytes``, ``transfer_s`` (the copy stream's busy time) and one
``OpTiming("swap_out" | "swap_in", "pcie<gpu>", start, end, nbytes)`` per direction; on CUDA ``start``
is the host time the copies were issued (the device is idle then: the previous step ended with a sync)
and ``end`` is ``start`` plus the measured copy time.

MoR routing: on a swap-out the backend calls ``MoRRuntime.forget``: the CPU shallow path mirrors K/V
per slot, and the next time the request runs shallow it mirrors positions ``[0, p)`` again from the
accelerator's cache (which holds every layer's K/V), in whichever slot it has then. The pipeline
backend (``parallel.pp > 1``) does not swap: ``experiments.run_torch`` refuses that config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from wicore.model.kv_cache import KVCache
from wicore.types import MemoryOp, OpTiming, StepResult

__all__ = ["KVSwapper", "SwapStep", "swap_names"]


def swap_names(ops: list[MemoryOp] | tuple[MemoryOp, ...]) -> tuple[list[int], list[int]]:
    """Request ids named by the plan's ``swap_out`` and ``swap_in`` ops (their ``kv`` blocks), each once,
    in order (an op per GPU of the replica names the same sequences)."""
    out: dict[int, None] = {}
    back: dict[int, None] = {}
    for op in ops:
        if op.op == "swap_out":
            names = out
        elif op.op == "swap_in":
            names = back
        else:
            continue
        for b in op.blocks:
            if b.kind == "kv":
                names[b.seq] = None
    return list(out), list(back)


@dataclass
class SwapStep:
    """The swaps of one step: bytes, and the clock (driver seconds) and events needed to time them."""

    issued: float  # driver clock when the first copy was issued
    bytes_out: int = 0
    bytes_in: int = 0
    out_s: float = 0.0  # measured copy time (CPU; on CUDA filled by ``report``)
    in_s: float = 0.0
    device: int = 0  # the replica's GPU whose link carried the copies (OpTiming resource pcie<device>)
    events: list[torch.cuda.Event] = field(default_factory=list)  # CUDA: start, after swap-outs, after swap-ins


class KVSwapper:
    """Host copies of swapped-out KV slots of one ``KVCache``; see the module docstring."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.device = cache.device
        self.layers = list(cache.layers)  # layers with buffers (all of them outside a pipeline stage)
        self.cuda = self.device.type == "cuda"
        self.stream: torch.cuda.Stream | None = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: dict[int, Tensor] = {}  # request id -> [2, layers, kv_heads, tokens, head_dim] on the host
        self._freed: dict[int, torch.cuda.Event] = {}  # slot -> event after its swap-out (CUDA)
        self.bytes_out = self.bytes_in = 0
        self.swaps_out = self.swaps_in = 0
        self.copy_s = 0.0

    # ----- state -------------------------------------------------------------------------------
    def holds(self, request_id: int) -> bool:
        return request_id in self.host

    @property
    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())

    def drop(self, request_id: int) -> None:
        """Forget a host copy (the request finished, was cancelled, or its KV was dropped)."""
        self.host.pop(request_id, None)

    # ----- one step ----------------------------------------------------------------------------
    def begin(self, now: float, device: int = 0) -> SwapStep:
        """Start a step's swaps at driver time ``now``: the copy stream waits for the compute stream."""
        step = SwapStep(now, device=device)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.stream)
            step.events.append(ev)
        return step

    def swap_out(self, step: SwapStep, request_id: int, slot: int, tokens: int) -> None:
        """Copy K/V of positions ``[0, tokens)`` of ``slot`` to host memory, then zero the slot."""
        if request_id in self.host:
            raise RuntimeError(f"kv swap: request {request_id} is already swapped out")
        c = self.cache
        if not 0 < tokens <= c.max_len:
            raise ValueError(f"kv swap: request {request_id} has {tokens} tokens, outside (0, {c.max_len}]")
        t0 = time.perf_counter()
        if self.stream is None:
            host = self._gather(slot, tokens)  # CPU: the gather is the copy
            c.free(slot)
        else:
            with torch.cuda.stream(self.stream):
                dev = self._gather(slot, tokens)
                host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
                host.copy_(dev, non_blocking=True)
                c.free(slot)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self._freed[slot] = ev
        self.host[request_id] = host
        nbytes = host.numel() * host.element_size()
        step.bytes_out += nbytes
        self.bytes_out += nbytes
        self.swaps_out += 1
        if self.stream is None:
            step.out_s += time.perf_counter() - t0

    def swap_in(self, step: SwapStep, request_id: int, slot: int) -> int:
        """Copy ``request_id``'s host copy into ``slot`` and drop it; returns its token count."""
        host = self.host.pop(request_id, None)
        if host is None:
            raise RuntimeError(f"kv swap: request {request_id} has no swapped-out KV to swap in")
        tokens = host.shape[3]
        t0 = time.perf_counter()
        if self.stream is None:
            self._scatter(host, slot)
        else:
            self._freed.pop(slot, None)  # same stream: ordered behind that swap-out
            with torch.cuda.stream(self.stream):
                self._scatter(host.to(self.device, non_blocking=True), slot)
        nbytes = host.numel() * host.element_size()
        step.bytes_in += nbytes
        self.bytes_in += nbytes
        self.swaps_in += 1
        if self.stream is None:
            step.in_s += time.perf_counter() - t0
        return tokens

    def mark_swapped_out(self, step: SwapStep) -> None:
        """Between the swap-outs and the swap-ins: an event that splits their copy times (CUDA)."""
        if self.stream is not None:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.stream)
            step.events.append(ev)

    def finish(self, step: SwapStep) -> None:
        """After the step's swaps: on CUDA, the compute stream waits for the swap-ins (its forwards
        read those slots). Swap-outs alone are waited for only by a forward that reuses their slot."""
        if self.stream is None:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        step.events.append(ev)
        if step.bytes_in:
            torch.cuda.current_stream(self.device).wait_event(ev)
            self._freed.clear()

    def slot_ready(self, slot: int) -> None:
        """Before the compute stream writes a slot it has just taken from the free list: wait for the
        swap-out that freed it (CUDA; no host sync)."""
        ev = self._freed.pop(slot, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def report(self, step: SwapStep, result: StepResult) -> None:
        """Add the step's swap bytes and copy time to ``result`` (on CUDA call this after the step's
        closing synchronisation: it reads the copy events)."""
        if len(step.events) == 3:
            start, mid, end = step.events
            step.out_s = start.elapsed_time(mid) / 1e3
            step.in_s = mid.elapsed_time(end) / 1e3
        step.events.clear()
        self.copy_s += step.out_s + step.in_s
        result.link_bytes += step.bytes_out + step.bytes_in
        result.transfer_s += step.out_s + step.in_s
        t = step.issued
        link = f"pcie{step.device}"
        if step.bytes_out:
            result.ops.append(OpTiming("swap_out", link, t, t + step.out_s, step.bytes_out))
            t += step.out_s
        if step.bytes_in:
            result.ops.append(OpTiming("swap_in", link, t, t + step.in_s, step.bytes_in))

    def stats(self) -> dict[str, float | int]:
        return {"kv_swaps_out": self.swaps_out, "kv_swaps_in": self.swaps_in, "kv_swap_out_bytes": self.bytes_out,
                "kv_swap_in_bytes": self.bytes_in, "kv_swap_copy_s": self.copy_s, "kv_swapped_now": len(self.host)}

    # ----- copies ------------------------------------------------------------------------------
    def _gather(self, slot: int, tokens: int) -> Tensor:
        """K and V of ``[0, tokens)`` of ``slot``, every layer: a new contiguous [2, L, Hkv, T, D] tensor."""
        c = self.cache
        kv = torch.stack([c.k[i][slot, :, :tokens] for i in self.layers] +
                         [c.v[i][slot, :, :tokens] for i in self.layers])
        return kv.view(2, len(self.layers), *kv.shape[1:])

    def _scatter(self, kv: Tensor, slot: int) -> None:
        c = self.cache
        tokens = kv.shape[3]
        for j, i in enumerate(self.layers):
            c.k[i][slot, :, :tokens].copy_(kv[0, j])
            c.v[i][slot, :, :tokens].copy_(kv[1, j])
