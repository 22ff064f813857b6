"""Building blocks shared by the Gemma-3 and Llama-3.1 decoders (plain torch).

Numerics follow Hugging Face transformers' eager implementations so that logits match:

* ``RMSNorm`` normalises in fp32. Gemma (``offset=True``) multiplies by ``1 + weight`` in fp32 and
  casts at the end; Llama casts the normalised value back first and then multiplies by ``weight``.
* RoPE tables are computed in fp32 (``position * inv_freq``) and cast to the model dtype; rotation
  uses the "rotate half" layout of HF checkpoints.
* Attention: scores in the model dtype (fp32 when the model runs in fp16, see ``clamp_fp16``),
  softmax in fp32, probabilities cast back before the value matmul. GQA groups the query heads
  per KV head instead of repeating K/V, so a cached K/V buffer is never copied per query head.

fp16 strategy (see also ``wicore.model.transformer``): Gemma-3 activations exceed the fp16 range.
When a model runs in fp16 every sublayer output, the gated MLP product and the residual stream after
each residual add are clamped to ``±(finfo(fp16).max - FP16_MARGIN)`` by ``clamp_fp16``; norms are
computed in fp32 and attention scores in fp32. The residual stream itself stays fp16 (half the
activation memory of an fp32 stream). Other dtypes are untouched, so bf16/fp32 match HF bit-for-bit
in structure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wicore.errors import ConfigError

FP16_MARGIN = 1000.0
FP16_LIMIT = torch.finfo(torch.float16).max - FP16_MARGIN


def clamp_fp16(x: Tensor) -> Tensor:
    """Clamp an fp16 tensor to the finite range (inf -> ±FP16_LIMIT); identity for other dtypes."""
    if x.dtype != torch.float16:
        return x
    return x.clamp(-FP16_LIMIT, FP16_LIMIT)


class Linear(nn.Module):
    """Bias-free linear layer whose weight is allocated but not initialised (see ``init_weights``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim. ``offset=True``: Gemma's ``(1 + weight)``, weight init 0."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(0.0 if self.offset else 1.0)


# ----- rotary embeddings -------------------------------------------------------
def rope_inv_freq(head_dim: int, base: float, scaling: Mapping[str, Any] | None = None) -> Tensor:
    """fp32 inverse frequencies [head_dim // 2], with HF "linear" or "llama3" scaling applied."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if not scaling:
        return inv
    kind = str(scaling.get("rope_type", scaling.get("type", "default")))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ConfigError(f"rope_scaling: rope_type '{kind}' is not supported (use linear or llama3)")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, T, head_dim] for integer ``positions`` [B, T] (fp32 math, cast to dtype)."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, heads, T, D] with cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# ----- attention -----------------------------------------------------------------
def attention_masks(q_pos: Tensor, k_pos: Tensor, window: int) -> tuple[Tensor, Tensor | None]:
    """Boolean "may attend" masks [B, 1, T, S] for global and (window > 0) sliding-window layers.

    ``q_pos`` [B, T] are query positions; ``k_pos`` [B, S] or [S] are key positions. A query at p sees
    keys at k <= p (global) and, on local layers, only k in (p - window, p].
    """
    kp = k_pos[None, None, :] if k_pos.dim() == 1 else k_pos[:, None, :]
    qp = q_pos[:, :, None]
    causal = kp <= qp
    local = causal & (kp > qp - window) if window > 0 else None
    return causal.unsqueeze(1), (local.unsqueeze(1) if local is not None else None)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
           mass_index: Tensor | None = None, use_sdpa: bool = False) -> tuple[Tensor, Tensor | None]:
    """Grouped-query attention.

    q [B, H, T, D]; k, v [B, Hkv, S, D]; mask [B, 1, T, S] (True = attend). Returns the output
    [B, T, H * D] and, when ``mass_index`` [B] is given, the attention probabilities of query
    ``mass_index[b]`` averaged over heads: [B, S] (fp32, each row sums to 1).
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, hkv, g * t, d)  # head i * g + j shares KV head i (HF repeat_kv order)
    mass: Tensor | None = None
    if use_sdpa and mass_index is None:
        m = mask.unsqueeze(2).expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m, scale=scale)
    else:
        if q.dtype == torch.float16:  # fp16 scores overflow: compute them in fp32
            scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
        else:
            scores = torch.matmul(qg, k.transpose(-1, -2)) * scale
        scores = scores.view(b, hkv, g, t, s).masked_fill(~mask.unsqueeze(2), torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if mass_index is not None:
            idx = mass_index.view(b, 1, 1, 1, 1).expand(b, hkv, g, 1, s)
            mass = probs.gather(3, idx).mean(dim=(1, 2, 3))
        out = torch.matmul(probs.to(v.dtype).view(b, hkv, g * t, s), v)
    out = out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)
    return out, mass


class Attention(nn.Module):
    """q/k/v/o projections (no bias), optional Gemma q_norm/k_norm, RoPE, GQA."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, scale: float,
                 qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale
        self.q_proj = Linear(hidden, heads * head_dim)
        self.k_proj = Linear(hidden, kv_heads * head_dim)
        self.v_proj = Linear(hidden, kv_heads * head_dim)
        self.o_proj = Linear(heads * head_dim, hidden)
        self.q_norm = RMSNorm(head_dim, eps, offset=True) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps, offset=True) if qk_norm else None
        self.qkv: Tensor | None = None  # fused [q; k; v] weight (``wicore.model.fuse``): one GEMM instead of three

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, hidden] -> roped q [B, H, T, D], k and v [B, Hkv, T, D]."""
        b, t, _ = x.shape
        if self.qkv is not None:
            nq, nkv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            qf, kf, vf = F.linear(x, self.qkv).split((nq, nkv, nkv), dim=-1)
        else:
            qf, kf, vf = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = qf.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = kf.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = vf.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): GeGLU (gelu tanh, Gemma) or SwiGLU (silu, Llama)."""

    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__()
        if activation not in ("gelu_tanh", "silu"):
            raise ConfigError(f"mlp activation: unknown '{activation}' (use gelu_tanh or silu)")
        self.activation = activation
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)
        self.gate_up: Tensor | None = None  # fused [gate; up] weight (``wicore.model.fuse``)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.activation == "gelu_tanh" else F.silu(gate)
        return clamp_fp16(self.down_proj(clamp_fp16(act * up)))
