"""TorchBackend: executes the engine's StepPlans with the real model.

The same plans the SimBackend times are run for real: every prefill item is
one forward over its chunk (written into the request's KV slot), all decode
items of a step are one batched forward over rows at different positions
(continuous batching), and every item that emits a token samples it (greedy,
temperature, top-k, top-p, per request, seeded). The step's tokens reach the
host once per step (``.tolist()``), which is the only host sync.

Requests without ``prompt_ids`` (synthetic workloads give lengths only) get
deterministic pseudo-random token ids, seeded by request id, so the same
workload runs on both backends. Attention mass per KV page of every decoding
request is measured and returned in ``StepResult.attention_mass`` (the A2CR
feedback field) when ``measure_attention`` is on.

Memory ops: this class runs with every weight resident on the device and
rejects plans that stream weights; with offloading, ``experiments.run_torch``
uses ``wicore.runtime.offload.StreamingTorchBackend``, which streams the layers
the placement names from pinned host memory.

KV swapping (``scheduler.preemption=swap``): before a step's forwards the plan's
``swap_out`` ops move the named requests' KV slots to host memory (their slots
go back to the free list) and its ``swap_in`` ops bring them back into free
slots (``wicore.runtime.kv_swap.KVSwapper``, on its own copy stream on CUDA);
``plan.kv_dropped`` (recompute preemption) frees a request's slot at once. The
step's result counts the swap bytes and copy time. A request holds a slot only
while its KV is on the device.

``cuda_graphs=True``: the batched decode forward runs through
``wicore.runtime.graph_decode.GraphDecode`` (CUDA graphs per batch-size bucket on a
GPU, the same padded path eagerly elsewhere); the cache's last slot is its scratch
slot and is never given to a request. Not used with MoR routing; with streamed layers only when the
streamer runs its graph-safe schedule (``wicore.runtime.offload``, host memory only: NVMe stays eager).

``prefill_graphs=True``: each prefill chunk runs through
``wicore.runtime.graph_prefill.GraphPrefill`` (right-padded to a length bucket, one CUDA
graph per bucket); a chunk whose padded end would pass the slot's ``max_len`` runs
eagerly. The same conditions as for decode graphs.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.sampling import sample_host_params
from wicore.model.transformer import ModelOutput, Transformer
from wicore.runtime.graph_capture import capturable
from wicore.runtime.graph_decode import GraphDecode
from wicore.runtime.graph_prefill import GraphPrefill
from wicore.runtime.kv_swap import KVSwapper, SwapStep, swap_names
from wicore.runtime.mor import MoRRuntime
from wicore.runtime.signals import measure, to_dicts
from wicore.types import OpTiming, Phase, Request, StepPlan, StepResult, add_page_mass, kv_pages


class TorchBackend:
    def __init__(self, model: Transformer, cache: KVCache, clock_start: float, seed: int = 0,
                 measure_attention: bool = False, page_tokens: int = 16, mor: MoRRuntime | None = None,
                 cuda_graphs: bool = False, prefill_graphs: bool = False) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.device
        self.t0 = clock_start  # perf_counter() at the start of the run: result times are relative to it
        self.measure_attention = measure_attention
        self.page_tokens = page_tokens
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.seed = seed
        self.slots: dict[int, int] = {}
        # cuda_graphs: the cache's last slot is the scratch slot of GraphDecode's padding rows (the caller
        # allocated one slot more); it is never handed out. Graphs are not used with MoR routing, nor with
        # streamed layers on the streamer's cycle schedule.
        self.cuda_graphs = cuda_graphs
        real = cache.max_slots - 1 if cuda_graphs else cache.max_slots
        self.free_slots = list(range(real - 1, -1, -1))
        self.graph: GraphDecode | None = None
        self.prefill_graph: GraphPrefill | None = None
        graphable = mor is None and capturable(model)  # streamed layers: graphs need the graph-safe schedule
        wants = (cuda_graphs or prefill_graphs) and graphable and self.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if wants else None  # one pool for the decode and prefill graphs
        if cuda_graphs and graphable:
            self.graph = GraphDecode(model, cache, None, measure_attention, page_tokens, scratch_slot=real, pool=pool)
        if prefill_graphs and graphable:
            self.prefill_graph = GraphPrefill(model, cache, pool=pool)
        self.requests: dict[int, Request] = {}
        self.tokens: dict[int, list[int]] = {}  # prompt (+ generated) ids per request
        self.mor = mor  # MoR routing: routed decode rows + routing signals of every emitted token
        self.kv_len: dict[int, int] = {}  # request id -> tokens written to its KV (kept while swapped out)
        self._swapper: KVSwapper | None = None  # created on the first swap

    @property
    def swapper(self) -> KVSwapper:
        if self._swapper is None:
            self._swapper = KVSwapper(self.cache)
        return self._swapper

    def reset_stats(self) -> None:
        """Start the run's counters here (after a warm-up). This backend keeps none across steps besides the
        KV swapper's, which a warm-up never uses; subclasses with counters reset theirs."""

    # ----- requests --------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.prompt_ids is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + req.request_id)
            ids = torch.randint(0, self.model.spec.vocab_size, (req.prompt_tokens,), generator=g).tolist()
        else:
            ids = list(req.prompt_ids)
        self.requests[req.request_id] = req
        self.tokens[req.request_id] = ids

    def release(self, request_id: int) -> None:
        """The request finished or was cancelled: free its KV slot (or its swapped-out host copy)."""
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.free_slots.append(slot)
        self.requests.pop(request_id, None)
        self.tokens.pop(request_id, None)
        self.kv_len.pop(request_id, None)
        if self._swapper is not None:
            self._swapper.drop(request_id)
        if self.mor is not None:
            self.mor.forget(request_id)

    def _slot(self, request_id: int) -> int:
        slot = self.slots.get(request_id)
        if slot is None:
            slot = self.slots[request_id] = self._free_slot(request_id)
            if self._swapper is not None:
                self._swapper.slot_ready(slot)  # a slot a swap-out just freed: its copy reads it first
        return slot

    def _free_slot(self, request_id: int) -> int:
        if not self.free_slots:
            raise RuntimeError(f"torch backend: no free KV slot for request {request_id} (every one of the "
                               f"{len(self.slots)} slots holds a request; scheduler.max_num_seqs > slots?)")
        return self.free_slots.pop()

    def _drop_kv(self, request_id: int) -> None:
        """Recompute preemption: the request's KV is gone (slot zeroed and freed, host copy dropped)."""
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.cache.free(slot)
            self.free_slots.append(slot)
        if self._swapper is not None:
            self._swapper.drop(request_id)
        self.kv_len.pop(request_id, None)
        if self.mor is not None:
            self.mor.forget(request_id)

    def _move_kv(self, plan: StepPlan) -> SwapStep | None:
        """The plan's KV moves, before its forwards: dropped requests, then swap-outs, then swap-ins."""
        for rid in plan.kv_dropped:
            self._drop_kv(rid)
        outs, ins = swap_names(plan.memory_ops)
        if not outs and not ins:
            return None
        sw = self.swapper
        gpu = next(op.device for op in plan.memory_ops if op.op in ("swap_out", "swap_in"))
        step = sw.begin(time.perf_counter() - self.t0, gpu)
        for rid in outs:
            slot = self.slots.pop(rid, None)
            if slot is None:
                raise RuntimeError(f"torch backend: swap_out of request {rid}, which holds no KV slot")
            sw.swap_out(step, rid, slot, self.kv_len[rid])
            self.free_slots.append(slot)
            if self.mor is not None:  # its CPU mirror is per slot: resync from position 0 when it runs again
                self.mor.forget(rid)
        sw.mark_swapped_out(step)
        for rid in ins:
            if rid in self.slots:
                raise RuntimeError(f"torch backend: swap_in of request {rid}, which holds KV slot {self.slots[rid]}")
            slot = self.slots[rid] = self._free_slot(rid)
            tokens = sw.swap_in(step, rid, slot)
            if tokens != self.kv_len.get(rid):
                raise RuntimeError(f"torch backend: request {rid} swapped in {tokens} tokens, "
                                   f"had written {self.kv_len.get(rid)}")
        sw.finish(step)
        return step

    def _sample(self, rids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Next tokens [B] of rows ``rids`` from their logits [B, V], with each request's sampling parameters
        (all greedy: the argmax alone, ``sample_host_params``)."""
        params = [self.requests[r].sampling or {} for r in rids]
        return sample_host_params(logits, torch.tensor([float(p.get("temperature", 0.0)) for p in params]),
                                  torch.tensor([float(p.get("top_k", 0)) for p in params]),
                                  torch.tensor([float(p.get("top_p", 1.0)) for p in params]), self.generator)

    # ----- one step ----------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        if any(op.op in ("fetch", "prefetch") for op in plan.memory_ops):
            raise ConfigError("backend=torch: weight streaming between tiers is not implemented on the "
                              "real runtime yet; give it a GPU budget that holds the model")
        start = time.perf_counter() - self.t0
        swap = self._move_kv(plan) if plan.kv_dropped or plan.memory_ops else None
        compute_start = time.perf_counter() - self.t0 if swap is not None else start
        dev = self.device
        last_logits: list[torch.Tensor] = []
        emit_ids: list[int] = []
        mass_t: torch.Tensor | None = None  # attention mass per page of the decode rows (``dec``, in order)
        mor = self.mor
        hiddens: list[torch.Tensor] = []  # with routing: final-normed hidden of every emitting row
        masses: list[torch.Tensor | None] = []  # with routing: attention mass rows (None: not measured)
        routes = {d.request_id: d.depth for d in plan.routing}
        for it in plan.items:
            if it.phase is not Phase.PREFILL:
                continue
            if it.context_len == 0 and it.request_id in self.slots:  # recompute preemption: start over
                self.cache.free(self.slots[it.request_id])
                if mor is not None:
                    mor.forget(it.request_id)
            slot = self._slot(it.request_id)
            self.kv_len[it.request_id] = it.context_len + it.num_tokens
            ids = self.tokens[it.request_id][it.context_len: it.context_len + it.num_tokens]
            gp = self.prefill_graph
            if gp is not None and gp.fits(it.num_tokens, it.context_len):
                if it.emits_token:  # the graph's output is static: the next chunk of this bucket overwrites it
                    last_logits.append(gp.run(ids, it.context_len, slot).clone())
                    emit_ids.append(it.request_id)
                else:
                    gp.run(ids, it.context_len, slot)
                continue
            x = torch.tensor([ids], device=dev)
            pos = torch.arange(it.context_len, it.context_len + it.num_tokens, device=dev)[None, :]
            out = self.model(x, pos, self.cache, torch.tensor([slot], device=dev), last_only=True,
                             return_hidden=mor is not None)
            if it.emits_token:
                if isinstance(out, ModelOutput):
                    last_logits.append(out.logits[:, -1])
                    hiddens.append(out.hidden[:, -1])
                    masses.append(None)
                else:
                    assert isinstance(out, torch.Tensor)
                    last_logits.append(out[:, -1])
                emit_ids.append(it.request_id)
        dec = [it for it in plan.items if it.phase is Phase.DECODE]
        for it in dec:
            self.kv_len[it.request_id] = it.context_len + 1
        if dec and mor is not None and routes:
            rids = [it.request_id for it in dec]
            logits, hidden, mass = mor.decode(
                rids, [self.tokens[r][it.context_len] for r, it in zip(rids, dec)], [it.context_len for it in dec],
                [self._slot(r) for r in rids], [routes.get(r, mor.gpu_depth) for r in rids],
                self.measure_attention, self.page_tokens)
            last_logits.append(logits)
            hiddens.append(hidden)
            masses.append(mass)
            if mass is not None:
                mass_t = mass
            emit_ids += rids
        elif dec and self.graph is not None and self.graph.measure_attention == self.measure_attention:
            rids = [it.request_id for it in dec]
            g_logits, g_mass = self.graph.run([self.tokens[r][it.context_len] for r, it in zip(rids, dec)],
                                              [it.context_len for it in dec], [self._slot(r) for r in rids])
            last_logits.append(g_logits[:len(dec)])  # padding rows dropped
            if g_mass is not None:
                mass_t = g_mass
            emit_ids += rids
        elif dec:
            x = torch.tensor([[self.tokens[it.request_id][it.context_len]] for it in dec], device=dev)
            pos = torch.tensor([[it.context_len] for it in dec], device=dev)
            slots = torch.tensor([self._slot(it.request_id) for it in dec], device=dev)
            out = self.model(x, pos, self.cache, slots, return_attention_mass=self.measure_attention,
                             last_only=True, page_size=self.page_tokens, return_hidden=mor is not None)
            if isinstance(out, ModelOutput):
                logits = out.logits
                hiddens.append(out.hidden[:, -1])
                masses.append(out.mass)
                if out.mass is not None:
                    mass_t = out.mass
            elif isinstance(out, tuple):
                logits, mass_t = out
            else:
                logits = out
            last_logits.append(logits[:, -1])
            emit_ids += [it.request_id for it in dec]
        result = StepResult(plan.step_id, start, start)
        if emit_ids:
            all_logits = torch.cat(last_logits)
            new_t = self._sample(emit_ids, all_logits)
            if mor is None:
                new = new_t.tolist()  # the one sync
            else:  # tokens and routing signals in one sync
                peak = self._mass_matrix(masses, len(emit_ids)) if self.measure_attention else None
                sig = measure(all_logits, torch.cat(hiddens), mor.router, peak)
                rows = torch.cat([new_t.double()[:, None], sig.double()], 1).tolist()
                new = [int(r[0]) for r in rows]
                for rid, signals in zip(emit_ids, to_dicts([r[1:] for r in rows])):
                    result.signals[rid] = signals
            for rid, tok in zip(emit_ids, new):
                self.tokens[rid].append(tok)
                result.tokens[rid] = [tok]
        if mass_t is not None:  # one device-to-host read for every row (graph buffers: padding rows cut off)
            page = self.page_tokens
            add_page_mass(result.attention_mass, [it.request_id for it in dec], mass_t[:len(dec)].tolist(),
                          [kv_pages(it.context_len + 1, page) for it in dec])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        end = time.perf_counter() - self.t0
        result.end = end
        if swap is not None:
            self.swapper.report(swap, result)
            if swap.bytes_in:  # the forwards waited for the swapped-in KV
                compute_start = min(max(compute_start, swap.issued + swap.out_s + swap.in_s), end)
            result.stall_s = compute_start - start
        result.compute_s = end - compute_start
        result.ops.append(OpTiming("compute", str(dev), compute_start, end))
        return result

    @staticmethod
    def _mass_matrix(masses: list[torch.Tensor | None], rows: int) -> torch.Tensor | None:
        """The rows' attention mass per page, NaN-padded to one width (prefill rows: NaN)."""
        width = max((m.shape[1] for m in masses if m is not None), default=0)
        if not width:
            return None
        parts = []
        for m in masses:
            if m is None:
                continue
            parts.append(torch.nn.functional.pad(m.float(), (0, width - m.shape[1]), value=float("nan")))
        known = sum(p.shape[0] for p in parts)
        dev = parts[0].device
        out = torch.full((rows, width), float("nan"), device=dev)
        out[rows - known:] = torch.cat(parts)  # decode rows come last (after the prefill rows)
        return out

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"device": str(self.device), "kv_slots": self.cache.max_slots - int(self.cuda_graphs),
                                "kv_len": self.cache.max_len, "kv_cache_bytes": self.cache.nbytes}
        info.update(self.graph.describe() if self.graph is not None else {"cuda_graphs": "off"})
        info.update(self.prefill_graph.describe() if self.prefill_graph is not None else {"prefill_graphs": "off"})
        if self._swapper is not None:
            info.update(self._swapper.stats())
        return info
