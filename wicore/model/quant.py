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


def dequantize_into(data: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, out: torch.Tensor,
                    fmt: Format, chunk: int = 1 << 22) -> torch.Tensor:
    """Write the values of a grouped tensor of whole groups into ``out`` (contiguous, any float dtype):
    ``data`` (int8 [G, 32] or packed uint8 [G, 16]), fp16 ``scales`` and (int4) ``zeros`` ([G] or
    [G, 1]). Bit-identical to ``dequantize_torch(q).to(out.dtype)``: the same float32 ops, the int4
    ones over ``chunk`` values at a time, so the float32 temporaries stay small (device dequant)."""
    g = fmt.group_size
    o = out.view(-1, g)
    d = scales.reshape(-1, 1)
    if fmt.name == "int8":
        return torch.mul(data.view(-1, g), d.float(), out=o)  # computed in float32, rounded once into out
    assert zeros is not None and fmt.name == "int4"
    z, packed = zeros.reshape(-1, 1), data.view(-1, g // 2)
    step = max(1, chunk // g)
    for a in range(0, o.shape[0], step):
        b = min(o.shape[0], a + step)
        q = packed[a:b]
        nib = torch.stack([q & 0x0F, q >> 4], dim=2).view(b - a, g)  # element 2i: low nibble, 2i+1: high
        vals = nib.to(torch.float32) * d[a:b].float()
        vals += z[a:b].float()
        o[a:b].copy_(vals)
    return out
