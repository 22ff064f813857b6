"""MoR token routing on the real runtime: deep decode tokens on the accelerator, shallow ones on the
host CPU (``shallow_device=cpu``) or exiting early on the accelerator (``shallow_device=gpu``).

Semantics are those of ``wicore.routing`` and of ``Transformer.forward(exit_layer=...)`` (the reference
the tests compare against): a token that exits after ``d`` layers keeps its hidden state frozen from
then on; the layers it skips get K/V projected from that frozen state (state propagation), so later
tokens attend to it; its prediction is the final norm + LM head of the frozen state.

Fast paths (what makes routing save time, all decided on the host from the plan, no sync):

* ``routed_decode`` (one batched forward on the model's device): layers below the smallest depth of
  the batch run for every row; layers between the smallest and largest depth run for every row with
  exited rows frozen (``torch.where``); layers at or above the largest depth only project K/V
  (``fill_kv``: input norm + q/k/v projection + RoPE + cache write; no attention, no output projection,
  no MLP). A batch whose every row is shallow therefore skips ``num_layers - cpu_depth`` layers' worth
  of attention and MLP. Attention mass is averaged over the layers that attended.
* ``CPUShallowPath``: a float32 copy of the embedding and the first ``cpu_depth`` layers on the CPU with
  its own KV cache for those layers. Per step: (1) mirror into the CPU cache the K/V of positions the
  accelerator wrote since the request last ran shallow (one device->host copy for the whole batch);
  (2) the CPU runs the shallow rows' ``cpu_depth`` layers in a worker thread (torch releases the GIL),
  while the main thread launches the deep rows' forward on the accelerator; (3) the shallow rows' new
  K/V of the first ``cpu_depth`` layers and their exit states are copied to the accelerator, which fills
  the other layers' K/V (``fill_kv``) and runs the final norm + LM head for them.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from wicore.model.kv_cache import KVCache
from wicore.model.transformer import DecoderLayer, LayerContext, Transformer, layer_context, mass_per_page


def fill_kv(layer: DecoderLayer, x: Tensor, ctx: LayerContext, positions: Tensor, cache: KVCache,
            slots: Tensor) -> None:
    """Write the K/V this layer would write for hidden states ``x`` (state propagation), nothing else."""
    cos, sin, _ = ctx.for_layer(layer)
    _, k, v = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
    cache.update(layer.index, k, v, slots, positions)


def routed_decode(model: Transformer, ids: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
                  depths: list[int], measure_mass: bool = False,
                  page_size: int = 16) -> tuple[Tensor, Tensor, Tensor | None]:
    """One decode forward where row ``i`` runs ``depths[i]`` layers (ids, positions [B, 1]).

    Returns (logits [B, V] fp32, final-normed hidden [B, H], attention mass per page [B, P] or None).
    Equal to ``model(..., exit_layer=depths)`` up to floating-point order; skips the attention and MLP of
    layers no row runs.
    """
    dmin, dmax = min(depths), max(depths)
    x = model.embed(ids)
    ctx = model.context(positions, cache.key_positions, x.dtype)
    depth_t = torch.tensor(depths, device=x.device).view(-1, 1, 1) if dmin < dmax else None
    mass_index = torch.zeros(len(depths), dtype=torch.long, device=x.device) if measure_mass else None
    total: Tensor | None = None
    for i, layer in enumerate(model.layers):
        assert isinstance(layer, DecoderLayer)
        if i >= dmax:
            fill_kv(layer, x, ctx, positions, cache, slots)
            continue
        cos, sin, mask = ctx.for_layer(layer)
        new, mass = layer(x, cos, sin, mask, positions, cache, slots, mass_index, False)
        x = new if depth_t is None or i < dmin else torch.where(depth_t > i, new, x)
        if mass is not None:
            total = mass if total is None else total + mass
    h = model.norm(x)[:, -1]
    logits = F.linear(h, model.output_weight).float()
    mass_out = mass_per_page(total / dmax, page_size) if total is not None else None
    return logits, h, mass_out


class CPUShallowPath:
    """The shallow path on the host CPU: float32 copies of the embedding and the first ``depth`` layers,
    a CPU KV cache for those layers mirrored lazily from the accelerator's cache (class docstring of the
    module). ``forget(request_id)`` when a request's slot is freed or restarted."""

    def __init__(self, model: Transformer, cache: KVCache, depth: int, threads: int | None = None) -> None:
        spec = model.spec
        self.model, self.gpu_cache, self.depth = model, cache, depth
        self.cpu = torch.device("cpu")
        self.dtype = torch.float32
        self.embedding = copy.deepcopy(model.embed_tokens).to(self.cpu, self.dtype)
        self.layers: list[DecoderLayer] = []
        for i in range(depth):
            layer = copy.deepcopy(model.layers[i]).to(self.cpu, self.dtype)
            assert isinstance(layer, DecoderLayer)
            self.layers.append(layer)
        self.inv_g = model.inv_freq_global.to(self.cpu)
        self.inv_l = model.inv_freq_local.to(self.cpu)
        self.cache = KVCache(spec, cache.max_slots, cache.max_len, self.cpu, self.dtype, layers=range(depth))
        self.synced: dict[int, int] = {}  # request id -> positions [0, n) mirrored into the CPU cache
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mor-cpu")
        if threads is not None:
            torch.set_num_threads(threads)

    def forget(self, request_id: int) -> None:
        self.synced.pop(request_id, None)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def mirror(self, rids: list[int], slots: list[int], positions: list[int]) -> int:
        """Copy the accelerator-written K/V of positions ``[min synced, max position)`` of these slots
        for the shallow layers into the CPU cache (one device->host copy); returns bytes copied."""
        lo = min(self.synced.get(r, 0) for r in rids)
        hi = max(positions)
        if hi <= lo:
            return 0
        g = self.gpu_cache
        idx = torch.tensor(slots, device=g.device)
        k = torch.stack([g.k[i].index_select(0, idx)[:, :, lo:hi] for i in range(self.depth)])
        v = torch.stack([g.v[i].index_select(0, idx)[:, :, lo:hi] for i in range(self.depth)])
        both = torch.stack([k, v]).to(self.cpu, self.dtype)  # [2, depth, S, Hkv, hi-lo, D]: the sync
        cidx = torch.tensor(slots)
        for i in range(self.depth):
            self.cache.k[i][cidx, :, lo:hi] = both[0, i]
            self.cache.v[i][cidx, :, lo:hi] = both[1, i]
        return both.numel() * g.k[0].element_size()

    def _run(self, ids: list[int], positions: list[int], slots: list[int]) -> Tensor:
        with torch.inference_mode():
            spec = self.model.spec
            pos = torch.tensor(positions).view(-1, 1)
            slot_t = torch.tensor(slots)
            x = self.model.embed(torch.tensor(ids).view(-1, 1), self.embedding).to(self.dtype)
            ctx = layer_context(spec, pos, self.cache.key_positions, self.inv_g, self.inv_l,
                               self.dtype)
            for layer in self.layers:
                cos, sin, mask = ctx.for_layer(layer)
                x, _ = layer(x, cos, sin, mask, pos, self.cache, slot_t, None, False)
            return x

    def start(self, rids: list[int], ids: list[int], positions: list[int], slots: list[int]) -> Future[Tensor]:
        """Mirror, then run the shallow layers in the worker thread; returns the exit states [S, 1, H]."""
        self.mirror(rids, slots, positions)
        for r, p in zip(rids, positions):
            self.synced[r] = p + 1
        return self.pool.submit(self._run, ids, positions, slots)

    def finish(self, exit_state: Tensor, positions: list[int], slots: list[int]) -> tuple[Tensor, Tensor]:
        """Push the shallow rows' K/V of the first ``depth`` layers to the accelerator cache, fill the
        other layers from the exit states and return (logits [S, V] fp32, hidden [S, H])."""
        model, g = self.model, self.gpu_cache
        dev, dtype = g.device, model.embed_tokens.weight.dtype
        cslots, cpos = torch.tensor(slots), torch.tensor(positions)
        k = torch.stack([self.cache.k[i][cslots, :, cpos] for i in range(self.depth)])  # [depth, S, Hkv, D]
        v = torch.stack([self.cache.v[i][cslots, :, cpos] for i in range(self.depth)])
        kv = torch.stack([k, v]).to(dev, g.dtype, non_blocking=True)
        gslots = cslots.to(dev, non_blocking=True)
        gpos = cpos.to(dev, non_blocking=True)
        for i in range(self.depth):
            g.k[i][gslots, :, gpos] = kv[0, i]
            g.v[i][gslots, :, gpos] = kv[1, i]
        x = exit_state.to(dev, dtype, non_blocking=True)
        pos2 = gpos.view(-1, 1)
        ctx = model.context(pos2, g.key_positions, dtype)
        for layer in list(model.layers)[self.depth:]:
            assert isinstance(layer, DecoderLayer)
            fill_kv(layer, x, ctx, pos2, g, gslots)
        h = model.norm(x)[:, -1]
        return F.linear(h, model.output_weight).float(), h


