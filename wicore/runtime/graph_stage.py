"""CUDA-graph decode forwards of one pipeline stage (``parallel.pp`` > 1 with ``backend.cuda_graphs``).

A pipeline step's decode forward on rank r is this stage's layers over the rows of the step's decode
items: token ids (first stage) or the hidden states rank r - 1 sent, and, with the attention mass
measured, the mass the earlier stages summed. ``GraphStage`` runs that forward through static buffers
padded to the smallest bucket size >= B, as ``GraphDecode`` does for one device:

* per bucket, one int64 device buffer [3, Bk] of the rows' token ids (read by the first stage only),
  positions and KV slots, filled from the step description's device views with device copies (no host
  synchronisation); padding rows decode token 0 at position 0 of a scratch KV slot (the stage cache's
  last slot) that no request owns;
* on the later stages, the received hidden states [Bk, 1, H] and attention mass [Bk, max_len] land in
  the bucket's own buffers (``StageExecutor`` receives straight into their first B rows), zeros in
  the padding rows;
* outputs (static, overwritten by the next call of any bucket): the hidden states, or on the last
  stage the last-position logits [Bk, 1, V] fp32, and the mass (summed over this stage's layers; on
  the last stage per KV page [Bk, P]).

On CUDA each bucket is captured on its first use (warm-up on a side stream, then capture:
``graph_capture.capture``, thread-local capture mode: NCCL's proxy thread keeps calling CUDA), all
buckets sharing one memory pool; a bucket's capture comes before the step's receive is posted. The sends and receives between
ranks stay outside the graphs: the receive's wait orders the replay after it on the compute stream,
and every rank waits for its sends at the end of the step, before a later replay can overwrite the
buffers they read. On any other device (CPU tests, ranks on gloo) the same padded static-buffer
path runs eagerly. Prefill forwards stay eager.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.runtime.buckets import bucket_of, default_buckets
from wicore.runtime.graph_capture import BucketGraphs, capture, replay_counter

__all__ = ["GraphStage"]


@dataclass
class _Bucket:
    size: int
    index: Tensor  # [3, size] int64: token ids, positions, KV slots
    hidden: Tensor | None  # [size, 1, H] received hidden states (later stages)
    mass_in: Tensor | None  # [size, max_len] fp32 received attention mass (later stages, mass measured)
    out: Tensor | None = None  # static outputs once captured
    mass: Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class GraphStage(BucketGraphs):
    """Bucketed decode forwards of one pipeline stage; see the module docstring."""

    def __init__(self, model: Any, cache: KVCache, *, first: bool, hidden_size: int, dtype: torch.dtype,
                 measure_attention: bool = False, page_size: int = 16, use_graph: bool = True,
                 warmup: int = 2) -> None:
        if cache.max_slots < 2:
            raise ConfigError("GraphStage: the stage's KV cache needs a scratch slot beside the real ones "
                              f"(got {cache.max_slots} slot)")
        self.model, self.cache, self.device = model, cache, cache.device
        self.first, self.hidden_size, self.dtype = first, hidden_size, dtype
        self.measure_attention, self.page_size = measure_attention, page_size
        self.scratch_slot = cache.max_slots - 1
        self.buckets = default_buckets(cache.max_slots - 1)
        self.mode = "graph" if self.device.type == "cuda" and use_graph else "eager"
        self.warmup = max(1, warmup)
        self.on_replay = replay_counter(model, "GraphStage") if self.mode == "graph" else None
        self._buckets: dict[int, _Bucket] = {}
        self._pool: Any = None
        self.captures, self.capture_s, self.calls = 0, 0.0, 0

    def bucket(self, rows: int) -> int:
        b = bucket_of(rows, self.buckets)
        if b is None:
            raise ValueError(f"GraphStage: {rows} decode rows exceed the largest bucket {self.buckets[-1]}")
        return b

    def _forward(self, bk: _Bucket) -> tuple[Tensor, Tensor | None]:
        n = bk.size
        x = bk.index[0].view(n, 1) if self.first else bk.hidden
        assert x is not None
        y, m = self.model(x, bk.index[1].view(n, 1), self.cache, bk.index[2], bk.mass_in,
                          attention_mass=self.measure_attention, page_size=self.page_size)
        return y, m

    def _get(self, size: int) -> _Bucket:
        bk = self._buckets.get(size)
        if bk is None:
            dev = self.device
            index = torch.zeros((3, size), dtype=torch.long, device=dev)
            index[2] = self.scratch_slot
            hidden = None if self.first else torch.zeros((size, 1, self.hidden_size), dtype=self.dtype, device=dev)
            mass_in = (torch.zeros((size, self.cache.max_len), dtype=torch.float32, device=dev)
                       if self.measure_attention and not self.first else None)
            bk = self._buckets[size] = _Bucket(size, index, hidden, mass_in)
            if self.mode == "graph":
                t0 = time.perf_counter()
                bk.graph, (bk.out, bk.mass), self._pool = capture(dev, lambda: self._forward(bk), self.warmup,
                                                                  self._pool, error_mode="thread_local")
                self.captures += 1
                self.capture_s += time.perf_counter() - t0
        return bk

    def stage(self, positions: Tensor, slots: Tensor, ids: Tensor | None = None) -> _Bucket:
        """The bucket for ``len(slots)`` rows with their positions [B] and KV slots [B] (and token ids [B] on the
        first stage) copied in and the other rows reset to padding; the caller then fills ``hidden[:B]`` and
        ``mass_in[:B]`` on later stages and calls ``run``."""
        b = int(slots.shape[0])
        if not b:
            raise ValueError("GraphStage.stage: no decode rows")
        if self.first and ids is None:
            raise ValueError("GraphStage.stage: the first stage decodes token ids; give ids")
        bk = self._get(self.bucket(b))
        if ids is not None:
            bk.index[0, :b].copy_(ids.reshape(b))
        bk.index[1, :b].copy_(positions.reshape(b))
        bk.index[2, :b].copy_(slots.reshape(b))
        if b < bk.size:
            bk.index[:2, b:].zero_()
            bk.index[2, b:].fill_(self.scratch_slot)
        return bk

    def run(self, bk: _Bucket) -> tuple[Tensor, Tensor | None]:
        """This stage's decode forward of the bucket's rows: (hidden or logits, mass or None), [Bk, ...];
        rows past the staged ones are padding."""
        self.calls += 1
        if bk.graph is not None:
            self.replay(bk.graph)
            assert bk.out is not None
            return bk.out, bk.mass
        return self._forward(bk)
