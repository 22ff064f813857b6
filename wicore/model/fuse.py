"""Fused projections: one GEMM for q/k/v and one for gate/up per decoder layer.

A decode step at batch 1 is a chain of matrix-vector products; three small ones (q, k, v) and two
large ones (gate, up) read the same input. ``fuse_projections`` concatenates each group into one
weight (``Attention.qkv``, ``GatedMLP.gate_up``) and points the original parameters at views of it,
so the model still has exactly its checkpoint's parameters by name and shape (``state_dict``,
``named_parameters``, the loaders and ``verify`` see no difference), no memory is duplicated, and a
forward runs one GEMM (one kernel launch, one larger and better-shaped read) per group. Results
equal the unfused model's up to the summation order the GEMM kernel picks for the larger matrix.

Only layers whose weights all live on the compute device are fused: layers streamed from host
memory or NVMe (``wicore.runtime.offload``) point their parameters at copy buffers every forward and
are left alone. Call it after the model is placed (moving the model afterwards would leave the fused
tensors behind: call ``unfuse_projections`` first).
"""

from __future__ import annotations

import torch
from torch import nn

from wicore.model.layers import Attention, GatedMLP
from wicore.model.transformer import Transformer


def _fuse(parts: list[nn.Parameter]) -> torch.Tensor | None:
    dev, dtype = parts[0].device, parts[0].dtype
    if any(p.is_meta or p.device != dev or p.dtype != dtype for p in parts):
        return None
    fused = torch.cat([p.detach() for p in parts], dim=0)
    row = 0
    for p in parts:
        n = p.shape[0]
        p.data = fused[row: row + n]  # the parameter becomes a view: its old storage is freed
        row += n
    return fused


@torch.no_grad()
def fuse_projections(model: Transformer, device: torch.device | str | None = None,
                     skip_layers: set[int] | frozenset[int] = frozenset()) -> int:
    """Fuse q/k/v and gate/up of every decoder layer of ``model`` whose weights are on ``device`` (None:
    the embedding's device) and whose index is not in ``skip_layers``; returns the number of fused groups."""
    dev = torch.device(device) if device is not None else model.embed_tokens.weight.device
    n = 0
    for index, layer in enumerate(model.layers):
        if index in skip_layers:
            continue
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn, Attention) and isinstance(mlp, GatedMLP)
        if attn.qkv is None and attn.q_proj.weight.device == dev:
            attn.qkv = _fuse([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            n += attn.qkv is not None
        if mlp.gate_up is None and mlp.gate_proj.weight.device == dev:
            mlp.gate_up = _fuse([mlp.gate_proj.weight, mlp.up_proj.weight])
            n += mlp.gate_up is not None
    return n


def unfuse_projections(model: nn.Module) -> None:
    """Undo ``fuse_projections``: every parameter gets its own storage again."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Attention) and mod.qkv is not None:
                for lin in (mod.q_proj, mod.k_proj, mod.v_proj):
                    lin.weight.data = lin.weight.detach().clone()
                mod.qkv = None
            elif isinstance(mod, GatedMLP) and mod.gate_up is not None:
                for lin in (mod.gate_proj, mod.up_proj):
                    lin.weight.data = lin.weight.detach().clone()
                mod.gate_up = None

