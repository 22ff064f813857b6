"""Weight streaming: decoder layers that do not fit the GPU budget live in host memory (or on an NVMe
drive) and are copied to the device just in time, while the layers before them compute.

Host: each streamed ``DecoderLayer`` is one contiguous block (page-locked on CUDA: an exact-size
allocation registered with ``cudaHostRegister``, else ``torch.empty(pin_memory=True)``, which rounds
up to a power of two) in the host format: the model dtype as is ("direct" mode), or another float dtype
/ ``int8`` / ``int4`` ("convert" mode): matrices whose size is a multiple of 32 group-wise quantized
(``wicore.memory.formats``): Q8_0 (int8 + an fp16 scale per 32 values, 34/64 of the bf16 bytes) or
int4 (Q4_1-like: two values a byte + an fp16 scale and an fp16 minimum per 32 values, 20/64 of the bf16
bytes); norms in the model dtype. Layout and allocation: ``wicore.runtime.host_blocks``.

Device: ``buffers`` slots the size of the largest block (+ in convert mode one compute buffer holding a
layer in the model dtype). A dedicated copy stream moves a whole block with one ``copy_(non_blocking=True)``.

Schedule: the streamed layers form a cycle, the same order every forward. Execution ``c`` (counted over
all forwards) runs layer ``order[c % m]`` from slot ``c % buffers``. Its copy is enqueued at the end of
execution ``c - lookahead - 1`` (for the first layers of a forward: the end of the previous one) or at
the latest at the start of ``c - lookahead``, behind a ``wait_event`` on the event recorded when
execution ``c - buffers`` was done with the slot; the compute stream waits on the copy's end event
before layer ``c``. Nothing inside the forward synchronises the host (except waits for NVMe reads,
below). ``lookahead <= buffers - 1``.

Swapping in (forward pre/post hooks on the layers): direct mode points each parameter's ``.data`` at
its view in the slot for the layer's forward and back at its host view afterwards (so the idle model
still holds every weight, readable by name); convert mode writes the slot into the compute buffer on the
compute stream (``wicore.model.quant.dequantize_into``: ``int8 * fp32 scale -> dtype``, or for int4
``nibble * fp32 scale + fp32 min -> dtype`` in chunks of 4M values, bit-identical to
``dequantize_torch(q).to(dtype)``) and the streamed parameters point at its views for good. On a CPU
device the same code runs with plain copies and no streams or events (the tests).

NVMe tier (``source="nvme"``, ``memory.offload_to=nvme`` in ``experiments.run_torch``): the blocks are
not kept in host memory. At start-up each streamed layer is encoded in the host format (int4 by default;
int8 allowed; float formats refused) and written as a safetensors file by ``wicore.runtime.nvme_store``
(``backend.nvme_dir``; the file's data section is the block, its header gives the offsets); the
layer's source tensors are released as soon as it is written (with a checkpoint, the model is built on
the meta device and read tensor by tensor, so host memory never holds the streamed layers). Every
forward, a reader thread reads the blocks into ``staging`` host buffers (pinned on CUDA) with
``O_DIRECT`` (else buffered reads + ``POSIX_FADV_DONTNEED``, so the page cache does not hide the
drive): read ``c`` goes into buffer ``c % staging`` once the copy out of it for ``c - staging`` has
completed (its end event), i.e. reads run up to ``staging`` layers ahead of the copies, which run
``lookahead`` ahead of the compute. The copy of execution ``c`` is enqueued, exactly as from a host
block, after the host waited for read ``c``; the copy path, events and device dequant are the same.

Counters: bytes copied host -> device (issued, and used per forward); copy time from CUDA events around
each copy on the copy stream (after its wait) -> achieved PCIe bandwidth. NVMe, separately: bytes read
from the drive (the 4096-aligned span around each block with O_DIRECT), time inside the reads ->
achieved drive bandwidth, and the time the host waited for reads (``disk_wait_s``: the drive was the
bottleneck). A forward that raised half-way or a layer called out of order costs one full
synchronisation (and the wait for the reads in flight) and restarts the cycle there.

Graph-safe schedule (``schedule="forward"``, host blocks only): what a CUDA graph of a whole forward can
hold, so ``GraphDecode`` / ``GraphPrefill`` capture the streamed model too (``backend.cuda_graphs`` /
``backend.prefill_graphs`` with ``memory.offload_to=cpu``). Every forward starts the cycle afresh: layer
``j`` (in stream order) always runs from slot ``j % buffers``, the first ``lookahead + 1`` copies are
enqueued when the forward starts (the copy stream first waits for everything already on the compute
stream: the previous forward's use of every slot) and the compute stream waits for the copy stream when
the forward ends (so a capture joins it). Inside the forward the waits are the same events as above; no
copy is timed (CUDA events with timing and ``query`` cannot sit in a captured graph), so ``copy_s`` stays
0 and the achieved bandwidth is unknown. A replayed forward runs no hook: the graph's owner calls
``replayed()`` to count its bytes. The price: a forward's first copy no longer overlaps the end of the
previous forward, only the resident layers in front of the first streamed layer. The host blocks come
from torch's pinned allocator (``pin_memory``, rounded up to a power of two), since a capture refuses
copies from memory pinned with ``cudaHostRegister``.

Limits of the NVMe tier: one reader thread with one read in flight (large reads keep an NVMe queue busy,
small layers are latency-bound); the host blocks before enqueueing a copy whose read is late, so with
a slow drive the GPU idles (one full tier read per forward: the drive's bandwidth bounds the decode
rate); the store is rewritten at every start (no reuse of a previous run's files); one GPU only (not
with ``parallel.pp > 1``); with random weights (no checkpoint) the model is built in host memory first.
"""


