"""The decoder: Gemma-3 (text) and Llama-3.x as one module parametrised by ``ModelSpec.family``.

Computes what HF transformers' ``Gemma3ForCausalLM`` / ``LlamaForCausalLM`` compute (eager
attention); parameter names are the HF names without the leading ``model.`` (``lm_head.weight``
stays), see ``wicore.model.checkpoint``.

Gemma-3: embedding * sqrt(hidden) (scale rounded to the model dtype), four (1 + w) RMSNorms per
layer, q_norm/k_norm, scale ``query_pre_attn_scalar ** -0.5``, local layers (``spec.is_global``
False) use RoPE base ``rope_local_base`` and a sliding window (a query at p sees keys in
(p - window, p]), global layers use ``rope_theta`` with ``spec.extra["rope_scaling"]`` (linear),
GeGLU, tied embeddings. Llama: w * RMSNorm, SwiGLU, RoPE ``rope_theta`` with "llama3" scaling when
given, all layers global, untied head (tied when ``tie_embeddings``), no embedding scaling.

fp16 strategy: the residual stream stays in fp16 but is clamped to ±(65504 - 1000) after every
residual add, as are the attention and MLP outputs and the gated MLP product (``clamp_fp16``);
all norms and attention scores/softmax are computed in fp32. bf16 and fp32 are not clamped. Use
``preferred_dtype(device)`` to pick bf16 where the GPU supports it (fp16 on Turing, fp32 on CPU).

Attention mass (``return_attention_mass=True``): for each row, the attention probabilities of its
last query (index ``lengths - 1``, or T - 1) averaged over all heads and all layers (local layers
included, so each row sums to 1), summed per KV page of ``page_size`` positions: [B, num_pages]
with ``num_pages = ceil(S / page_size)``; S is the cache length (page p = cache positions
[p * page_size, (p + 1) * page_size)) or, without a cache, the input length (token index).
The mass path always uses the eager attention kernel.

Early exit (``exit_layer`` [B, T] int: how many layers each token runs): after layer ``l`` the
hidden state of every token with ``exit_layer <= l`` is put back to its value before the layer
(``torch.where``), so it stays frozen at the exit state from then on. Deeper layers still run on
the frozen state, so the K/V they write for that token are projections of the exit state: this is
state propagation, the fill of skipped layers' K/V. With causal attention one parallel pass over a
sequence (teacher forcing) gives exactly what token-by-token decoding with the same exits gives,
with or without a KV cache. The final norm and LM head see the frozen state (the shallow exit's
prediction). No compute is saved (every layer runs for every token): this is the reference
semantics for measuring quality, not a fast path. ``exit_layer=None`` takes the plain path;
``exit_layer`` all ``>= num_layers`` gives bit-identical results (``torch.where`` only selects).
The attention mass still averages every layer (an exited token's deeper queries come from its
frozen state).

Extras (``return_hidden=True`` or ``tap_layers``): a ``ModelOutput`` named tuple (logits, mass or
None, the final-normed hidden state [B, T, H] ([B, 1, H] with ``last_only``), and for each entry
``k`` of ``tap_layers`` the final-normed hidden state after ``k`` layers, i.e. the state a token
that exits at ``k`` feeds to the LM head; ``F.linear(tap, model.output_weight)`` gives its logits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.layers import (
    Attention,
    Embedding,
    GatedMLP,
    Linear,
    RMSNorm,
    attend,
    attention_masks,
    clamp_fp16,
    rope_cos_sin,
    rope_inv_freq,
)
from wicore.model.spec import ModelSpec

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelOutput(NamedTuple):
    """What ``Transformer.forward`` returns when extras are requested (see the module docstring)."""

    logits: Tensor  # [B, T or 1, vocab] fp32
    mass: Tensor | None  # [B, num_pages] with return_attention_mass, else None
    hidden: Tensor  # final-normed hidden state [B, T or 1, H], model dtype
    taps: tuple[Tensor, ...]  # final-normed hidden state after tap_layers[i] layers, each like hidden


@dataclass
class LayerContext:
    """What every decoder layer of one forward needs besides its input: the global and local
    (sliding-window) attention masks and the RoPE tables of the two bases."""

    global_mask: Tensor
    local_mask: Tensor | None
    cos_g: Tensor
    sin_g: Tensor
    cos_l: Tensor
    sin_l: Tensor

    def for_layer(self, layer: DecoderLayer) -> tuple[Tensor, Tensor, Tensor]:
        """(cos, sin, mask) of ``layer``."""
        if layer.is_global or self.local_mask is None:
            return self.cos_g, self.sin_g, self.global_mask
        return self.cos_l, self.sin_l, self.local_mask


def layer_context(spec: ModelSpec, positions: Tensor, key_positions: Tensor, inv_freq_global: Tensor,
                  inv_freq_local: Tensor, dtype: torch.dtype) -> LayerContext:
    """Masks and RoPE tables for queries at ``positions`` [B, T] over keys at ``key_positions``."""
    global_mask, local_mask = attention_masks(positions, key_positions, spec.sliding_window)
    cos_g, sin_g = rope_cos_sin(positions, inv_freq_global, dtype)
    local = local_mask is not None and spec.num_local_layers > 0
    cos_l, sin_l = rope_cos_sin(positions, inv_freq_local, dtype) if local else (cos_g, sin_g)
    return LayerContext(global_mask, local_mask, cos_g, sin_g, cos_l, sin_l)


def mass_per_page(mass: Tensor, page_size: int) -> Tensor:
    """Attention mass per position [B, S] summed per page of ``page_size`` positions: [B, ceil(S / page_size)]."""
    b, s = mass.shape
    pages = -(-s // page_size)
    return F.pad(mass, (0, pages * page_size - s)).view(b, pages, page_size).sum(-1)


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: '{dtype}' is not a torch compute dtype; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def preferred_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older CUDA GPUs (e.g. Turing), fp32 on CPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def preferred_dtype_name(device: torch.device | str) -> str:
    """``preferred_dtype`` as a config name ("bf16", "fp16", "fp32"): what ``dtype: auto`` resolves to."""
    tdt = preferred_dtype(device)
    return next(name for name, d in DTYPES.items() if d == tdt)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        gemma = spec.family == "gemma3"
        self.index, self.gemma, self.is_global = index, gemma, spec.is_global(index)
        scale = (spec.query_pre_attn_scalar or spec.head_dim) ** -0.5 if gemma else spec.head_dim ** -0.5
        h, eps = spec.hidden_size, spec.rms_norm_eps
        self.self_attn = Attention(h, spec.num_heads, spec.num_kv_heads, spec.head_dim, scale,
                                   qk_norm=gemma, eps=eps)
        self.mlp = GatedMLP(h, spec.intermediate_size, "gelu_tanh" if gemma else "silu")
        self.input_layernorm = RMSNorm(h, eps, offset=gemma)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=gemma)  # Llama: the pre-MLP norm
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=True) if gemma else None
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=True) if gemma else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, positions: Tensor,
                cache: KVCache | None, slots: Tensor | None, mass_index: Tensor | None,
                use_sdpa: bool) -> tuple[Tensor, Tensor | None]:
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(x), cos, sin)
        if cache is not None:
            k, v = cache.update(self.index, k, v, slots, positions)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out, mass = attend(q, k, v, mask, attn.scale, mass_index, use_sdpa)
        a = clamp_fp16(attn.o_proj(out))
        if self.pre_feedforward_layernorm is not None and self.post_feedforward_layernorm is not None:
            x = clamp_fp16(x + self.post_attention_layernorm(a))
            m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = clamp_fp16(x + a)
            m = self.mlp(self.post_attention_layernorm(x))
        return clamp_fp16(x + m), mass


class Transformer(nn.Module):
    """Decoder-only LM.

    ``attn_impl``: "auto" (default: eager for single-token decode, where a masked SDPA call is slower
    than two small matmuls, SDPA for longer inputs, where it avoids materialising [T, S] scores),
    "sdpa" or "eager" (HF's op order; bit-identical logits on CPU).
    """

    inv_freq_global: Tensor
    inv_freq_local: Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.attn_impl = "auto"
        h = spec.hidden_size
        self.embed_tokens = Embedding(spec.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(h, spec.rms_norm_eps, offset=spec.family == "gemma3")
        self.lm_head = None if spec.tie_embeddings else Linear(h, spec.vocab_size)
        self._embed_scale: dict[torch.dtype, float] = {}
        self.init_rope()
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the fp32 RoPE frequency buffers (after ``to_empty`` or a dtype cast)."""
        spec, dev = self.spec, device if device is not None else self.embed_tokens.weight.device
        scaling = spec.extra.get("rope_scaling")
        self.register_buffer("inv_freq_global", rope_inv_freq(spec.head_dim, spec.rope_theta, scaling)
                             .to(dev), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(spec.head_dim, spec.rope_local_base)
                             .to(dev), persistent=False)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """N(0, std) for embeddings and projections; norms to identity (Gemma 0, Llama 1)."""
        for mod in self.modules():
            if isinstance(mod, Linear | Embedding):
                mod.weight.normal_(0.0, std, generator=generator)
            elif isinstance(mod, RMSNorm):
                mod.reset_parameters()

    @property
    def output_weight(self) -> Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden) rounded to ``dtype`` as HF does (Gemma); 1.0 for Llama."""
        if self.spec.family != "gemma3":
            return 1.0
        if dtype not in self._embed_scale:
            self._embed_scale[dtype] = float(torch.tensor(math.sqrt(self.spec.hidden_size)).to(dtype))
        return self._embed_scale[dtype]

    def embed(self, input_ids: Tensor, table: nn.Module | None = None) -> Tensor:
        """Token embeddings (Gemma: times sqrt(hidden) rounded to the dtype); ``table``: another copy of
        ``embed_tokens`` (e.g. on another device) to look them up in."""
        x = (table or self.embed_tokens)(input_ids)
        return x * self.embed_scale(x.dtype) if self.spec.family == "gemma3" else x

    def context(self, positions: Tensor, key_positions: Tensor, dtype: torch.dtype) -> LayerContext:
        return layer_context(self.spec, positions, key_positions, self.inv_freq_global, self.inv_freq_local, dtype)

    def forward(self, input_ids: Tensor, positions: Tensor, cache: KVCache | None = None,
                slots: Tensor | None = None, return_attention_mass: bool = False, *,
                lengths: Tensor | None = None, last_only: bool = False,
                page_size: int = 16, exit_layer: Tensor | None = None, return_hidden: bool = False,
                tap_layers: Sequence[int] = ()) -> Tensor | tuple[Tensor, Tensor] | ModelOutput:
        """Logits [B, T, vocab] in fp32 ([B, 1, vocab] with ``last_only``).

        input_ids, positions: [B, T]. With ``cache``, K/V are written at ``positions`` of ``slots``
        [B] (None: slots 0..B-1) and each row attends over its cached prefix. ``lengths`` [B]: valid
        tokens per row for right-padded input (selects the row's last query for ``last_only`` and
        the attention mass). ``exit_layer`` [B, T] (integer): layers each token runs, the rest is
        state propagation (module docstring). Returns ``(logits, mass [B, num_pages])`` with
        ``return_attention_mass`` alone; a ``ModelOutput`` when ``return_hidden`` or ``tap_layers``
        (each tap in 0..num_layers) is given. No host synchronisation happens here.
        """
        spec = self.spec
        b, t = input_ids.shape
        if exit_layer is not None and tuple(exit_layer.shape) != (b, t):
            raise ValueError(f"exit_layer: shape {tuple(exit_layer.shape)} must be [B, T] = {(b, t)}")
        bad_taps = [k for k in tap_layers if not 0 <= k <= spec.num_layers]
        if bad_taps:
            raise ValueError(f"tap_layers: {bad_taps} outside 0..num_layers={spec.num_layers}")
        x = self.embed(input_ids)
        ctx = self.context(positions, cache.key_positions if cache is not None else positions, x.dtype)
        last = lengths - 1 if lengths is not None else torch.full((b,), t - 1, device=x.device)
        mass_index = last if return_attention_mass else None
        use_sdpa = self.attn_impl == "sdpa" or (self.attn_impl == "auto" and t > 1)
        total: Tensor | None = None
        states: dict[int, Tensor] = {0: x} if 0 in tap_layers else {}
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            cos, sin, mask = ctx.for_layer(layer)
            new, mass = layer(x, cos, sin, mask, positions, cache, slots, mass_index, use_sdpa)
            x = new if exit_layer is None else torch.where((exit_layer > i).unsqueeze(-1), new, x)
            if i + 1 in tap_layers:
                states[i + 1] = x
            if mass is not None:
                total = mass if total is None else total + mass
        x = self.norm(x)
        if last_only:
            x = x.gather(1, last.view(b, 1, 1).expand(b, 1, x.shape[-1]))
        logits = F.linear(x, self.output_weight).float()
        mass_out: Tensor | None = None
        if total is not None:
            mass_out = mass_per_page(total / spec.num_layers, page_size)
        if not return_hidden and not tap_layers:
            return logits if mass_out is None else (logits, mass_out)
        taps = []
        for k in tap_layers:
            h = x if k == spec.num_layers else self.norm(states[k])
            if last_only and k != spec.num_layers:
                h = h.gather(1, last.view(b, 1, 1).expand(b, 1, h.shape[-1]))
            taps.append(h)
        return ModelOutput(logits, mass_out, x, tuple(taps))


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", dtype: str | torch.dtype | None = None,
                init: bool = True, seed: int | None = None) -> Transformer:
    """Allocate a ``Transformer`` directly on ``device`` in ``dtype`` (default ``spec.dtype``).

    Built on the meta device first, so no fp32 copy or default init is ever materialised. With
    ``init`` the weights get ``init_weights()`` (seeded by ``seed``); otherwise they are
    uninitialised memory that the caller must fill (``load_checkpoint`` does).
    """
    tdt = to_torch_dtype(dtype if dtype is not None else spec.dtype)
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to(dtype=tdt).to_empty(device=device)
    model.init_rope(device)
    if init:
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator=gen)
    return model.eval()
