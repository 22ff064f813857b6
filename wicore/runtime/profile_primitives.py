"""Primitive ops for the calibration table: GEMMs, attention, copies, disk reads.

They explain the composite timings (``wicore.runtime.profiler``) and give the
hardware-wide numbers the simulator's links use (``h2d_pinned``):

* ``gemm_<proj>`` at the model's projection shapes (``tokens`` = M rows,
  ``nbytes`` = weight bytes), ``F.linear`` in the model dtype;
* ``attn_decode`` (``batch`` rows, one query each over ``context`` keys, the
  eager kernel the runtime uses for decode) and ``attn_prefill`` (``tokens``
  causal queries over ``context`` = as many keys, SDPA as the runtime uses for
  prefill);
* copies of ``nbytes``: ``h2d_pinned``, ``h2d_pageable``, ``d2h_pinned``,
  ``d2d`` (device to device) and ``p2p`` (GPU 0 -> GPU 1, when there are two);
  on a CPU device pinned memory does not exist and ``h2d_pageable`` / ``d2d``
  are host memcpy;
* ``disk_read`` of a temp file of ``nbytes``: written, fsynced and dropped from
  the page cache with ``posix_fadvise(DONTNEED)`` before each timed read where
  the OS allows it (without it the number is the page cache's bandwidth, an
  upper bound; the table's meta says which).

Copy rows are hardware-wide (empty ``model`` and ``dtype``).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from wicore.model.layers import attend
from wicore.model.spec import ModelSpec
from wicore.runtime.timing import point, time_op

MIB = 2**20
Rows = list[dict[str, Any]]


def projection_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(in_features K, out_features N) of the model's GEMMs (q/k/v fused for the table)."""
    h = spec.hidden_size
    return {"gemm_qkv": (h, spec.q_dim + 2 * spec.kv_dim), "gemm_o": (spec.q_dim, h),
            "gemm_gate_up": (h, 2 * spec.intermediate_size), "gemm_down": (spec.intermediate_size, h),
            "gemm_lm_head": (h, spec.vocab_size)}


def profile_gemms(spec: ModelSpec, device: torch.device, dtype: torch.dtype, tokens: Sequence[int],
                  reps: int, warmup: int, model: str, dt: str, dev_name: str) -> Rows:
    rows: Rows = []
    for op, (k, n) in projection_shapes(spec).items():
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        for m in tokens:
            x = torch.randn(m, k, device=device, dtype=dtype)
            ts = time_op(partial(F.linear, x, w), device, reps, warmup)
            rows.append(point(op, model, dt, dev_name, ts, tokens=m, nbytes=w.numel() * w.element_size()))
        del w
    return rows


def profile_attention(spec: ModelSpec, device: torch.device, dtype: torch.dtype, batches: Sequence[int],
                      contexts: Sequence[int], prefill_tokens: Sequence[int], reps: int, warmup: int,
                      model: str, dt: str, dev_name: str) -> Rows:
    rows: Rows = []
    h, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    scale = 1.0 / (spec.head_dim ** 0.5)
    for b in batches:
        for s in contexts:
            q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
            k = torch.randn(b, hkv, s, d, device=device, dtype=dtype)
            mask = torch.ones(b, 1, 1, s, device=device, dtype=torch.bool)
            ts = time_op(partial(attend, q, k, k, mask, scale), device, reps, warmup)
            rows.append(point("attn_decode", model, dt, dev_name, ts, batch=b, context=s))
    for t in prefill_tokens:
        q = torch.randn(1, h, t, d, device=device, dtype=dtype)
        k = torch.randn(1, hkv, t, d, device=device, dtype=dtype)
        mask = torch.ones(t, t, device=device, dtype=torch.bool).tril()[None, None]
        ts = time_op(partial(attend, q, k, k, mask, scale, use_sdpa=True), device, reps, warmup)
        rows.append(point("attn_prefill", model, dt, dev_name, ts, batch=1, tokens=t, context=t))
    return rows


def _copy_rows(op: str, sizes: Sequence[int], make: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               device: torch.device, reps: int, warmup: int, dev_name: str, non_blocking: bool) -> Rows:
    rows: Rows = []
    for n in sizes:
        dst, src = make(n)
        ts = time_op(partial(dst.copy_, src, non_blocking=non_blocking), device, reps, warmup)
        rows.append(point(op, "", "", dev_name, ts, nbytes=n))
        del dst, src
    return rows


def profile_copies(device: torch.device, sizes: Sequence[int], reps: int, warmup: int,
                   dev_name: str) -> tuple[Rows, dict[str, str]]:
    """Copy bandwidth curves; returns (rows, ops skipped with the reason)."""
    u8 = torch.uint8
    rows: Rows = []
    skipped: dict[str, str] = {}

    def on_dev(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=u8, device=device)

    def host(n: int, pinned: bool) -> torch.Tensor:
        return torch.ones(n, dtype=u8).pin_memory() if pinned else torch.ones(n, dtype=u8)

    cuda = device.type == "cuda"
    if cuda:
        rows += _copy_rows("h2d_pinned", sizes, lambda n: (on_dev(n), host(n, True)), device, reps, warmup,
                           dev_name, True)
        rows += _copy_rows("d2h_pinned", sizes, lambda n: (host(n, True), on_dev(n).fill_(1)), device, reps,
                           warmup, dev_name, True)
    else:
        skipped["h2d_pinned"] = skipped["d2h_pinned"] = "no CUDA device: pinned host memory does not apply"
    rows += _copy_rows("h2d_pageable", sizes, lambda n: (on_dev(n), host(n, False)), device, reps, warmup,
                       dev_name, False)
    rows += _copy_rows("d2d", sizes, lambda n: (on_dev(n), on_dev(n).fill_(1)), device, reps, warmup,
                       dev_name, False)
    if cuda and torch.cuda.device_count() > 1:
        other = torch.device("cuda", 1 if (device.index or 0) == 0 else 0)
        rows += _copy_rows("p2p", sizes, lambda n: (torch.empty(n, dtype=u8, device=other), on_dev(n).fill_(1)),
                           device, reps, warmup, dev_name, False)
        torch.cuda.synchronize(other)
    else:
        skipped["p2p"] = "one device: no inter-GPU copy"
    return rows, skipped


def _drop_cache(fd: int) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False


def profile_disk(sizes: Sequence[int], reps: int, dev_name: str, folder: str | Path | None = None,
                 chunk: int = 16 * MIB) -> tuple[Rows, str]:
    """Sequential reads of temp files; returns (rows, a note on the page cache)."""
    rows: Rows = []
    dropped = True
    where = Path(folder) if folder else Path(tempfile.gettempdir())
    block = os.urandom(MIB)
    for n in sizes:
        path = where / f"wicore-profile-{os.getpid()}-{n}.bin"
        try:
            with path.open("wb") as fh:
                for _ in range(max(1, n // MIB)):
                    fh.write(block)
                fh.flush()
                os.fsync(fh.fileno())
            ts: list[float] = []
            for _ in range(reps):
                with path.open("rb", buffering=0) as fh:
                    dropped = _drop_cache(fh.fileno()) and dropped
                    t0 = time.perf_counter()
                    while fh.read(chunk):
                        pass
                    ts.append(time.perf_counter() - t0)
            rows.append(point("disk_read", "", "", dev_name, ts, nbytes=n))
        finally:
            path.unlink(missing_ok=True)
    note = (f"read after posix_fadvise(DONTNEED) in {where}: from the device unless the OS kept the pages"
            if dropped else f"page cache could not be dropped in {where}: an upper bound (cached reads)")
    return rows, note