from __future__ import annotations

import contextlib
import json
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from wicore.errors import ConfigError
from wicore.memory.formats import FORMATS
from wicore.model.kv_cache import KVCache
from wicore.model.quant import dequantize_into
from wicore.model.transformer import DTYPES, Transformer
from wicore.runtime.backend import TorchBackend
from wicore.runtime.host_blocks import GROUP, QUANT, Entry, host_block, layout, unregister, view_of
from wicore.runtime.nvme_store import NvmeStore, Reader
from wicore.types import OpTiming, StepPlan, StepResult

HOST_FORMATS = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
SOURCES = ("host", "nvme")
SCHEDULES = ("cycle", "forward")
Fill = Callable[[str, Tensor], Tensor]  # (full parameter name, meta/host parameter) -> values


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


def _release(closers: list[Callable[[], None]], blocks: list[tuple[Tensor, int]]) -> None:
    """Stop the NVMe reader and remove its store, then unregister the pinned blocks."""
    for close in closers:
        with contextlib.suppress(Exception):
            close()
    closers.clear()
    unregister(blocks)


def nvme_host_format(host_format: str | None) -> str:
    """The stored format of NVMe-resident layers: ``auto`` -> int4; int8 / int4 as given; float formats
    are refused (the drive is the slowest link: the tier keeps its layers quantized)."""
    fmt = host_format or "auto"
    if fmt == "auto":
        return "int4"
    if fmt not in QUANT:
        raise ConfigError(f"backend.host_format={fmt}: layers on the NVMe tier (memory.offload_to=nvme) are "
                          "stored quantized and dequantized on the device; use backend.host_format=int4 (or "
                          "auto, = int4) or int8, or keep the layers in host memory (memory.offload_to=cpu)")
    return fmt


