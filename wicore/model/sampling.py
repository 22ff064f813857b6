"""Batched token sampling with per-row parameters and no host synchronisation.

Each row has its own temperature (0 = greedy), top-k (0 = off) and top-p (1.0 = off), so one call
serves a batch that mixes greedy and sampled requests. Sampling uses the exponential-race trick
(argmax of p / Exp(1) noise), which draws from p exactly and, unlike ``torch.multinomial``, never
synchronises with the host. Seed it with a ``torch.Generator`` on the logits' device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_row(value: Tensor | float | int, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).expand(batch) if value.dim() == 0 else value.to(
            device=device, dtype=dtype)
    return torch.full((batch,), value, device=device, dtype=dtype)


def sample(logits: Tensor, temperature: Tensor | float = 0.0, top_k: Tensor | int = 0,
           top_p: Tensor | float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Next tokens [B] (int64) from ``logits`` [B, V].

    temperature [B] or scalar: rows with temperature <= 0 take the argmax. top_k [B]: keep the k
    largest logits (0 or >= V: all). top_p [B]: keep the smallest prefix of the sorted distribution
    whose mass reaches top_p (always at least the top token).
    """
    b, v = logits.shape
    dev = logits.device
    logits = logits.float()
    temp = _per_row(temperature, b, dev, torch.float32)
    k = _per_row(top_k, b, dev, torch.int64)
    p = _per_row(top_p, b, dev, torch.float32)
    greedy = temp <= 0
    greedy_tokens = logits.argmax(dim=-1)
    scaled = logits / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(v, device=dev)[None, :]
    k = torch.where(k <= 0, torch.full_like(k, v), k)
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((mass_before >= p[:, None]) & (rank > 0), 0.0)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-20)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    sampled = sorted_idx.gather(-1, choice).squeeze(-1)
    return torch.where(greedy, greedy_tokens, sampled)


def sample_host_params(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
    """``sample`` with the per-row parameters in host (CPU) tensors. When every row is greedy, which the host
    sees without a device sync, it is the argmax alone: no sort of the vocabulary and no noise drawn, so the
    generator is left as it was (a greedy warm-up does not change what a run samples)."""
    if bool((temperature <= 0).all()):
        return logits.argmax(dim=-1)
    return sample(logits, temperature, top_k, top_p, generator)
