"""One pipeline stage: a contiguous slice of the decoder, its KV cache and its weights.

``StageModel`` is a ``Transformer`` that keeps only what its stage runs: decoder layers ``lo..hi-1``
(the others are parameterless placeholders, so layer indices stay global and the parameter names stay
those of the full model: ``layers.40.mlp.up_proj.weight``), the embedding on the first stage, and the
final norm + LM head on the last one (with tied embeddings the last stage holds its own copy of the
embedding matrix as the head). Its ``forward`` runs the stage: token ids (first stage) or the hidden
states of the stage before it in, hidden states (or, on the last stage, last-position logits) out,
with the same ops in the same order as ``Transformer.forward``, so a chain of stages computes what
the whole model computes, bit for bit on the same device type.

``StageKVCache`` is a ``KVCache`` whose buffers exist only for the stage's layers.

``build_stage`` allocates a stage from one of three weight sources, materialising only its tensors:

* ``checkpoint``: only the stage's tensors are read from the safetensors files;
* ``fill`` (``"module:function"``, called as ``function(spec, device, seed)`` -> ``Fill``): values by
  parameter name (e.g. ``benchmarks.gpu_offload.make_fill``);
* neither: ``build_model``'s seeded init, replayed over the full model's modules in order with the
  same generator, drawing and dropping the tensors of other stages, so the values equal
  ``build_model(spec, home, seed=seed)``'s (``home``: the CPU when the stage streams layers, else the
  device, as ``experiments.run_torch`` does for one GPU; equal values need the same generator device).

Layers the placement streams are handed to ``wicore.runtime.offload`` (pinned host blocks, copied in
on a side stream during the forward), exactly as on one GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.layers import Embedding, Linear, RMSNorm
from wicore.model.spec import ModelSpec
from wicore.model.transformer import DecoderLayer, Transformer, mass_per_page, to_torch_dtype
from wicore.runtime.offload import Fill, LayerStreamer, offload_model

INIT_STD = 0.02  # build_model's init_weights() default


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Decoder layers of ``stage`` of ``pp``: the split ``StaticPlacement`` plans with."""
    return range(stage * num_layers // pp, (stage + 1) * num_layers // pp)


class _Elsewhere(nn.Module):
    """Stands in for a decoder layer that another stage holds (no parameters, never called)."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("pipeline stage: this decoder layer is held by another stage")


class StageModel(Transformer):
    """Decoder layers ``layers`` of ``spec`` (+ embedding if ``first``, + norm and head if ``last``).

    Build with ``StageModel.meta(...)`` (every tensor on the meta device) and materialise it with
    ``build_stage`` (or ``to_empty`` + your own values).
    """

    def __init__(self, spec: ModelSpec, layers: range, first: bool, last: bool) -> None:
        if not layers or layers.start < 0 or layers.stop > spec.num_layers:
            raise ConfigError(f"pipeline stage: layers {layers.start}..{layers.stop - 1} are not a non-empty "
                              f"slice of the model's {spec.num_layers}")
        super().__init__(spec)
        self.stage_layers, self.first, self.last = layers, first, last
        for i in range(spec.num_layers):
            if i not in layers:
                self.layers[i] = _Elsewhere()
        if not (first or (last and spec.tie_embeddings)):
            del self.embed_tokens
        if not last:
            del self.norm
            self.lm_head = None

    @classmethod
    def meta(cls, spec: ModelSpec, layers: range, first: bool, last: bool,
             dtype: torch.dtype | None = None) -> StageModel:
        with torch.device("meta"):
            model = cls(spec, layers, first, last)
        return model.to(dtype=dtype or to_torch_dtype(spec.dtype))

    def forward(self, x: Tensor, positions: Tensor, cache: KVCache | None = None,  # type: ignore[override]
                slots: Tensor | None = None, mass: Tensor | None = None, *, attention_mass: bool = False,
                page_size: int = 16) -> tuple[Tensor, Tensor | None]:
        """Run the stage on ``x``: token ids [B, T] (first stage) or hidden states [B, T, H].

        ``attention_mass``: accumulate the per-layer attention mass of each row's last query onto
        ``mass`` [B, S] (fp32, the sum over the layers before this stage; None on the first stage).
        Returns ``(hidden [B, T, H], mass sum or None)``, or on the last stage ``(logits [B, 1, V]
        fp32 of the last position, mass [B, num_pages] or None)`` as ``Transformer.forward`` with
        ``last_only=True`` returns them. No host synchronisation.
        """
        spec = self.spec
        b, t = x.shape[0], x.shape[1]
        if self.first:
            x = self.embed(x)
        ctx = self.context(positions, cache.key_positions if cache is not None else positions, x.dtype)
        last = torch.full((b,), t - 1, device=x.device)
        mass_index = last if attention_mass else None
        use_sdpa = self.attn_impl == "sdpa" or (self.attn_impl == "auto" and t > 1)
        total = mass if attention_mass else None
        for i in self.stage_layers:
            layer = self.layers[i]
            assert isinstance(layer, DecoderLayer)
            cos, sin, mask = ctx.for_layer(layer)
            x, m = layer(x, cos, sin, mask, positions, cache, slots, mass_index, use_sdpa)
            if m is not None:
                total = m if total is None else total + m
        if not self.last:
            return x, total
        x = self.norm(x)
        x = x.gather(1, last.view(b, 1, 1).expand(b, 1, x.shape[-1]))
        logits = F.linear(x, self.output_weight).float()
        if total is None:
            return logits, None
        return logits, mass_per_page(total / spec.num_layers, page_size)


class StageKVCache(KVCache):
    """A ``KVCache`` with buffers for ``layers`` only (the others are empty [max_slots, 0])."""

    def __init__(self, spec: ModelSpec, layers: range, max_slots: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(spec, max_slots, max_len, device, dtype, layers=layers)


@dataclass
class Stage:
    """A built stage on its device: model, KV cache and (when it streams layers) its streamer."""

    rank: int
    device: torch.device
    model: StageModel
    cache: StageKVCache
    streamer: LayerStreamer | None

    @property
    def layers(self) -> range:
        return self.model.stage_layers

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "device": str(self.device),
                               "layers": f"{self.layers.start}-{self.layers.stop - 1}",
                               "kv_cache_bytes": self.cache.nbytes}
        if self.streamer is not None:
            out["stream"] = self.streamer.stats(sync=False)
        return out


def resolve_fill(path: str, spec: ModelSpec, device: torch.device, seed: int) -> Fill:
    """``"module:function"`` -> ``function(spec, device, seed)`` (a ``Fill``)."""
    mod_name, _, fn_name = path.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"pipeline fill: cannot import '{path}' ({e}); give 'package.module:function'") from None
    fill = factory(spec, device, seed)
    if not callable(fill):
        raise ConfigError(f"pipeline fill: '{path}' returned {type(fill).__name__}, not a fill function")
    return fill  # type: ignore[no-any-return]


@torch.no_grad()
def init_like_build_model(model: StageModel, device: torch.device, seed: int) -> None:
    """The values ``build_model(spec, device, seed=seed)`` gives the stage's tensors: the same seeded
    generator draws every Linear/Embedding of the full model in module order; other stages' are
    drawn and dropped. Norms are reset to their identity."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        full = Transformer(model.spec)
    own = dict(model.named_modules())
    dtype = next(model.parameters()).dtype  # build_model draws in the model dtype
    for name, mod in full.named_modules():
        mine = own.get(name)
        if isinstance(mod, Linear | Embedding):
            if isinstance(mine, Linear | Embedding):
                mine.weight.normal_(0.0, INIT_STD, generator=gen)
            else:
                torch.empty(mod.weight.shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=gen)
        elif isinstance(mod, RMSNorm) and isinstance(mine, RMSNorm):
            mine.reset_parameters()


@torch.no_grad()
def load_stage_tensors(model: StageModel, checkpoint: str) -> None:
    """Copy the stage's tensors (only those) from a Hugging Face-layout checkpoint."""
    from safetensors import safe_open

    from wicore.model.checkpoint import param_name, scan_checkpoint

    spec, entries = scan_checkpoint(checkpoint, model.spec.dtype)
    if (spec.num_layers, spec.hidden_size, spec.vocab_size) != (model.spec.num_layers, model.spec.hidden_size,
                                                                 model.spec.vocab_size):
        raise ConfigError(f"checkpoint {checkpoint}: its config does not match the pipeline's model spec")
    params = dict(model.named_parameters())
    by_file: dict[Any, list[tuple[str, Any]]] = {}
    for hf_name, entry in entries.items():
        name = param_name(hf_name)
        if name in params:
            by_file.setdefault(entry.file, []).append((name, entry))
    loaded = set()
    for file, items in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name, entry in items:
                params[name].copy_(f.get_tensor(entry.name))
                loaded.add(name)
    if missing := sorted(set(params) - loaded):
        raise ConfigError(f"checkpoint {checkpoint}: no tensors for {missing[:4]} ({len(missing)} missing)")


def build_stage(spec: ModelSpec, rank: int, pp: int, device: torch.device | str, slots: int, max_len: int, *,
                streamed: Sequence[int] = (), seed: int = 0, checkpoint: str | None = None,
                fill: str | Callable[..., Any] | None = None, host_format: str = "auto", buffers: int = 2,
                pin: str = "auto", schedule: str = "cycle") -> Stage:
    """Allocate stage ``rank`` of ``pp`` on ``device`` (weights: see the module docstring), its KV
    cache of ``slots`` x ``max_len`` tokens, and stream the decoder layers ``streamed`` (global
    indices, all inside the stage) from host memory (``schedule``: the streamer's, ``forward`` for a
    stage that CUDA graphs capture)."""
    dev = torch.device(device)
    layers = stage_layers(spec.num_layers, pp, rank)
    outside = sorted(set(streamed) - set(layers))
    if outside:
        raise ConfigError(f"pipeline stage {rank}: streamed layers {outside} are not in its layers "
                          f"{layers.start}..{layers.stop - 1}")
    model = StageModel.meta(spec, layers, first=rank == 0, last=rank == pp - 1)
    streamer: LayerStreamer | None = None
    lookahead = buffers - 1
    if fill is not None:
        fn = resolve_fill(fill, spec, dev, seed) if isinstance(fill, str) else fill(spec, dev, seed)
        streamer = offload_model(model, streamed, dev, host_format, buffers, lookahead, fill=fn, pin=pin,
                                 schedule=schedule)
    else:
        home = torch.device("cpu") if streamed else dev  # streamed layers are packed from the host
        model.to_empty(device=home)
        model.init_rope(home)
        if checkpoint is not None:
            load_stage_tensors(model, checkpoint)
        else:
            init_like_build_model(model, home, seed)
        if streamed:
            streamer = offload_model(model, streamed, dev, host_format, buffers, lookahead, pin=pin, schedule=schedule)
    if streamer is not None and not streamer.order:
        streamer.close()
        streamer = None
    model.eval()
    cache = StageKVCache(spec, layers, slots, max_len, dev, to_torch_dtype(spec.dtype))
    return Stage(rank, dev, model, cache, streamer)