class LayerStreamer:
    """Streams the decoder layers ``streamed`` of ``model`` from host memory or from an NVMe store (see
    the module docstring).

    The rest of the model must already be on ``device`` (``offload_model`` does that). Parameters of the
    streamed layers may be on the CPU (packed from there) or on the meta device (values from ``fill``).
    ``source="nvme"``: the blocks are written to ``store`` (default: a store in a temporary directory)
    instead of host memory and read back every forward into ``staging`` host buffers (default
    ``max(2, buffers)``); the streamer closes the store. ``schedule``: "cycle" (copies run ahead across
    forwards) or "forward" (graph-safe: each forward is self-contained; host blocks only).
    """

    def __init__(self, model: Transformer, streamed: Iterable[int], device: torch.device | str,
                 host_format: str | None = "auto", buffers: int = 2, lookahead: int = 1,
                 fill: Fill | None = None, pin: str = "auto", source: str = "host",
                 store: NvmeStore | None = None, staging: int | None = None, schedule: str = "cycle") -> None:
        if source not in SOURCES:
            raise ConfigError(f"offload: unknown source '{source}', use one of {list(SOURCES)}")
        fmt = nvme_host_format(host_format) if source == "nvme" else host_format or "auto"
        if fmt not in HOST_FORMATS:
            raise ConfigError(f"backend.host_format: unknown '{host_format}', use one of {list(HOST_FORMATS)}")
        if buffers < 1 or lookahead < 0 or (staging is not None and staging < 1):
            raise ConfigError(f"offload: buffers and staging must be >= 1 and lookahead >= 0, got {buffers}, "
                              f"{staging}, {lookahead}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"offload: unknown schedule '{schedule}', use one of {list(SCHEDULES)}")
        if schedule == "forward" and source == "nvme":
            raise ConfigError("offload: the graph-safe schedule (CUDA graphs over streamed layers) needs the layers in "
                              "host memory: the NVMe tier waits for its reads on the host; use memory.offload_to=cpu "
                              "or backend.cuda_graphs=false backend.prefill_graphs=false")
        self.model, self.device, self.host_format, self.source = model, torch.device(device), fmt, source
        self.per_forward = schedule == "forward"
        self.order = sorted(set(int(i) for i in streamed))
        bad = [i for i in self.order if not 0 <= i < len(model.layers)]
        if bad:
            raise ConfigError(f"offload: layers {bad} do not exist (the model has {len(model.layers)})")
        self.buffers, self.lookahead = buffers, min(lookahead, buffers - 1)
        self.cuda = self.device.type == "cuda"
        if self.per_forward and pin == "register":
            raise ConfigError("offload: the graph-safe schedule needs blocks from torch's pinned allocator (a CUDA graph "
                              "capture refuses copies from cudaHostRegister'ed memory); use pin='auto' or 'pin_memory'")
        # a capture accepts copies only from torch's own pinned memory: the graph-safe schedule allocates with it
        self.pin = ("pin_memory" if self.per_forward and pin == "auto" else pin) if self.cuda else "none"
        self.store = (store or NvmeStore()) if source == "nvme" else None
        self.reader: Reader | None = None
        self.pinned_with = ""
        self.host: list[Tensor] = []
        self._registered: list[tuple[Tensor, int]] = []
        self._closers: list[Callable[[], None]] = [] if self.store is None else [self.store.close]
        self._finalizer = weakref.finalize(self, _release, self._closers, self._registered)
        layers = [model.layers[i] for i in self.order]
        params = [list(layer.named_parameters()) for layer in layers]
        dtype = params[0][0][1].dtype if params else torch.float32
        self.direct = fmt == "auto" or (fmt in DTYPES and DTYPES[fmt] == dtype)
        lay = [layout(p, "auto" if self.direct else fmt) for p in params]
        self.entries = [e for e, _, _ in lay]
        self.layer_bytes = [b for _, b, _ in lay]
        out_bytes = max((o for _, _, o in lay), default=0)
        self.compute = torch.empty(0 if self.direct else out_bytes, dtype=torch.uint8, device=self.device)
        self.params: list[list[nn.Parameter]] = []
        self.host_views: list[list[Tensor]] = []
        self.out_views: list[list[Tensor]] = []
        for j, (i, layer) in enumerate(zip(self.order, layers)):
            self._pack(j, f"layers.{i}.", dict(params[j]), fill)
            params[j] = []
            hv = [self._src(self.host[j], e) for e in self.entries[j]] if self.store is None else []
            ov = [view_of(self.compute, e.out_offset, e.numel * e.dtype.itemsize, e.dtype, e.shape)
                  for e in self.entries[j]] if not self.direct else []
            self.host_views.append(hv)
            self.out_views.append(ov)
            # the layer's parameters now point at the host block (direct) or the compute buffer: the
            # tensors they were packed from are released here (with the NVMe store, before the next layer)
            self.params.append([_set_param(layer, e.name, hv[n] if self.direct else ov[n])
                                for n, e in enumerate(self.entries[j])])
        slot_bytes = max(self.layer_bytes, default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(buffers)]
        self.slot_views = [[[self._src(flat, e) for e in ents] for ents in self.entries] for flat in self.slots]
        if self.store is not None and self.order:
            self.reader = Reader(self.store, self.order, staging or max(2, buffers), self._alloc)
            self._closers.insert(0, self.reader.close)
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: list[Any] = [None] * buffers  # end event of the last copy into each slot
        self._free = [torch.cuda.Event() for _ in range(buffers)] if self.cuda else []
        self._pending: deque[tuple[Any, Any, int]] = deque()
        self._executed = self._issued = 0
        self.reset_counters()
        self._hooks: list[Any] = []
        if self.order:
            model.__dict__["layer_streamer"] = self  # how the graphs find the replay counter (removed by close)
            self._hooks += [model.register_forward_pre_hook(self._pre_model),
                            model.register_forward_hook(self._post_model)]
            for j, layer in enumerate(layers):
                self._hooks += [layer.register_forward_pre_hook(partial(self._pre_layer, j)),
                                layer.register_forward_hook(partial(self._post_layer, j))]

    # ----- setup ------------------------------------------------------------------------------
    def _alloc(self, nbytes: int) -> Tensor:
        """A host buffer (pinned on CUDA) that stays registered until close."""
        block, ptr, how = host_block(nbytes, self.pin)
        self.pinned_with = self.pinned_with or how
        if ptr:
            self._registered.append((block, ptr))
        return block

    def _pack(self, j: int, prefix: str, params: dict[str, Tensor], fill: Fill | None) -> None:
        """Layer ``j`` in the host format: into a host block, or (NVMe) into its store file."""
        block = self._alloc(self.layer_bytes[j]) if self.store is None else None
        stored: dict[str, Tensor] = {}
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
                for suffix, (offset, t) in e.encode(src).items():
                    if block is None:
                        stored[prefix + e.name + suffix] = t.cpu()
                    else:
                        raw = t.reshape(-1).view(torch.uint8)
                        block[offset:offset + raw.numel()].copy_(raw)
        if block is not None:
            self.host.append(block)
            return
        assert self.store is not None
        meta = {"format": "wicore-nvme-layer", "layer": prefix[len("layers."):-1], "host_format": self.host_format,
                "group_size": str(GROUP), "shapes": json.dumps({e.name: list(e.shape) for e in self.entries[j]})}
        lf = self.store.write(self.order[j], stored, meta)
        self.entries[j] = [e.relocate(prefix + e.name, lf.offsets) for e in self.entries[j]]
        self.layer_bytes[j] = lf.nbytes

    @staticmethod
    def _src(flat: Tensor, e: Entry) -> Tensor:
        """View of ``e`` in a block / slot: the tensor (float), the int8 groups [G, 32] (Q8_0) or the
        packed nibbles [G, 16] (int4)."""
        if e.host_dtype is not None:
            return view_of(flat, e.offset, e.nbytes, e.host_dtype, e.shape)
        g = e.numel // GROUP
        if e.quant == "int4":
            return view_of(flat, e.offset, e.nbytes, torch.uint8, (g, GROUP // 2))
        return view_of(flat, e.offset, e.nbytes, torch.int8, (g, GROUP))

    def _scales(self, slot: int, e: Entry, offset: int) -> Tensor:
        return view_of(self.slots[slot], offset, e.scale_nbytes, torch.float16, (e.numel // GROUP, 1))

    # ----- the schedule --------------------------------------------------------------------------
    def _capturing(self) -> bool:
        return self.cuda and torch.cuda.is_current_stream_capturing()

    def _issue_until(self, c: int) -> None:
        if self.per_forward:  # never past this forward's last layer
            c = min(c, len(self.order) - 1)
        while self._issued <= c:
            self._issue(self._issued)
            self._issued += 1

    def _issue(self, c: int) -> None:
        j, slot = c % len(self.order), c % self.buffers
        nbytes = self.layer_bytes[j]
        dst = self.slots[slot][:nbytes]
        src = self.host[j] if self.reader is None else self.reader.take(c)  # NVMe: wait for read c
        end: Any = None
        if self._copy_stream is not None:
            s = self._copy_stream
            # graph-safe schedule: no timing, and no wait on an event of another forward (the fork orders those)
            timed = not self.per_forward
            if timed or c >= self.buffers:
                s.wait_event(self._free[slot])
            start = torch.cuda.Event(enable_timing=True) if timed else None
            end = torch.cuda.Event(enable_timing=timed)
            with torch.cuda.stream(s):
                if start is not None:
                    start.record(s)
                dst.copy_(src, non_blocking=True)
                end.record(s)
            self._ready[slot] = end
            if start is not None:
                self._pending.append((start, end, nbytes))
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            self.copy_s += time.perf_counter() - t0
            self.timed_bytes += nbytes
        if self.reader is not None:  # the staging buffer is free once the copy is: read c + staging into it
            self.reader.release(c, end)
        if not self._capturing():  # a capture only records the copy: replayed() counts each replay
            self.bytes_copied += nbytes
            self.copies += 1

    def _pre_model(self, module: nn.Module, args: Any) -> None:
        self._fwd_bytes = 0
        if self.per_forward:
            if self._executed not in (0, len(self.order)):  # the previous forward stopped half-way
                self._point_at_host()
                self.resyncs += 1
            self._executed = self._issued = 0
            if self._copy_stream is not None:  # fork: after everything on the compute stream (every slot's last use)
                self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            if self._executed % len(self.order):  # the previous forward stopped half-way
                self._resync(0)
            self._harvest()
        self._issue_until(self._executed + self.lookahead)

    def _post_model(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.per_forward and self._copy_stream is not None:  # join (a capture must end with it joined)
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        if not self._capturing():
            self.forwards += 1
            self.last_forward_bytes = self._fwd_bytes

    def replayed(self) -> None:
        """A captured forward was replayed (no hook ran): count the bytes its copies moved."""
        self.forwards += 1
        self.copies += len(self.order)
        self.bytes_copied += self.bytes_per_forward
        self.last_forward_bytes = self.bytes_per_forward

    def _pre_layer(self, j: int, module: nn.Module, args: Any) -> None:
        expected = self._executed if self.per_forward else self._executed % len(self.order)
        if expected != j:
            if self._capturing():
                raise RuntimeError(f"LayerStreamer: streamed layer {self.order[j]} called out of order while a CUDA "
                                   "graph is captured")
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
                    if e.quant:
                        zeros = self._scales(slot, e, e.zero_offset) if e.quant == "int4" else None
                        dequantize_into(src, self._scales(slot, e, e.scale_offset), zeros, out, FORMATS[e.quant])
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
        if self.reader is not None:
            self.reader.drain()
        self._point_at_host()
        self._executed = self._issued = j
        self.resyncs += 1

    def _point_at_host(self) -> None:
        """Direct mode: every streamed parameter back on its host view (a forward may have stopped in a layer)."""
        if self.direct:
            for ps, hv in zip(self.params, self.host_views):
                for p, v in zip(ps, hv):
                    p.data = v

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
        if self.reader is not None:
            self.reader.reset_counters()

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
                "schedule": "forward" if self.per_forward else "cycle",
                "host_bytes": sum(b.numel() for b in self.host),  # blocks kept in host memory (0: NVMe)
                "device_buffer_bytes": sum(t.numel() for t in [*self.slots, self.compute]),
                "bytes_per_forward": self.bytes_per_forward, "last_forward_bytes": self.last_forward_bytes,
                "forwards": self.forwards, "copies": self.copies, "bytes_copied": self.bytes_copied,
                "copy_s": self.copy_s, "timed_bytes": self.timed_bytes, "resyncs": self.resyncs,
                "achieved_GBps": self.timed_bytes / self.copy_s / 1e9 if self.copy_s > 0 else float("nan"),
                **self.disk_stats()}

    @property
    def disk_bytes(self) -> int:
        """Bytes read from the NVMe store so far (reads the forwards have used)."""
        return self.reader.nbytes if self.reader is not None else 0

    def disk_stats(self) -> dict[str, Any]:
        """The NVMe side: where blocks come from, bytes / time / bandwidth of the drive reads, the time
        the forwards waited for them, the read mode (O_DIRECT or buffered + fadvise) and the files."""
        r, st = self.reader, self.store
        read_s = r.read_s if r is not None else 0.0
        return {"source": self.source, "disk_io": st.io_mode if st is not None else "",
                "nvme_dir": str(st.dir) if st is not None else "", "nvme_fs": st.fs_type if st is not None else "",
                "disk_file_bytes": st.file_bytes if st is not None else 0,
                "staging_buffers": r.staging if r is not None else 0,
                "staging_bytes": r.staging_bytes if r is not None else 0,
                "disk_reads": r.reads if r is not None else 0, "disk_bytes": self.disk_bytes,
                "disk_read_s": read_s, "disk_wait_s": r.wait_s if r is not None else 0.0,
                "disk_GBps": self.disk_bytes / read_s / 1e9 if read_s > 0 else float("nan")}

    def close(self) -> None:
        """Remove the hooks, stop the NVMe reader and remove its store, release the pinned registration
        (direct mode: the streamed parameters keep pointing at their host views; convert mode: at the
        last layer written to the compute buffer)."""
        if self.order:
            self.synchronize()
            self._resync(0)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.model.__dict__.get("layer_streamer") is self:
            del self.model.__dict__["layer_streamer"]
        self._finalizer()


def offload_model(model: Transformer, streamed_layers: Iterable[int], device: torch.device | str,
                  host_format: str | None = "bf16", buffers: int = 2, lookahead: int = 1,
                  fill: Fill | None = None, pin: str = "auto", source: str = "host",
                  store: NvmeStore | None = None, staging: int | None = None,
                  schedule: str = "cycle") -> LayerStreamer:
    """Move everything but ``streamed_layers`` to ``device`` (meta parameters are materialised there,
    from ``fill`` when given, else uninitialised) and stream those layers from host memory.

    ``host_format``: "auto" (the model dtype, copied as is), "bf16" / "fp16" / "fp32" (cast on the device
    when it differs from the model dtype), "int8" (Q8_0) / "int4" (Q4_1-like), dequantized on the device.
    ``pin``: "auto" (cudaHostRegister, else pin_memory), "register", "pin_memory" or "none" (ignored off
    CUDA). ``source="nvme"``: the streamed layers go to ``store`` (int4 or int8; "auto" = int4) and are
    read back every forward (``staging`` host buffers); they are not kept in host memory. ``schedule``:
    "forward" makes every forward self-contained, so CUDA graphs can capture it (host blocks only).
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
    return LayerStreamer(model, streamed, dev, host_format, buffers, lookahead, fill, pin, source, store, staging,
                         schedule)


class StreamingTorchBackend(TorchBackend):
    """TorchBackend whose plans' weight fetches are carried out by a ``LayerStreamer``.

    The placement's fetch ops are the streamer's copies (inside the forward, hooked on the layers), so
    they are taken off the plan the TorchBackend sees; the step result gets the bytes the step's forwards
    moved (``link_bytes``), the copy time the streamer's events have measured since the step started
    (``transfer_s``; copies still in flight are counted in a later step) and a ``fetch`` op on ``pcie0``.
    With the NVMe tier, a step whose forwards used reads from the drive also gets a ``fetch`` op on
    ``nvme`` with the bytes read (``link_bytes`` and ``transfer_s`` stay the host -> device side).
    """

    def __init__(self, model: Transformer, cache: KVCache, clock_start: float, *, streamer: LayerStreamer,
                 **kwargs: Any) -> None:
        super().__init__(model, cache, clock_start, **kwargs)
        self.streamer = streamer

    def execute(self, plan: StepPlan) -> StepResult:
        st = self.streamer
        ops = [op for op in plan.memory_ops if op.op not in ("fetch", "prefetch")]
        forwards, copy_s, disk = st.forwards, st.copy_s, st.disk_bytes
        result = super().execute(replace(plan, memory_ops=ops))
        st._harvest()  # copies that have finished (no wait)
        moved = (st.forwards - forwards) * st.bytes_per_forward
        result.link_bytes += moved
        result.transfer_s += st.copy_s - copy_s
        if moved:
            result.ops.append(OpTiming("fetch", "pcie0", result.start, result.end, moved))
        if st.disk_bytes > disk:
            result.ops.append(OpTiming("fetch", "nvme", result.start, result.end, st.disk_bytes - disk))
        return result

    def reset_stats(self) -> None:
        """The streamer's bytes, copies and copy time count from here (copies in flight are waited for)."""
        self.streamer.synchronize()
        self.streamer.reset_counters()

    def describe(self) -> dict[str, Any]:
        s = self.streamer.stats(sync=False)
        return {**super().describe(), "stream_host_format": s["host_format"], "stream_mode": s["mode"],
                "streamed_layers": s["num_streamed"], "stream_bytes_per_forward": s["bytes_per_forward"],
                "stream_bytes_copied": s["bytes_copied"], "stream_copy_s": s["copy_s"],
                "stream_achieved_GBps": s["achieved_GBps"], "stream_source": s["source"],
                "stream_disk_io": s["disk_io"], "stream_disk_bytes": s["disk_bytes"],
                "stream_disk_read_s": s["disk_read_s"], "stream_disk_wait_s": s["disk_wait_s"],
                "stream_disk_GBps": s["disk_GBps"], "stream_disk_file_bytes": s["disk_file_bytes"]}
