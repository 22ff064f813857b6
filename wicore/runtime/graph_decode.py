"""CUDA-graph decode for the engine loop: any set of KV slots, any batch size (bucketed).

``GraphDecode`` runs the batched single-token decode forward of ``TorchBackend`` (rows at arbitrary
cache slots and positions) through static input buffers padded to the smallest bucket size >= B:

* static inputs per bucket: one int64 device buffer [3, Bk] holding the token ids, positions and
  slots of its rows (``ids`` / ``positions`` are its rows 0 and 1 viewed as [Bk, 1], ``slots`` its
  row 2). One step stages the three rows in one host tensor (pinned on CUDA) and copies it with
  one ``non_blocking`` copy: no host synchronisation.
* padding rows decode token 0 at position 0 of a scratch KV slot (by default the cache's last slot,
  ``cache.max_slots - 1``) that no request ever owns, so they never touch a real slot; their
  outputs are garbage that the caller drops by slicing ``[:B]``.
* outputs (static, overwritten by the next call of any bucket): the last-token logits [Bk, V]
  (fp32) and, with ``measure_attention``, the attention mass per KV page [Bk, P].

On CUDA each bucket is captured lazily, on its first use: a warm-up on a side stream (cuBLAS
handles, allocator) then a ``torch.cuda.CUDAGraph`` capture of the forward, all buckets sharing
one memory pool (they never run concurrently). A step copies its inputs into the static buffer
and replays. Capturing synchronises the device once (``torch.cuda.graph`` does), so the first
step of each new bucket size pays that; replays do not sync. Everything in
``Transformer.forward`` on the decode path is capturable: ``KVCache.update`` writes with
advanced indexing by device tensors (``index_put_`` with int64 indices, no mask, no ``nonzero``)
and gathers the rows with ``kb[slots]`` (an index kernel); masks, RoPE tables and the
``torch.full`` of last indices are device kernels; the Gemma embedding scale is a Python float
cached on the first (warm-up) call. No op of the forward reads a value back to the host. What
does sync lies outside the graph, in ``TorchBackend.execute``: the step's one ``.tolist()`` of
the new tokens, the one ``.tolist()`` of the attention mass after it (the device is idle by
then) and the closing ``torch.cuda.synchronize`` that times the step.

On any other device (tests on CPU) the very same padded static-buffer path runs eagerly, so the
padding, scratch-slot and slicing logic is exercised without a GPU.

Not graphed (``TorchBackend`` keeps the eager forward): MoR routing (``return_hidden`` and routed
depths), layers streamed on the ``LayerStreamer``'s cycle schedule (the NVMe tier; from host memory
the graph-safe schedule lets the capture hold the copies: ``wicore.runtime.offload``), and a
``measure_attention`` setting different from the one the graphs were built with. With streamed
layers every replay calls the streamer's ``replayed()`` (no hook runs in a replay).

Comparing graph vs eager decode on a GPU (the same engine workload, Gemma-3-1B-shaped, random
weights); run both and compare ``output_tokens_per_s`` / ``tpot_p50`` in ``summary.json``::

    python3 run_experiment.py backend=torch model=gemma3-1b backend.cuda_graphs=true \
        workload.num_requests=64 workload.concurrency=16 progress=false report.enabled=false
    python3 run_experiment.py backend=torch model=gemma3-1b backend.cuda_graphs=false \
        workload.num_requests=64 workload.concurrency=16 progress=false report.enabled=false
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.transformer import Transformer
from wicore.runtime.buckets import bucket_of, default_buckets
from wicore.runtime.graph_capture import BucketGraphs, capture, replay_counter

__all__ = ["GraphDecode", "default_buckets"]


@dataclass
class _Bucket:
    size: int
    inputs: Tensor  # [3, size] int64 on the device: ids, positions, slots
    logits: Tensor | None = None  # [size, V] fp32 (static output once captured)
    mass: Tensor | None = None  # [size, P] fp32 with measure_attention
    graph: torch.cuda.CUDAGraph | None = None


class GraphDecode(BucketGraphs):
    """Bucketed, slot-indirected single-token decode; see the module docstring."""

    def __init__(self, model: Transformer, cache: KVCache, buckets: Sequence[int] | None = None,
                 measure_attention: bool = False, page_size: int = 16, *, scratch_slot: int | None = None,
                 use_graph: bool = True, warmup: int = 2, pool: Any = None) -> None:
        device = model.embed_tokens.weight.device
        if device.type != cache.device.type:
            raise ConfigError(f"GraphDecode: model is on {device} but the KV cache is on {cache.device}")
        scratch = cache.max_slots - 1 if scratch_slot is None else scratch_slot
        if not 0 <= scratch < cache.max_slots:
            raise ConfigError(f"GraphDecode: scratch_slot={scratch} outside the cache's slots [0, {cache.max_slots})")
        max_rows = cache.max_slots - 1  # every slot but the scratch one
        sizes = tuple(sorted(set(int(b) for b in buckets))) if buckets is not None else default_buckets(max_rows)
        if not sizes or sizes[0] < 1 or sizes[-1] < max_rows:
            raise ConfigError(f"GraphDecode: buckets={list(sizes)} must be positive and reach the {max_rows} real "
                              "KV slots (a decode batch can hold every one of them)")
        if page_size < 1:
            raise ConfigError(f"GraphDecode: page_size must be >= 1, got {page_size}")
        self.model, self.cache, self.device = model, cache, cache.device
        self.buckets, self.scratch_slot = sizes, scratch
        self.measure_attention, self.page_size = measure_attention, page_size
        self.mode = "graph" if self.device.type == "cuda" and use_graph else "eager"
        self.warmup = max(1, warmup)
        self._buckets: dict[int, _Bucket] = {}
        self._pool: Any = pool  # the graphs' shared memory pool handle (None: made on the first capture)
        self.on_replay = replay_counter(model, "GraphDecode") if self.mode == "graph" else None  # streamed layers
        self.captures = 0  # graphs captured so far
        self.capture_s = 0.0  # wall time spent warming up and capturing
        self.calls = 0

    def bucket(self, rows: int) -> int:
        """The smallest bucket size >= ``rows``."""
        b = bucket_of(rows, self.buckets)
        if b is not None:
            return b
        raise ValueError(f"GraphDecode: {rows} decode rows exceed the largest bucket {self.buckets[-1]}")

    # ----- the forward ----------------------------------------------------------------------
    def _forward(self, bk: _Bucket) -> tuple[Tensor, Tensor | None]:
        n = bk.size
        out = self.model(bk.inputs[0].view(n, 1), bk.inputs[1].view(n, 1), self.cache, bk.inputs[2],
                         return_attention_mass=self.measure_attention, last_only=True, page_size=self.page_size)
        if isinstance(out, tuple):
            logits, mass = out[0], out[1]
            return logits[:, -1], mass
        assert isinstance(out, Tensor)
        return out[:, -1], None

    def _padding(self, n: int) -> Tensor:
        """Inputs of ``n`` padding rows: token 0 at position 0 of the scratch slot."""
        pad = torch.zeros((3, n), dtype=torch.long)
        pad[2] = self.scratch_slot
        return pad

    def _get(self, size: int) -> _Bucket:
        bk = self._buckets.get(size)
        if bk is None:
            bk = _Bucket(size, self._padding(size).to(self.device))
            self._buckets[size] = bk
            if self.mode == "graph":
                self._capture(bk)
        return bk

    def _capture(self, bk: _Bucket) -> None:
        """Warm up on a side stream, then capture; the static inputs hold padding rows, so both only
        write the scratch slot."""
        t0 = time.perf_counter()
        bk.graph, (bk.logits, bk.mass), self._pool = capture(self.device, lambda: self._forward(bk), self.warmup,
                                                             self._pool)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0

    # ----- one step -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, ids: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> tuple[Tensor, Tensor | None]:
        """Decode one token for each row (``ids[i]`` at ``positions[i]`` of KV slot ``slots[i]``).

        Returns (logits [Bk, V] fp32, mass [Bk, P] or None) for the bucket Bk >= B; rows >= B are
        padding: slice ``[:B]``. In graph mode these are static buffers that the next call overwrites.
        Slots must be distinct real slots (not the scratch slot); positions < ``cache.max_len``
        (not checked on the device: that would sync).
        """
        b = len(ids)
        if not b or len(positions) != b or len(slots) != b:
            raise ValueError(f"GraphDecode.run: ids, positions, slots must have one equal, nonzero length "
                             f"(got {len(ids)}, {len(positions)}, {len(slots)})")
        if self.scratch_slot in slots:
            raise ValueError(f"GraphDecode.run: slot {self.scratch_slot} is the scratch slot of the padding rows")
        bk = self._get(self.bucket(b))
        host = self._padding(bk.size)
        host[:, :b] = torch.tensor([list(ids), list(positions), list(slots)], dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()  # the caching host allocator keeps it alive until the copy is done
        bk.inputs.copy_(host, non_blocking=True)
        self.calls += 1
        if bk.graph is not None:
            self.replay(bk.graph)
            assert bk.logits is not None
            return bk.logits, bk.mass
        return self._forward(bk)
