"""The NVMe weight tier: streamed decoder layers in safetensors files on a drive, read back every forward.

``NvmeStore`` writes one safetensors file per streamed layer (``layer-00012.safetensors``) into a fresh
directory ``wicore-nvme-*`` (under ``backend.nvme_dir``, else the system temporary directory) that is
removed at ``close()``. A layer's tensors are those of its host block (``wicore.runtime.offload``):
group-wise quantized matrices as ``<param>.q4`` (uint8 [groups, 16], two values a byte) or ``<param>.q8``
(int8 [groups, 32]) with ``<param>.scale`` (fp16 [groups]) and, for int4, ``<param>.min`` (fp16
[groups]); everything else (norms) as ``<param>`` in the model dtype. The file's metadata names the
layer, the format and each quantized parameter's shape. safetensors orders the data section by dtype
size, so every tensor is naturally aligned in it; the whole data section is the layer's block, read with
one ``pread`` and copied to the device in one piece (the streamer takes the offsets from the header).

Reads bypass the page cache, so that a forward reads the drive and not host memory: ``O_DIRECT`` with
4096-aligned buffers, offsets and lengths (the aligned span around the data section is read) where the
filesystem supports it (probed at start-up), else plain reads followed by
``posix_fadvise(POSIX_FADV_DONTNEED)``; ``io_mode`` says which. Written files are fsync'ed and dropped
from the cache too.

``Reader``: one background thread that reads layer blocks into ``staging`` preallocated buffers (pinned
on CUDA: the streamer's allocator) in the order the streamer asks: read ``c`` (execution ``c`` of the
streamer's cycle) goes into buffer ``c % staging``, after the event of the copy that last read that
buffer (execution ``c - staging``) has completed. ``take(c)`` waits for read ``c``; ``release(c, event)``
queues read ``c + staging`` behind that copy's event. ``drain()`` waits for every queued read and forgets
them (the streamer's resync), so a forward that raised half-way leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import shutil
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wicore.errors import ConfigError

IO_ALIGN = 4096  # O_DIRECT alignment of buffers, offsets and lengths (covers 512-byte sectors too)
MAX_IO = 1 << 30  # bytes per read call (Linux returns at most ~2 GiB from one read)
FIELD = "backend.nvme_dir"
DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


@dataclass(frozen=True)
class LayerFile:
    """One written layer: where its data section (the layer's block) lies in its file."""

    path: Path
    data_start: int  # file offset of the data section (8 + header length, 8-aligned)
    nbytes: int  # bytes of the data section
    offsets: dict[str, tuple[int, int]]  # tensor name -> [start, end) inside the data section

    def span(self, direct: bool) -> tuple[int, int, int]:
        """(file offset, bytes to read, offset of the block in what is read)."""
        if not direct:
            return self.data_start, self.nbytes, 0
        a0 = self.data_start // IO_ALIGN * IO_ALIGN
        a1 = -(-(self.data_start + self.nbytes) // IO_ALIGN) * IO_ALIGN
        return a0, a1 - a0, self.data_start - a0


def mount_of(path: Path) -> dict[str, str]:
    """The mount holding ``path`` (/proc/mounts, the longest mount point above it): its ``source``, ``mount``
    point and filesystem type ``fs``; empty strings where unknown."""
    best = {"source": "", "mount": "", "fs": ""}
    with contextlib.suppress(OSError):
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best["mount"]):
                best = {"source": parts[0], "mount": mnt, "fs": parts[2]}
    return best


def _probe_direct(directory: Path) -> bool:
    """Whether an aligned O_DIRECT read works on the filesystem of ``directory``."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = directory / ".o_direct_probe"
    try:
        probe.write_bytes(b"\0" * IO_ALIGN)
        fd = os.open(probe, os.O_RDONLY | flag)
        try:
            buf = mmap.mmap(-1, IO_ALIGN)  # page-aligned
            return os.preadv(fd, [buf], 0) == IO_ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def _drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _cleanup(directory: Path, fds: dict[Any, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
    shutil.rmtree(directory, ignore_errors=True)


class NvmeStore:
    """Layer files on a drive (see the module docstring). ``directory``: where to create the store's
    own directory (None: the system temporary directory); ``direct_io``: None probes O_DIRECT,
    True requires it, False reads through the page cache and drops it (fadvise)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, direct_io: bool | None = None,
                 field: str = FIELD) -> None:
        try:
            base = None if directory is None or str(directory) == "" else Path(directory).expanduser()
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix="wicore-nvme-", dir=base))
        except OSError as e:
            raise ConfigError(f"{field}: cannot create the weight store in {directory} ({e.strerror or e}); "
                              f"give a writable directory on the NVMe drive, or {field}=null for a temporary "
                              "directory") from None
        self.files: dict[int, LayerFile] = {}
        self._fds: dict[int, int] = {}
        self._finalizer = weakref.finalize(self, _cleanup, self.dir, self._fds)
        can_direct = _probe_direct(self.dir)
        if direct_io and not can_direct:
            self.close()
            raise ConfigError(f"{field}: O_DIRECT reads are not supported in {self.dir.parent}; use another "
                              "directory or let the store read through the page cache")
        self.direct = can_direct if direct_io is None else bool(direct_io)
        self.fs_type = mount_of(self.dir)["fs"]
        self.io_mode = "O_DIRECT" if self.direct else (
            "buffered+POSIX_FADV_DONTNEED" if hasattr(os, "posix_fadvise") else "buffered (page cache)")

    @property
    def file_bytes(self) -> int:
        """Bytes of every written file (headers included)."""
        return sum(lf.data_start + lf.nbytes for lf in self.files.values())

    def write(self, key: int, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> LayerFile:
        """Write ``tensors`` (contiguous CPU tensors) as layer ``key``'s file; returns where they are."""
        from safetensors.torch import save_file

        path = self.dir / f"layer-{key:05d}.safetensors"
        try:
            save_file(tensors, str(path), metadata=metadata)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                _drop_cache(fd)
            finally:
                os.close(fd)
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except OSError as e:
            raise ConfigError(f"{FIELD}: writing {path} failed ({e.strerror or e}); free space on the drive "
                              "or give another directory") from None
        offsets, end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = (int(o) for o in info["data_offsets"])
            if start % DTYPE_SIZE.get(info["dtype"], 1):
                raise RuntimeError(f"{path.name}: {name} at data offset {start} is not aligned to its dtype")
            offsets[name] = (start, stop)
            end = max(end, stop)
        lf = LayerFile(path, 8 + n, end, offsets)
        old = self._fds.pop(key, None)
        if old is not None:
            os.close(old)
        self._fds[key] = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if self.direct else 0))
        self.files[key] = lf
        return lf

    def read_into(self, key: int, buf: memoryview) -> tuple[int, int]:
        """Read layer ``key``'s block into ``buf`` (IO_ALIGN-aligned when direct, at least
        ``span(direct)[1]`` bytes). Returns (bytes read from the drive, offset of the block in ``buf``)."""
        lf, fd = self.files[key], self._fds[key]
        offset, length, inner = lf.span(self.direct)
        done = 0
        while done < length:
            got = os.preadv(fd, [buf[done:min(length, done + MAX_IO)]], offset + done)
            if got <= 0:
                break
            done += got
        if done < inner + lf.nbytes:
            raise OSError(f"{lf.path}: short read, {done} of {inner + lf.nbytes} bytes")
        if not self.direct:
            _drop_cache(fd, offset, length)
        return done, inner

    def read_span(self, key: int) -> int:
        """Bytes ``read_into`` needs in its buffer for layer ``key``."""
        return self.files[key].span(self.direct)[1]

    def close(self) -> None:
        """Close the files and remove the store's directory."""
        self._finalizer()


