"""CUDA-graph prefill for the engine loop: one chunk of one request, right-padded to a length bucket.

Why: an eager prefill forward of a small model is host-bound. A Gemma-3-1B chunk of 16 to 1,024 tokens
launches the same few hundred kernels, and the step takes as long as the Python host needs to launch
them (about 30-35 ms on an H100 machine), or about twice that when the host is slow, so the same step
is bimodal between runs. Replaying a captured graph costs the host a few microseconds, so the step
takes what the GPU takes, every time.

``GraphPrefill.run(ids, context, slot)`` prefills ``ids`` (T tokens) at positions
``context .. context + T - 1`` of KV slot ``slot`` and returns the last real token's logits [1, V]
(fp32). The chunk runs at the smallest bucket Tb >= T (``wicore.runtime.buckets.prefill_buckets``):

* static inputs per bucket: one int64 device buffer [2 * Tb + 2] holding the token ids (pad: token 0),
  the positions (pad: the positions right after the chunk, ``context + T .. context + Tb - 1``), the
  slot and the real length T. One step stages them in one pinned host tensor and copies it with one
  ``non_blocking`` copy: no host synchronisation.
* padding is right-padding inside the request's own slot: pad tokens write K/V at positions past the
  chunk, which stay masked (causal) until real tokens overwrite them, as for right-padded batched
  prefill (``KVCache``); their logits are never read (``lengths`` picks the last real query). A chunk
  whose padded end ``context + Tb`` would pass ``cache.max_len`` cannot be padded: ``fits`` is False
  and the caller runs it eagerly.
* the output is static (overwritten by the next replay of that bucket): clone it to keep it.

On CUDA each bucket is captured on its first use, with that call's real inputs in the static buffer:
the warm-up forwards on a side stream compute exactly what the replay computes (the same K/V at the
same positions of the same slot), so capturing mid-run cannot disturb another request. Every bucket
shares one memory pool (``pool``, which ``GraphDecode`` may share too: no two graphs run at once).
The first use of a bucket pays its warm-up and capture; ``backend.warmup`` captures every bucket a
run can reach before the clock starts. On any other device (tests on CPU) the very same padded path
runs eagerly.

Not graphed: MoR routing (``return_hidden``), layers streamed on the streamer's cycle schedule (the
NVMe tier; see ``GraphDecode``), and chunks that do not fit (above).
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
from wicore.runtime.buckets import bucket_of, prefill_buckets
from wicore.runtime.graph_capture import capture, replay_counter

__all__ = ["GraphPrefill", "prefill_buckets"]


@dataclass
class _Bucket:
    size: int
    inputs: Tensor  # [2 * size + 2] int64 on the device: ids, positions, slot, length
    logits: Tensor | None = None  # [1, V] fp32 (static output once captured)
    graph: torch.cuda.CUDAGraph | None = None


class GraphPrefill:
    """Bucketed single-chunk prefill at any slot and context; see the module docstring."""

    def __init__(self, model: Transformer, cache: KVCache, buckets: Sequence[int] | None = None, *,
                 pool: Any = None, use_graph: bool = True, warmup: int = 2) -> None:
        device = model.embed_tokens.weight.device
        if device.type != cache.device.type:
            raise ConfigError(f"GraphPrefill: model is on {device} but the KV cache is on {cache.device}")
        sizes = (tuple(sorted(set(int(b) for b in buckets))) if buckets is not None
                 else prefill_buckets(cache.max_len))
        if not sizes or sizes[0] < 1 or sizes[-1] > cache.max_len:
            raise ConfigError(f"GraphPrefill: buckets={list(sizes)} must be positive and at most the KV slot "
                              f"length backend.max_len={cache.max_len}")
        self.model, self.cache, self.device = model, cache, cache.device
        self.buckets = sizes
        self.mode = "graph" if self.device.type == "cuda" and use_graph else "eager"
        self.warmup = max(1, warmup)
        self._buckets: dict[int, _Bucket] = {}
        self._pool = pool
        self.on_replay = replay_counter(model, "GraphPrefill") if self.mode == "graph" else None  # streamed layers
        self.captures = 0
        self.capture_s = 0.0
        self.calls = 0

    def bucket(self, tokens: int) -> int | None:
        """The bucket a chunk of ``tokens`` tokens runs at (None: longer than every bucket)."""
        return bucket_of(tokens, self.buckets)

    def fits(self, tokens: int, context: int) -> bool:
        """Whether a chunk of ``tokens`` at ``context`` can run padded (its bucket ends inside the slot)."""
        b = self.bucket(tokens)
        return tokens >= 1 and b is not None and context + b <= self.cache.max_len

    # ----- the forward ----------------------------------------------------------------------
    def _forward(self, bk: _Bucket) -> Tensor:
        n, buf = bk.size, bk.inputs
        out = self.model(buf[:n].view(1, n), buf[n:2 * n].view(1, n), self.cache, buf[2 * n:2 * n + 1],
                         lengths=buf[2 * n + 1:2 * n + 2], last_only=True)
        assert isinstance(out, Tensor)
        return out[:, -1]

    def _capture(self, bk: _Bucket) -> None:
        t0 = time.perf_counter()
        bk.graph, bk.logits, self._pool = capture(self.device, lambda: self._forward(bk), self.warmup, self._pool)
        self.captures += 1
        self.capture_s += time.perf_counter() - t0

    # ----- one chunk ------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, ids: Sequence[int], context: int, slot: int) -> Tensor:
        """Logits [1, V] (fp32) of the chunk's last token; a static buffer in graph mode (clone to keep)."""
        t = len(ids)
        if not self.fits(t, context):
            raise ValueError(f"GraphPrefill.run: a chunk of {t} tokens at context {context} does not fit a bucket "
                             f"of {list(self.buckets)} inside max_len={self.cache.max_len} (check fits() first)")
        if not 0 <= slot < self.cache.max_slots:
            raise ValueError(f"GraphPrefill.run: slot {slot} outside the cache's slots [0, {self.cache.max_slots})")
        size = self.bucket(t)
        assert size is not None
        host = torch.zeros(2 * size + 2, dtype=torch.long)
        host[:t] = torch.tensor(list(ids), dtype=torch.long)
        host[size:2 * size] = torch.arange(context, context + size)
        host[2 * size] = slot
        host[2 * size + 1] = t
        cuda = self.device.type == "cuda"
        if cuda:
            host = host.pin_memory()  # the caching host allocator keeps it alive until the copy is done
        bk = self._buckets.get(size)
        self.calls += 1
        if bk is None:
            bk = self._buckets[size] = _Bucket(size, host.to(self.device, non_blocking=cuda))
            if self.mode == "graph":
                self._capture(bk)  # with these real inputs (see the module docstring)
        else:
            bk.inputs.copy_(host, non_blocking=cuda)
        if bk.graph is not None:
            bk.graph.replay()
            if self.on_replay is not None:
                self.on_replay()
            assert bk.logits is not None
            return bk.logits
        return self._forward(bk)

    def describe(self) -> dict[str, object]:
        return {"prefill_graphs": self.mode, "prefill_buckets": list(self.buckets),
                "prefill_graphs_captured": self.captures, "prefill_capture_s": self.capture_s}
