"""Graph-captured single-token decode for a fixed batch (gpt-fast style).

``GraphedDecoder`` wraps a ``Transformer`` and its ``KVCache`` for a fixed batch size B. Row i of the
batch is cache slot i (the model is called with ``slots=None``, so the cache returns views of slots
0..B-1 and nothing is gathered). One decode step is ``model(input_ids [B, 1], positions [B, 1])``
followed by a greedy argmax over the last logits.

Modes (``decoder.mode``):

* ``"graph"`` (default on CUDA): static input buffers ``input_ids`` / ``positions`` [B, 1]; the step
  (forward + argmax) is captured once in a ``torch.cuda.CUDAGraph`` after a warm-up on a side
  stream. ``step()`` copies the inputs into the static buffers and replays the graph; ``logits``
  [B, vocab] (fp32) and ``next_tokens`` [B] (int64) are static outputs, overwritten by every step.
* ``"compile"`` (``use_compile=True`` on CUDA): the same step through
  ``torch.compile(mode="reduce-overhead")`` (Inductor kernels + CUDA graph trees); its outputs are
  copied into static ``logits`` / ``next_tokens`` buffers. Optional: compiling takes minutes.
* ``"eager"`` (any non-CUDA device, or ``use_graph=False``): the model is called directly with the
  given inputs; the same numbers as the graph path (the same ops on the same inputs).

Capture and compile warm-ups run real forwards, which write K/V into the cache: they write token 0
at index ``max_len - 1`` of slots 0..B-1 (a scratch position). A row at position p < max_len - 1
never attends to it (causal mask), and a row reaching max_len - 1 overwrites it before reading, so
the scratch writes are invisible (the same argument as right-padded prefill in ``KVCache``).

``step()`` does no host synchronisation: pass tokens and positions that already live on the
decoder's device (a CPU tensor would be copied synchronously). Positions are not range-checked
(that would need a sync); they must be < ``cache.max_len``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.transformer import Transformer
from wicore.runtime.graph_capture import capture

__all__ = ["GraphedDecoder"]

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class GraphedDecoder:
    """Fixed-batch greedy decode step over slots 0..B-1 of ``cache``; see the module docstring."""

    def __init__(self, model: Transformer, cache: KVCache, batch_size: int, *, use_graph: bool = True,
                 use_compile: bool = False, warmup: int = 3) -> None:
        if not 1 <= batch_size <= cache.max_slots:
            raise ConfigError(f"GraphedDecoder: batch_size={batch_size} must be in [1, cache.max_slots="
                              f"{cache.max_slots}] (row i decodes in cache slot i)")
        device = model.embed_tokens.weight.device
        if device.type != cache.device.type:
            raise ConfigError(f"GraphedDecoder: model is on {device} but the KV cache is on {cache.device}")
        self.model, self.cache, self.batch_size, self.device = model, cache, batch_size, device
        self.vocab_size = model.spec.vocab_size
        shape = (batch_size, 1)
        # static inputs; initialised to the scratch step used by the warm-up (token 0 at max_len - 1)
        self.input_ids = torch.zeros(shape, dtype=torch.long, device=device)
        self.positions = torch.full(shape, cache.max_len - 1, dtype=torch.long, device=device)
        self.logits = torch.zeros((batch_size, self.vocab_size), dtype=torch.float32, device=device)
        self.next_tokens = torch.zeros((batch_size,), dtype=torch.long, device=device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._compiled: StepFn | None = None
        self.capture_s = 0.0  # wall time of warm-up + capture / compile
        cuda = device.type == "cuda"
        self.mode = "eager" if not cuda or not (use_graph or use_compile) else (
            "compile" if use_compile else "graph")
        t0 = time.perf_counter()
        if self.mode == "graph":
            self._capture(max(1, warmup))
        elif self.mode == "compile":
            self._compile(max(3, warmup))
        if cuda:
            torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - t0

    # ----- the step -------------------------------------------------------------------------
    def _forward(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(last logits [B, vocab] fp32, greedy next tokens [B] int64); writes K/V at ``positions``."""
        out = self.model(input_ids, positions, self.cache, None)
        logits = out if isinstance(out, Tensor) else out[0]
        last = logits[:, -1]
        return last, last.argmax(dim=-1)

    def _capture(self, warmup: int) -> None:
        self._graph, (self.logits, self.next_tokens), _ = capture(
            self.device, lambda: self._forward(self.input_ids, self.positions), warmup)

    def _compile(self, warmup: int) -> None:
        mark = getattr(torch._dynamo, "mark_static_address", None)
        if mark is not None:  # mutated cache buffers must keep their address inside CUDA graph trees
            for t in [*self.cache.k, *self.cache.v, self.input_ids, self.positions]:
                mark(t)
        self._compiled = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
        with torch.no_grad():
            for _ in range(warmup):
                self._run_compiled()

    def _run_compiled(self) -> None:
        assert self._compiled is not None
        torch.compiler.cudagraph_mark_step_begin()
        logits, nxt = self._compiled(self.input_ids, self.positions)
        self.logits.copy_(logits)  # CUDA-graph-tree outputs are overwritten by the next replay
        self.next_tokens.copy_(nxt)

    @torch.no_grad()
    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Decode one token per row: ``tokens``, ``positions`` [B] or [B, 1] (int64, on the device).

        Writes the rows' K/V at ``positions`` and returns the greedy next tokens [B]; the logits are in
        ``self.logits`` [B, vocab]. In graph / compile mode both are static buffers that the next step
        overwrites (clone them to keep them).
        """
        b = self.batch_size
        if self.mode == "eager":
            self.logits, self.next_tokens = self._forward(tokens.reshape(b, 1), positions.reshape(b, 1))
            return self.next_tokens
        self.input_ids.copy_(tokens.reshape(b, 1))
        self.positions.copy_(positions.reshape(b, 1))
        if self._graph is not None:
            self._graph.replay()
        else:
            self._run_compiled()
        return self.next_tokens

    @torch.no_grad()
    def generate(self, tokens: Tensor, positions: Tensor, steps: int) -> Tensor:
        """Greedy-decode ``steps`` tokens per row starting from ``tokens`` at ``positions`` ([B] or [B, 1]):
        step i feeds the previous output at ``positions + i``. Returns the outputs [B, steps] (int64)."""
        b = self.batch_size
        out = torch.empty((b, steps), dtype=torch.long, device=self.device)
        tok, pos = tokens.reshape(b), positions.reshape(b)
        for i in range(steps):
            nxt = self.step(tok, pos)
            out[:, i] = nxt
            tok, pos = nxt, pos + 1
        return out
