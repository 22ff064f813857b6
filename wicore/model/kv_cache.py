"""A static slot KV cache for continuous batching (gpt-fast style, no paging inside the buffers).

Per layer, K and V live in buffers ``[max_slots, kv_heads, max_len, head_dim]``. A sequence owns one
slot for its lifetime; token ``p`` of that sequence is stored at index ``p`` of the slot. A forward
call writes the new K/V of every row at ``positions`` of the row's slot and then attends over the
whole slot with a causal (and, on local layers, sliding-window) mask computed from positions, so
rows at different positions share one call and stale data beyond a row's position is never read.

Right-padded batched prefill is safe: pad tokens write K/V at positions past the row's length,
which stay masked until a real token at that position overwrites them. Pad positions must still be
``< max_len``.

Local (sliding-window) layers keep a full-length buffer too (simple, and it mirrors a paged pool
that allocates whole pages for them); a ring buffer would save memory and is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wicore.errors import ConfigError
from wicore.model.spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, max_slots: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 layers: range | None = None) -> None:
        """``layers``: the layers that get buffers (a pipeline stage's); the others hold empty
        [max_slots, 0] tensors. None: every layer."""
        if max_slots <= 0 or max_len <= 0:
            raise ConfigError(f"kv cache: max_slots and max_len must be positive, got {max_slots}, {max_len}")
        if max_len > spec.max_context:
            raise ConfigError(f"kv cache: max_len={max_len} exceeds the model's max_context={spec.max_context}")
        self.spec, self.max_slots, self.max_len = spec, max_slots, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.layers = layers if layers is not None else range(spec.num_layers)
        shape = (max_slots, spec.num_kv_heads, max_len, spec.head_dim)

        def buf(i: int) -> Tensor:
            return torch.zeros(shape if i in self.layers else (max_slots, 0), device=self.device, dtype=dtype)

        self.k = [buf(i) for i in range(spec.num_layers)]
        self.v = [buf(i) for i in range(spec.num_layers)]
        self._positions = torch.arange(max_len, device=self.device)

    @property
    def key_positions(self) -> Tensor:
        """Position of every cache index: ``arange(max_len)`` [S]."""
        return self._positions

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: Tensor, v: Tensor, slots: Tensor | None,
               positions: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, Hkv, T, D] at ``positions`` [B, T] of ``slots`` [B] (None: slots 0..B-1)
        and return the rows' full K, V [B, Hkv, max_len, D] (a view when ``slots`` is None)."""
        kb, vb = self.k[layer], self.v[layer]
        b = k.shape[0]
        if slots is None:
            kb, vb = kb[:b], vb[:b]
            rows = torch.arange(b, device=kb.device)[:, None]
        else:
            rows = slots[:, None]
        kb[rows, :, positions] = k.transpose(1, 2).to(kb.dtype)
        vb[rows, :, positions] = v.transpose(1, 2).to(vb.dtype)
        if slots is None:
            return kb, vb
        return kb[slots], vb[slots]

    def free(self, slot: int) -> None:
        """Reset a slot (zero its K/V in every layer) so another sequence can take it."""
        if not 0 <= slot < self.max_slots:
            raise IndexError(f"kv cache: slot {slot} out of range [0, {self.max_slots})")
        for t in self.k + self.v:
            t[slot].zero_()

    def reset(self) -> None:
        for t in self.k + self.v:
            t.zero_()
