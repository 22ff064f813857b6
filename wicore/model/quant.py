"""Group-wise quantisation with torch ops: the same bytes as ``wicore.memory.formats``
(numpy), for tensors on any device. The formats themselves are defined there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wicore.memory.formats import Format, QTensor


@dataclass(frozen=True)
class TorchQTensor:
    """``QTensor`` with torch tensors (on the input's device)."""

    data: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, ...]
    fmt: Format

    def to_numpy(self) -> QTensor:
        def arr(t: Any) -> np.ndarray:
            return t.detach().cpu().numpy()
        return QTensor(arr(self.data), arr(self.scales), None if self.zeros is None else arr(self.zeros),
                       self.shape, self.fmt)

    def to_bytes(self) -> bytes:
        return self.to_numpy().to_bytes()


def quantize_torch(t: torch.Tensor, fmt: Format) -> TorchQTensor:
    """Store ``t`` in ``fmt`` with torch ops (same bytes as ``quantize``)."""
    shape = tuple(int(s) for s in t.shape)
    flat = t.detach().reshape(-1).to(torch.float32)
    empty = torch.zeros(0, dtype=torch.float16, device=t.device)
    if not fmt.group_size:
        cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt.name]
        raw = flat.to(cast).contiguous()
        data = raw.view(torch.uint8) if raw.numel() else torch.zeros(0, dtype=torch.uint8, device=t.device)
        return TorchQTensor(data, empty, None, shape, fmt)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{fmt.name}: cannot quantize non-finite values")
    pad = fmt.num_groups(flat.numel()) * fmt.group_size - flat.numel()
    g = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, fmt.group_size)
    if fmt.name == "int8":
        scale = (g.abs().amax(dim=1) / 127.0).to(torch.float16)
        d = scale.to(torch.float32)[:, None]
        q = torch.where(d > 0, torch.round(g / torch.where(d > 0, d, 1.0)), 0.0)
        return TorchQTensor(q.clamp(-127, 127).to(torch.int8).reshape(-1), scale, None, shape, fmt)
    lo16 = g.amin(dim=1).to(torch.float16)
    lo = lo16.to(torch.float32)
    scale = ((g.amax(dim=1) - lo) / 15.0).to(torch.float16)
    d = scale.to(torch.float32)[:, None]
    q = torch.where(d > 0, torch.round((g - lo[:, None]) / torch.where(d > 0, d, 1.0)), 0.0)
    q = q.clamp(0, 15).to(torch.uint8).reshape(-1)
    return TorchQTensor(q[0::2] | (q[1::2] << 4), scale, lo16, shape, fmt)


def dequantize_torch(q: TorchQTensor) -> torch.Tensor:
    """Back to a float32 tensor of ``q.shape`` (same values as ``dequantize``)."""
    fmt, n = q.fmt, 1
    for s in q.shape:
        n *= s
    if not fmt.group_size:
        cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt.name]
        if q.data.numel() == 0:
            return torch.zeros(q.shape, dtype=torch.float32, device=q.data.device)
        return q.data.view(cast).to(torch.float32).reshape(q.shape)
    d = q.scales.to(torch.float32)[:, None]
    if fmt.name == "int8":
        vals = q.data.to(torch.float32).reshape(-1, fmt.group_size) * d
    else:
        assert q.zeros is not None
        nib = torch.stack([q.data & 0x0F, q.data >> 4], dim=1).reshape(-1)
        vals = nib.to(torch.float32).reshape(-1, fmt.group_size) * d + q.zeros.to(torch.float32)[:, None]
    return vals.reshape(-1)[:n].reshape(q.shape)