class MoRRuntime:
    """Executes the routed decode rows of a step for ``TorchBackend`` (see the module docstring).

    ``cpu_depth`` / ``gpu_depth`` / ``shallow_device`` are the validated ``routing`` fields; ``router``
    the checkpoint's learned router (its row for ``cpu_depth`` gives the ``router`` signal), or None.
    """

    def __init__(self, model: Transformer, cache: KVCache, cpu_depth: int, gpu_depth: int, shallow_device: str,
                 router: tuple[Tensor, Tensor] | None = None) -> None:
        self.model, self.cache = model, cache
        self.cpu_depth, self.gpu_depth = cpu_depth, gpu_depth
        self.router = router
        self.cpu_path = CPUShallowPath(model, cache, cpu_depth) if shallow_device == "cpu" else None
        self.tokens_deep = self.tokens_shallow = 0

    def forget(self, request_id: int) -> None:
        if self.cpu_path is not None:
            self.cpu_path.forget(request_id)

    def close(self) -> None:
        if self.cpu_path is not None:
            self.cpu_path.close()

    def _accelerator(self, ids: Tensor, pos: Tensor, slots: Tensor, depths: list[int], measure_mass: bool,
                     page_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        num_layers = self.model.spec.num_layers
        if min(depths) >= num_layers:  # every row at full depth: the plain forward
            out = self.model(ids, pos, self.cache, slots, measure_mass, last_only=True, page_size=page_size,
                             return_hidden=True)
            return out.logits[:, -1], out.hidden[:, -1], out.mass
        return routed_decode(self.model, ids, pos, self.cache, slots, depths, measure_mass, page_size)

    def decode(self, rids: list[int], ids: list[int], positions: list[int], slots: list[int], depths: list[int],
               measure_mass: bool, page_size: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Logits [B, V], final-normed hidden [B, H] and attention mass [B, P] (NaN rows for tokens
        computed on the CPU; None when not measured) of decode rows that run ``depths[i]`` layers."""
        dev = self.cache.device
        self.tokens_deep += sum(d > self.cpu_depth for d in depths)
        self.tokens_shallow += sum(d <= self.cpu_depth for d in depths)

        def tensors(rows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
            return (torch.tensor([[ids[i]] for i in rows], device=dev),
                    torch.tensor([[positions[i]] for i in rows], device=dev),
                    torch.tensor([slots[i] for i in rows], device=dev))

        every = list(range(len(depths)))
        if self.cpu_path is None:
            return self._accelerator(*tensors(every), depths, measure_mass, page_size)
        shallow = [i for i in every if depths[i] <= self.cpu_depth]
        deep = [i for i in every if depths[i] > self.cpu_depth]
        if not shallow:
            return self._accelerator(*tensors(every), depths, measure_mass, page_size)
        cp = self.cpu_path
        job = cp.start([rids[i] for i in shallow], [ids[i] for i in shallow], [positions[i] for i in shallow],
                       [slots[i] for i in shallow])
        deep_out = self._accelerator(*tensors(deep), [depths[i] for i in deep], measure_mass, page_size) \
            if deep else None
        s_logits, s_hidden = cp.finish(job.result(), [positions[i] for i in shallow], [slots[i] for i in shallow])
        if deep_out is None:
            mass = None
            if measure_mass:
                mass = torch.full((len(shallow), 1), float("nan"), device=dev)
            return s_logits, s_hidden, mass
        d_logits, d_hidden, d_mass = deep_out
        order = torch.tensor(deep + shallow, device=dev).argsort()
        logits = torch.cat([d_logits, s_logits]).index_select(0, order)
        hidden = torch.cat([d_hidden, s_hidden.to(d_hidden.dtype)]).index_select(0, order)
        mass = None
        if d_mass is not None:
            nan = torch.full((len(shallow), d_mass.shape[1]), float("nan"), device=dev, dtype=d_mass.dtype)
            mass = torch.cat([d_mass, nan]).index_select(0, order)
        return logits, hidden, mass
