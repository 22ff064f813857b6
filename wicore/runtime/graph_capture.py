"""Warm a forward up on a side stream, then capture one call of it into a CUDA graph.

The warm-up runs first (cuBLAS handles and workspaces, allocator growth, any value a forward caches on
its first call, such as the Gemma embedding scale) on a side stream, as capture requires; the capture
then records one call. ``GraphDecode``, ``GraphPrefill`` and ``GraphedDecoder`` share this.

A model whose layers a ``LayerStreamer`` streams (``model.layer_streamer``) can be captured only on the
streamer's graph-safe schedule; ``replay_counter`` refuses the other one and gives what each replay must call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from wicore.errors import ConfigError

T = TypeVar("T")


def capturable(model: Any) -> bool:
    """Whether a CUDA graph can hold ``model``'s forward: no streamed layers, or streamed on the graph-safe
    schedule. A streamer on the cycle schedule cannot be captured: its copies run ahead across forwards and
    are timed by host queries."""
    streamer = getattr(model, "layer_streamer", None)
    return streamer is None or bool(streamer.per_forward)


def replay_counter(model: Any, who: str) -> Callable[[], None] | None:
    """The ``replayed`` counter of ``model``'s layer streamer (None: no streamed layers); refuses a model that
    is not ``capturable``."""
    streamer = getattr(model, "layer_streamer", None)
    if streamer is None:
        return None
    if not capturable(model):
        raise ConfigError(f"{who}: the model streams layers on the cycle schedule, which a CUDA graph cannot hold; "
                          "build the streamer with schedule='forward' (experiments.run_torch does when graphs are on)")
    counter: Callable[[], None] = streamer.replayed
    return counter


class BucketGraphs:
    """What the bucketed graph runners (``GraphDecode``, ``GraphStage``) share: their mode, buckets and capture
    counters (``describe``), and a replay that tells a layer streamer about it (no hook runs in a replay)."""

    mode: str
    buckets: tuple[int, ...]
    captures: int
    capture_s: float
    on_replay: Callable[[], None] | None

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()
        if self.on_replay is not None:
            self.on_replay()

    def describe(self) -> dict[str, object]:
        return {"cuda_graphs": self.mode, "graph_buckets": list(self.buckets), "graphs_captured": self.captures,
                "graph_capture_s": self.capture_s}


def capture(device: torch.device, forward: Callable[[], T], warmup: int,
            pool: Any = None, error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, T, Any]:
    """(graph, the captured call's outputs: static tensors every replay overwrites, the memory pool used).

    ``pool``: a ``torch.cuda.graph_pool_handle()`` shared with graphs that never run at the same time
    (None: a new one). ``error_mode``: ``torch.cuda.graph``'s ``capture_error_mode``; ``thread_local`` lets
    other threads of the process (NCCL's proxy thread in a pipeline rank) call CUDA while this one captures.
    Runs under ``no_grad``: the warm-up must not build autograd state.
    """
    with torch.cuda.device(device), torch.no_grad():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode):
            out = forward()
    return graph, out, pool
