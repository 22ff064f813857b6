"""Weight streaming: decoder layers that do not fit the GPU budget live in host memory and are copied
to the device just in time, while the layers before them compute.

Host: each streamed ``DecoderLayer`` is one contiguous block (page-locked on CUDA: an exact-size
allocation registered with ``cudaHostRegister``, else ``torch.empty(pin_memory=True)``, which rounds
up to a power of two) in the host format: the model dtype as is ("direct" mode), or another float dtype
/ ``int8`` ("convert" mode): matrices whose size is a multiple of 32 in Q8_0 (``wicore.memory.formats``:
int8 + an fp16 scale per 32 values, 34/64 of the bf16 bytes), norms in the model dtype.

Device: ``buffers`` slots the size of the largest block (+ in convert mode one compute buffer holding a
layer in the model dtype). A dedicated copy stream moves a whole block with one ``copy_(non_blocking=True)``.

Schedule: the streamed layers form a cycle, the same order every forward. Execution ``c`` (counted over
all forwards) runs layer ``order[c % m]`` from slot ``c % buffers``. Its copy is enqueued at the end of
execution ``c - lookahead - 1`` (for the first layers of a forward: the end of the previous one) or at
the latest at the start of ``c - lookahead``, behind a ``wait_event`` on the event recorded when
execution ``c - buffers`` was done with the slot; the compute stream waits on the copy's end event
before layer ``c``. Nothing inside the forward synchronises the host. ``lookahead <= buffers - 1``.

Swapping in (forward pre/post hooks on the layers): direct mode points each parameter's ``.data`` at
its view in the slot for the layer's forward and back at its host view afterwards (so the idle model
still holds every weight, readable by name); convert mode writes the slot into the compute buffer on the
compute stream (``int8 * fp32 scale -> dtype``, bit-identical to ``dequantize_torch(q).to(dtype)``) and
the streamed parameters point at its views for good. On a CPU device the same code runs with plain
copies and no streams or events (the tests).

Counters: bytes copied host -> device (issued, and used per forward); copy time from CUDA events around
each copy on the copy stream (after its wait) -> achieved PCIe bandwidth. A forward that raised half-way
or a layer called out of order costs one full synchronisation and restarts the cycle there.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from wicore.errors import ConfigError
from wicore.memory.formats import FORMATS
from wicore.model.kv_cache import KVCache
from wicore.model.quant import quantize_torch
from wicore.model.transformer import DTYPES, Transformer
from wicore.runtime.backend import TorchBackend
from wicore.types import OpTiming, StepPlan, StepResult

HOST_FORMATS = ("auto", "fp32", "fp16", "bf16", "int8")
ALIGN = 16  # byte alignment of every tensor inside a block (vectorised kernels need 16)
PAGE = 4096
GROUP = FORMATS["int8"].group_size
_CAN_REGISTER = [True]  # cleared after the first failed cudaHostRegister (then pin_memory)

Fill = Callable[[str, Tensor], Tensor]  # (full parameter name, meta/host parameter) -> values


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _view(flat: Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    return flat[offset:offset + nbytes].view(dtype).view(shape)


@dataclass(frozen=True)
class _Entry:
    name: str  # parameter name inside the layer, e.g. "mlp.up_proj.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype  # compute (model) dtype
    host_dtype: torch.dtype | None  # None: Q8_0
    offset: int  # data bytes in the host block / slot
    nbytes: int
    scale_offset: int = 0  # Q8_0 scales (fp16)
    scale_nbytes: int = 0
    out_offset: int = 0  # position in the compute buffer (convert mode)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _layout(params: Sequence[tuple[str, Tensor]], host_format: str) -> tuple[list[_Entry], int, int]:
    """Entries, host block bytes and compute-buffer bytes of one layer."""
    entries, off, out = [], 0, 0
    for name, p in params:
        n, shape = p.numel(), tuple(int(s) for s in p.shape)
        q8 = host_format == "int8" and p.dim() >= 2 and n % GROUP == 0
        hdt = None if q8 else (p.dtype if host_format in ("auto", "int8") else DTYPES[host_format])
        if hdt is None:
            nb, sb = n, (n // GROUP) * 2
            entries.append(_Entry(name, shape, p.dtype, None, off, nb, off + _align(nb), sb, out))
            off += _align(nb) + _align(sb)
        else:
            nb = n * hdt.itemsize
            entries.append(_Entry(name, shape, p.dtype, hdt, off, nb, out_offset=out))
            off += _align(nb)
        out += _align(n * p.element_size())
    return entries, off, out


def _set_param(layer: nn.Module, name: str, value: Tensor) -> nn.Parameter:
    """Point parameter ``name`` of ``layer`` at ``value`` (a new Parameter when the old one is meta)."""
    *path, leaf = name.split(".")
    mod = layer
    for part in path:
        mod = getattr(mod, part)
    p = getattr(mod, leaf)
    if p.is_meta or value.is_meta:
        p = nn.Parameter(value, requires_grad=False)
        setattr(mod, leaf, p)
    else:
        p.data = value
    return p


def _host_block(nbytes: int, pin: str) -> tuple[Tensor, int, str]:
    """(block, registered pointer or 0, how it was pinned) of ``nbytes`` host bytes."""
    if pin == "none":
        return torch.empty(nbytes, dtype=torch.uint8), 0, "none"
    if pin == "register" or (pin == "auto" and _CAN_REGISTER[0]):
        try:
            raw = torch.zeros(nbytes + PAGE, dtype=torch.uint8)  # zeros: fault the pages in (threaded)
            off = (-raw.data_ptr()) % PAGE
            block = raw[off:off + nbytes]
            err = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister failed: {err}")
            return block, block.data_ptr(), "cudaHostRegister"
        except Exception:  # noqa: BLE001 - fall back to torch's pinned allocator
            _CAN_REGISTER[0] = False
            with contextlib.suppress(Exception):  # a failed runtime call stays the "last error": clear it
                torch.cuda.cudart().cudaGetLastError()
            if pin == "register":
                raise
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), 0, "pin_memory"


def _unregister(blocks: list[tuple[Tensor, int]]) -> None:
    for _, ptr in blocks:
        with contextlib.suppress(Exception):  # at interpreter exit CUDA may be gone already
            torch.cuda.cudart().cudaHostUnregister(ptr)
    blocks.clear()


class LayerStreamer:
    """Streams the decoder layers ``streamed`` of ``model`` from host memory (see the module docstring).

    The rest of the model must already be on ``device`` (``offload_model`` does that). Parameters of the
    streamed layers may be on the CPU (packed from there) or on the meta device (values from ``fill``).
    """

    def __init__(self, model: Transformer, streamed: Iterable[int], device: torch.device | str,
                 host_format: str | None = "auto", buffers: int = 2, lookahead: int = 1,
                 fill: Fill | None = None, pin: str = "auto") -> None:
        fmt = host_format or "auto"
        if fmt not in HOST_FORMATS:
            raise ConfigError(f"backend.host_format: unknown '{host_format}', use one of {list(HOST_FORMATS)}")
        if buffers < 1 or lookahead < 0:
            raise ConfigError(f"offload: buffers must be >= 1 and lookahead >= 0, got {buffers}, {lookahead}")
        self.model, self.device, self.host_format = model, torch.device(device), fmt
        self.order = sorted(set(int(i) for i in streamed))
        bad = [i for i in self.order if not 0 <= i < len(model.layers)]
        if bad:
            raise ConfigError(f"offload: layers {bad} do not exist (the model has {len(model.layers)})")
        self.buffers, self.lookahead = buffers, min(lookahead, buffers - 1)
        self.cuda = self.device.type == "cuda"
        self.pin = pin if self.cuda else "none"
        layers = [model.layers[i] for i in self.order]
        params = [list(layer.named_parameters()) for layer in layers]
        dtype = params[0][0][1].dtype if params else torch.float32
        self.direct = fmt == "auto" or (fmt in DTYPES and DTYPES[fmt] == dtype)
        lay = [_layout(p, "auto" if self.direct else fmt) for p in params]
        self.entries = [e for e, _, _ in lay]
        self.layer_bytes = [b for _, b, _ in lay]
        self.pinned_with = ""
        self.host: list[Tensor] = []
        self._registered: list[tuple[Tensor, int]] = []
        self._finalizer = weakref.finalize(self, _unregister, self._registered)
        for j, (i, layer) in enumerate(zip(self.order, layers)):
            self._pack(j, f"layers.{i}.", layer, dict(params[j]), fill)
        slot_bytes, out_bytes = max(self.layer_bytes, default=0), max((o for _, _, o in lay), default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(buffers)]
        self.slot_views = [[[self._src(flat, e) for e in ents] for ents in self.entries] for flat in self.slots]
        self.compute = torch.empty(0 if self.direct else out_bytes, dtype=torch.uint8, device=self.device)
        self.params: list[list[nn.Parameter]] = []
        self.host_views: list[list[Tensor]] = []
        self.out_views: list[list[Tensor]] = []
        for j, layer in enumerate(layers):
            hv = [self._src(self.host[j], e) for e in self.entries[j]]
            ov = [_view(self.compute, e.out_offset, e.numel * e.dtype.itemsize, e.dtype, e.shape)
                  for e in self.entries[j]] if not self.direct else []
            self.host_views.append(hv)
            self.out_views.append(ov)
            self.params.append([_set_param(layer, e.name, hv[n] if self.direct else ov[n])
                                for n, e in enumerate(self.entries[j])])
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: list[Any] = [None] * buffers  # end event of the last copy into each slot
        self._free = [torch.cuda.Event() for _ in range(buffers)] if self.cuda else []
        self._pending: deque[tuple[Any, Any, int]] = deque()
        self._executed = self._issued = 0
        self.reset_counters()
        self._hooks: list[Any] = []
        if self.order:
            self._hooks += [model.register_forward_pre_hook(self._pre_model),
                            model.register_forward_hook(self._post_model)]
            for j, layer in enumerate(layers):
                self._hooks += [layer.register_forward_pre_hook(partial(self._pre_layer, j)),
                                layer.register_forward_hook(partial(self._post_layer, j))]

    # ----- setup ------------------------------------------------------------------------------
    def _pack(self, j: int, prefix: str, layer: nn.Module, params: dict[str, Tensor], fill: Fill | None) -> None:
        block, ptr, how = _host_block(self.layer_bytes[j], self.pin)
        self.pinned_with = self.pinned_with or how
        if ptr:
            self._registered.append((block, ptr))
        self.host.append(block)
        with torch.no_grad():
            for e in self.entries[j]:
                p = params[e.name]
                if p.is_meta:
                    if fill is None:
                        raise ConfigError(f"offload: {prefix}{e.name} is on the meta device and no fill is given")
                    src = fill(prefix + e.name, p)
                else:
                    src = p.detach()
                if tuple(src.shape) != e.shape:
                    raise ConfigError(f"offload: {prefix}{e.name}: fill gave shape {tuple(src.shape)}, "
                                      f"expected {e.shape}")
                if e.host_dtype is not None:
                    _view(block, e.offset, e.nbytes, e.host_dtype, e.shape).copy_(src.to(e.host_dtype))
                else:
                    q = quantize_torch(src, FORMATS["int8"])
                    _view(block, e.offset, e.nbytes, torch.int8, (e.numel,)).copy_(q.data)
                    _view(block, e.scale_offset, e.scale_nbytes, torch.float16, (e.numel // GROUP,)).copy_(q.scales)

    @staticmethod
    def _src(flat: Tensor, e: _Entry) -> Tensor:
        """View of ``e`` in a block / slot: the tensor (float) or the int8 groups [G, 32] (Q8_0)."""
        if e.host_dtype is not None:
            return _view(flat, e.offset, e.nbytes, e.host_dtype, e.shape)
        return _view(flat, e.offset, e.nbytes, torch.int8, (e.numel // GROUP, GROUP))

    def _scales(self, slot: int, e: _Entry) -> Tensor:
        return _view(self.slots[slot], e.scale_offset, e.scale_nbytes, torch.float16, (e.numel // GROUP, 1))

    # ----- the schedule --------------------------------------------------------------------------
    def _issue_until(self, c: int) -> None:
        while self._issued <= c:
            self._issue(self._issued)
            self._issued += 1

    def _issue(self, c: int) -> None:
        j, slot = c % len(self.order), c % self.buffers
        nbytes = self.layer_bytes[j]
        dst, src = self.slots[slot][:nbytes], self.host[j]
        if self._copy_stream is not None:
            s = self._copy_stream
            s.wait_event(self._free[slot])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(s):
                start.record(s)
                dst.copy_(src, non_blocking=True)
                end.record(s)
            self._ready[slot] = end
            self._pending.append((start, end, nbytes))
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            self.copy_s += time.perf_counter() - t0
            self.timed_bytes += nbytes
        self.bytes_copied += nbytes
        self.copies += 1

    def _pre_model(self, module: nn.Module, args: Any) -> None:
        if self._executed % len(self.order):  # the previous forward stopped half-way
            self._resync(0)
        self._fwd_bytes = 0
        self._harvest()
        self._issue_until(self._executed + self.lookahead)

    def _post_model(self, module: nn.Module, args: Any, output: Any) -> None:
        self.forwards += 1
        self.last_forward_bytes = self._fwd_bytes

    def _pre_layer(self, j: int, module: nn.Module, args: Any) -> None:
        if self._executed % len(self.order) != j:
            self._resync(j)
        c = self._executed
        slot = c % self.buffers
        self._issue_until(c + self.lookahead)
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        if compute is not None:
            compute.wait_event(self._ready[slot])
        if self.direct:
            for p, v in zip(self.params[j], self.slot_views[slot][j]):
                p.data = v
        else:
            with torch.no_grad():
                for e, src, out in zip(self.entries[j], self.slot_views[slot][j], self.out_views[j]):
                    if e.host_dtype is None:
                        torch.mul(src, self._scales(slot, e).float(), out=out.view(-1, GROUP))
                    else:
                        out.copy_(src)
            if compute is not None:
                self._free[slot].record(compute)
        self._fwd_bytes += self.layer_bytes[j]

    def _post_layer(self, j: int, module: nn.Module, args: Any, output: Any) -> None:
        c = self._executed
        if self.direct:
            if self.cuda:
                self._free[c % self.buffers].record(torch.cuda.current_stream(self.device))
            for p, v in zip(self.params[j], self.host_views[j]):
                p.data = v
        self._executed = c + 1
        self._issue_until(c + self.lookahead + 1)

    def _resync(self, j: int) -> None:
        """Out of order (a forward raised, or a layer was called alone): wait for everything, restart at j."""
        self.synchronize()
        if self.direct:
            for ps, hv in zip(self.params, self.host_views):
                for p, v in zip(ps, hv):
                    p.data = v
        self._executed = self._issued = j
        self.resyncs += 1

    # ----- counters --------------------------------------------------------------------------------
    def _harvest(self, wait: bool = False) -> None:
        while self._pending:
            start, end, nbytes = self._pending[0]
            if not wait and not end.query():
                break
            end.synchronize()
            self.copy_s += start.elapsed_time(end) / 1e3
            self.timed_bytes += nbytes
            self._pending.popleft()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._harvest(wait=True)

    def reset_counters(self) -> None:
        self.bytes_copied = self.copies = self.timed_bytes = self.forwards = self.resyncs = 0
        self.last_forward_bytes = self._fwd_bytes = 0
        self.copy_s = 0.0
        self._pending.clear()

    @property
    def bytes_per_forward(self) -> int:
        """Bytes one forward moves host -> device (every streamed layer's block once)."""
        return sum(self.layer_bytes)

    def stats(self, sync: bool = True) -> dict[str, Any]:
        """Counters (``sync``: wait for the copies in flight first, so their time is included)."""
        if sync:
            self.synchronize()
        return {"streamed_layers": list(self.order), "num_streamed": len(self.order),
                "host_format": self.host_format, "mode": "direct" if self.direct else "convert",
                "buffers": self.buffers, "lookahead": self.lookahead, "pinned_with": self.pinned_with,
                "host_bytes": sum(self.layer_bytes), "device_buffer_bytes": sum(t.numel() for t in [*self.slots, self.compute]),
                "bytes_per_forward": self.bytes_per_forward, "last_forward_bytes": self.last_forward_bytes,
                "forwards": self.forwards, "copies": self.copies, "bytes_copied": self.bytes_copied,
                "copy_s": self.copy_s, "timed_bytes": self.timed_bytes, "resyncs": self.resyncs,
                "achieved_GBps": self.timed_bytes / self.copy_s / 1e9 if self.copy_s > 0 else float("nan")}

    def close(self) -> None:
        """Remove the hooks and release the pinned registration (direct mode: the streamed parameters
        keep pointing at their host views; convert mode: at the last layer written to the compute buffer)."""
        if self.order:
            self.synchronize()
            self._resync(0)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._finalizer()


def offload_model(model: Transformer, streamed_layers: Iterable[int], device: torch.device | str,
                  host_format: str | None = "bf16", buffers: int = 2, lookahead: int = 1,
                  fill: Fill | None = None, pin: str = "auto") -> LayerStreamer:
    """Move everything but ``streamed_layers`` to ``device`` (meta parameters are materialised there,
    from ``fill`` when given, else uninitialised) and stream those layers from host memory.

    ``host_format``: "auto" (the model dtype, copied as is), "bf16" / "fp16" / "fp32" (cast on the device
    when it differs from the model dtype), "int8" (Q8_0, dequantized on the device). ``pin``: "auto"
    (cudaHostRegister, else pin_memory), "register", "pin_memory" or "none" (ignored off CUDA).
    """
    dev = torch.device(device)
    streamed = sorted(set(int(i) for i in streamed_layers))
    prefixes = tuple(f"layers.{i}." for i in streamed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            if name.startswith(prefixes):
                continue
            if p.is_meta:
                value = fill(name, p) if fill is not None else torch.empty(p.shape, dtype=p.dtype, device=dev)
                _set_param(model, name, value.to(device=dev, dtype=p.dtype))
            elif p.device != dev:
                p.data = p.data.to(dev)
    model.init_rope(dev)
    return LayerStreamer(model, streamed, dev, host_format, buffers, lookahead, fill, pin)


class StreamingTorchBackend(TorchBackend):
    """TorchBackend whose plans' weight fetches are carried out by a ``LayerStreamer``.

    The placement's fetch ops are the streamer's copies (inside the forward, hooked on the layers), so
    they are taken off the plan the TorchBackend sees; the step result gets the bytes the step's forwards
    moved (``link_bytes``), the copy time the streamer's events have measured since the step started
    (``transfer_s``; copies still in flight are counted in a later step) and a ``fetch`` op on ``pcie0``.
    """

    def __init__(self, model: Transformer, cache: KVCache, clock_start: float, *, streamer: LayerStreamer,
                 **kwargs: Any) -> None:
        super().__init__(model, cache, clock_start, **kwargs)
        self.streamer = streamer

    def execute(self, plan: StepPlan) -> StepResult:
        st = self.streamer
        ops = [op for op in plan.memory_ops if op.op not in ("fetch", "prefetch")]
        forwards, copy_s = st.forwards, st.copy_s
        result = super().execute(replace(plan, memory_ops=ops))
        st._harvest()  # copies that have finished (no wait)
        moved = (st.forwards - forwards) * st.bytes_per_forward
        result.link_bytes += moved
        result.transfer_s += st.copy_s - copy_s
        if moved:
            result.ops.append(OpTiming("fetch", "pcie0", result.start, result.end, moved))
        return result

    def describe(self) -> dict[str, Any]:
        s = self.streamer.stats(sync=False)
        return {**super().describe(), "stream_host_format": s["host_format"], "stream_mode": s["mode"],
                "streamed_layers": s["num_streamed"], "stream_bytes_per_forward": s["bytes_per_forward"],
                "stream_bytes_copied": s["bytes_copied"], "stream_copy_s": s["copy_s"],
                "stream_achieved_GBps": s["achieved_GBps"]}