@dataclass
class _Read:
    c: int
    key: int
    buf: int
    after: Any  # a CUDA event the read waits for (the copy out of the buffer), or None
    done: threading.Event = field(default_factory=threading.Event)
    nbytes: int = 0
    inner: int = 0
    seconds: float = 0.0
    error: BaseException | None = None


def _serve(jobs: queue.SimpleQueue[_Read | None], store: NvmeStore, views: list[memoryview]) -> None:
    while (job := jobs.get()) is not None:
        try:
            if job.after is not None:
                job.after.synchronize()
            t0 = time.perf_counter()
            job.nbytes, job.inner = store.read_into(job.key, views[job.buf])
            job.seconds = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the thread that waits for this read
            job.error = e
        finally:
            job.done.set()


def _stop(jobs: queue.SimpleQueue[_Read | None], thread: threading.Thread) -> None:
    jobs.put(None)
    thread.join(timeout=60)


class Reader:
    """Reads the blocks of layers ``keys`` (one cycle, in order) from ``store`` ahead of their use into
    ``staging`` buffers from ``alloc`` (see the module docstring). Counters: ``reads``, ``nbytes``
    (bytes read from the drive), ``read_s`` (time inside the reads), ``wait_s`` (time ``take`` waited)."""

    def __init__(self, store: NvmeStore, keys: Sequence[int], staging: int = 2,
                 alloc: Callable[[int], Tensor] | None = None) -> None:
        if staging < 1:
            raise ConfigError(f"nvme reader: staging must be >= 1, got {staging}")
        self.store, self.keys, self.staging = store, list(keys), staging
        size = max((store.read_span(k) for k in self.keys), default=0)
        make = alloc or (lambda n: torch.empty(n, dtype=torch.uint8))
        self.buffers: list[Tensor] = []
        for _ in range(staging):
            raw = make(size + IO_ALIGN)
            off = (-raw.data_ptr()) % IO_ALIGN
            self.buffers.append(raw[off:off + size])
        self.staging_bytes = staging * size
        views = [b.numpy().data for b in self.buffers]  # writable memoryviews of the buffers
        self._jobs: dict[int, _Read] = {}
        self._queue: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._queue, store, views), daemon=True,
                                        name="wicore-nvme-reader")
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._queue, self._thread)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.reads = self.nbytes = 0
        self.read_s = self.wait_s = 0.0

    def _submit(self, c: int, after: Any) -> None:
        job = _Read(c, self.keys[c % len(self.keys)], c % self.staging, after)
        self._jobs[c] = job
        self._queue.put(job)

    def take(self, c: int) -> Tensor:
        """Wait for read ``c`` and return its block (a view of a staging buffer). A read never queued
        (the first of a cycle, or after a failed read) drains the queue and starts reading at ``c``."""
        job = self._jobs.get(c)
        if job is None:
            self.drain()
            for k in range(c, c + self.staging):
                self._submit(k, None)
            job = self._jobs[c]
        t0 = time.perf_counter()
        job.done.wait()
        self.wait_s += time.perf_counter() - t0
        del self._jobs[c]
        if job.error is not None:
            raise job.error
        self.reads += 1
        self.nbytes += job.nbytes
        self.read_s += job.seconds
        lf = self.store.files[job.key]
        return self.buffers[job.buf][job.inner:job.inner + lf.nbytes]

    def release(self, c: int, after: Any = None) -> None:
        """The copy out of read ``c``'s buffer is enqueued (``after``: its end event; None: done):
        queue read ``c + staging`` into that buffer behind it."""
        self._submit(c + self.staging, after)

    def drain(self) -> None:
        """Wait for every queued read and forget them (their buffers are free afterwards)."""
        for job in self._jobs.values():
            job.done.wait()
        self._jobs.clear()

    def close(self) -> None:
        self.drain()
        self._finalizer()
