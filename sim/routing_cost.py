"""The cost of a step whose decode tokens a MoR router split into deep and shallow ones.

Notation: ``L`` layers, ``c = cpu_depth``, ``g = gpu_depth`` (``c <= g <= L``),
``S`` shallow decode tokens, ``D`` deep decode tokens, ``P`` prefill items
(always deep, all ``L`` layers). Prefill and deep tokens run the layers they
need on the GPU with ``CostModel.layer`` (the same roofline as an unrouted
step); a layer no token runs costs nothing and reads no weights.

``shallow_device = cpu``::

    gpu_layers = sum_l layer(P + D if l < g else P)                  (GPU, with weight streaming)
    cpu        = sum_{l < c} roof_cpu(2 S params_l, layer_bytes + S act)
                 + roof_cpu(4 heads head_dim pairs_l, kv (pairs_l + S))    (host CPU, concurrently)
    transfer   = pcie_latency + max(h2d, d2h) / pcie_bandwidth       (per GPU link, per direction)
        h2d = S (hidden * 2 + c * kv_tok_layer / tp)   exit hidden states + shallow tokens' K/V
        d2h = (D + prefill tokens) * c * kv_tok_layer / tp          deep tokens' K/V of layers < c
    fill       = sum_{l >= c} roof(2 n_l hidden 2 kv_dim / tp, K/V weights / tp + n_l (hidden 2 + kv))
                 + fill_kernels * launch,   n_l = S (l >= c) + D (l >= g)   (KV of skipped layers)
    head       = LM head of every emitting row + pipeline hand-overs
    step       = max(gpu_layers, cpu + transfer) + fill + head

``roof_cpu`` is the roofline of ``hardware.cpu`` (``peak_gflops * compute_efficiency``,
``dram_bandwidth_gbps * bandwidth_efficiency``); the CPU reads each layer's
weights once per step in the model's dtype and the K/V of every shallow
token's context for that layer (fp16), and runs the whole layer (no tensor
parallelism). The deep tokens' K/V copies only show up in steps that also have
shallow tokens: in an all-deep step they run on the otherwise idle GPU->host
direction alongside the GPU layers (not charged). The routing transfers are
costed analytically, not as flows: they do not contend with weight streaming.

``shallow_device = gpu``: no CPU part and no transfers; layer ``l`` runs
``P + D + S`` tokens for ``l < c``, ``P + D`` for ``c <= l < g``, ``P`` after, so a
layer's weights are read once if any token runs it; then the same fill and head::

    step = gpu_layers + fill + head

A step with no shallow token and ``g == L`` is an unrouted step:
``RoutingCost.step`` returns None and the backend costs it as before
(bit-identical). Pipeline parallelism: the hand-over carries the first layer's
tokens; the K/V copies are split over the ``tp`` GPUs of a stage only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sim.cost_model import ACT_BYTES, CostModel, StepCost
from wicore.errors import ConfigError
from wicore.types import BatchItem, Phase, StepPlan

if TYPE_CHECKING:
    from sim.backend import SimBackend
    from sim.hardware import TransferRecord
    from wicore.types import MemoryOp

PREFILL = Phase.PREFILL
FILL_KERNELS = 2  # kernels per filled layer: K/V projection GEMM + norm/rope/cache write


@dataclass(slots=True)
class RoutedStep:
    """A routed step's cost. ``gpu`` holds the GPU totals (``compute_s`` = layers + fill + head,
    ``comm_s`` = all-reduces + hand-overs, flops, device bytes; its per-layer fields are 0)."""

    gpu: StepCost
    layer_s: list[float]  # per layer: GPU compute + all-reduces (0: the layer does not run)
    suffix_s: np.ndarray  # suffix_s[l] = sum(layer_s[l:]), length L + 1
    layers_s: float  # sum(layer_s)
    fill_s: float  # KV fill of the skipped layers (GPU)
    tail_s: float  # LM head + pipeline hand-overs (GPU)
    cpu_s: float  # shallow layers on the host CPU
    xfer_s: float  # PCIe transfers after the CPU part
    cpu_flops: float
    cpu_bytes: float
    link_bytes: int  # bytes of the routing transfers over every GPU link
    deep_tokens: int
    shallow_tokens: int

    def end(self, start: float, layers_end: float) -> float:
        """End of the step whose GPU layers (streaming stalls included) end at ``layers_end``."""
        return max(layers_end, start + self.cpu_s + self.xfer_s) + self.fill_s + self.tail_s

    def finish(self, start: float, streams: Sequence[tuple[MemoryOp, TransferRecord]],
               backend: SimBackend) -> tuple[float, float]:
        """(end, dequantisation seconds) of the step started at ``start`` whose weight streams
        arrived as ``streams``: a layer starts when its blocks are in, as in ``SimBackend``."""
        if not streams:
            return self.end(start, start + self.layers_s), 0.0
        if backend.lookahead is not None:
            layers_end, conv = backend._gated_finish(list(streams), self.gpu, start, layer_s=self.layer_s)
            return self.end(start, layers_end), conv
        conv_total = 0.0
        layers_end = start
        for op, rec in streams:
            m = backend._stream(op).matrix  # columns: arrived fraction, -, -, conversion left
            idx = np.fromiter((b.layer for b in op.blocks), dtype=np.int64, count=len(op.blocks))
            conv = 2 * op.convert_bytes / backend.convert_bw if op.convert_bytes else 0.0
            conv_total += conv
            t = rec.first_byte + (rec.end - rec.first_byte) * m[:, 0] + self.suffix_s[idx] + conv * m[:, 3]
            layers_end = max(layers_end, float(t.max()))
        layers_end = max(layers_end, start + self.layers_s + conv_total)
        return self.end(start, layers_end), conv_total


class RoutingCost:
    """Costs routed steps on the modelled machine of ``cost`` (see the module docstring)."""

    def __init__(self, cost: CostModel, cpu_depth: int, gpu_depth: int, shallow_device: str) -> None:
        model, hw = cost.model, cost.hw
        L = model.num_layers
        if not 1 <= cpu_depth <= gpu_depth <= L:
            raise ConfigError(f"routing: need 1 <= cpu_depth <= gpu_depth <= model.num_layers={L}, got "
                              f"cpu_depth={cpu_depth} gpu_depth={gpu_depth}")
        if shallow_device not in ("cpu", "gpu"):
            raise ConfigError(f"routing.shallow_device='{shallow_device}' is unknown; use cpu or gpu")
        cpu = hw.cpu
        self.cpu_peak = cpu.peak_gflops * 1e9 * cpu.compute_efficiency
        self.cpu_bw = cpu.dram_bandwidth_gbps * 1e9 * cpu.bandwidth_efficiency
        if shallow_device == "cpu" and (self.cpu_peak <= 0 or self.cpu_bw <= 0):
            raise ConfigError("hardware.cpu: peak_gflops, dram_bandwidth_gbps and their efficiencies must be > 0 "
                              "for routing.shallow_device=cpu; fix the profile or use shallow_device=gpu")
        self.cost = cost
        self.L, self.c, self.g = L, cpu_depth, gpu_depth
        self.on_cpu = shallow_device == "cpu"
        self.glob = np.array([model.is_global(i) for i in range(L)], dtype=bool)
        self._n_global = np.concatenate([[0], np.cumsum(self.glob)]).astype(int)  # globals in [0, l)
        h, kvd, tp = model.hidden_size, model.kv_dim, cost.tp
        # the CPU runs whole layers in the model's dtype (weights) and fp16 (activations, K/V)
        self.cpu_params = model.attn_params_per_layer + model.mlp_params_per_layer
        self.cpu_layer_bytes = float(model.layer_bytes)
        self.cpu_act = ACT_BYTES * (6 * h + 2 * model.q_dim + 2 * kvd + 3 * model.intermediate_size)
        self.cpu_attn_coef = 4.0 * model.num_heads * model.head_dim
        self.kv_full = model.kv_bytes_per_token_layer(ACT_BYTES)  # K/V of one token, one layer, all heads
        self.window = model.sliding_window
        # KV fill of one layer, per GPU: K/V projection weights + per token hidden in, K/V out
        self.fill_w_bytes = 2 * h * kvd * cost.wbytes / tp
        self.fill_flops_tok = 2.0 * h * 2 * kvd / tp
        self.fill_tok_bytes = h * ACT_BYTES + cost.kv_tok_layer
        self.fill_launch = FILL_KERNELS * hw.gpu.launch_overhead_us * 1e-6
        self.pcie_bw = hw.pcie.bandwidth_gbps * 1e9
        self.pcie_lat = hw.pcie.latency_us * 1e-6
        self.hidden_bytes = h * ACT_BYTES

    def _globals(self, lo: int, hi: int) -> int:
        return int(self._n_global[hi] - self._n_global[lo])

    def step(self, plan: StepPlan) -> RoutedStep | None:
        """The routed cost of ``plan``, or None when routing changes nothing (no shallow token, g == L)."""
        if not plan.routing:
            return None
        shallow_ids = {d.request_id for d in plan.routing if d.path == "shallow"}
        if not shallow_ids and self.g == self.L:
            return None
        prefill: list[BatchItem] = []
        deep: list[BatchItem] = []
        shallow: list[BatchItem] = []
        for it in plan.items:
            if it.phase is PREFILL:
                prefill.append(it)
            elif it.request_id in shallow_ids:
                shallow.append(it)
            else:
                deep.append(it)
        L, c, g = self.L, self.c, self.g
        if self.on_cpu:
            segments = [(0, g, prefill + deep), (g, L, prefill)]
        else:
            segments = [(0, c, prefill + deep + shallow), (c, g, prefill + deep), (g, L, prefill)]
        cost = self.cost
        layer_s = [0.0] * L
        compute = comm = flops = hbm = 0.0
        first_ar = -1.0
        glob = self.glob
        for lo, hi, items in segments:
            if hi <= lo or not items:
                continue
            lc = cost.layer(items)
            if first_ar < 0:
                first_ar = lc.ar_bytes
            ng = self._globals(lo, hi)
            nl = hi - lo - ng
            gs, ls = lc.global_s + lc.comm_s, lc.local_s + lc.comm_s
            for i in range(lo, hi):
                layer_s[i] = gs if glob[i] else ls
            compute += nl * lc.local_s + ng * lc.global_s
            comm += (hi - lo) * lc.comm_s
            flops += (hi - lo) * lc.lin_flops + ng * lc.global_flops + nl * lc.local_flops
            hbm += (hi - lo) * lc.lin_bytes + ng * lc.global_bytes + nl * lc.local_bytes
        n_s = sum(it.num_tokens for it in shallow)
        n_d = sum(it.num_tokens for it in deep)
        n_p = sum(it.num_tokens for it in prefill)
        # KV fill of the skipped layers: [c, g) for shallow tokens, [g, L) for shallow + deep
        fill_s = 0.0
        for lo, hi, n in ((c, g, n_s), (g, L, n_s + n_d)):
            if hi <= lo or n == 0:
                continue
            f = n * self.fill_flops_tok
            b = self.fill_w_bytes + n * self.fill_tok_bytes
            fill_s += (hi - lo) * (cost.roof(f, b) + self.fill_launch)
            flops += (hi - lo) * f
            hbm += (hi - lo) * b
        emit = sum(it.emits_token for it in plan.items)
        head_s, head_flops, _ = cost.head(emit, n_p + n_d + n_s)
        flops += head_flops
        hbm += cost.head_bytes
        pp_s = 0.0
        if cost.pp > 1 and first_ar > 0:
            pp_s = (cost.pp - 1) * (cost.link_lat + first_ar / cost.link_bw)
        cpu_s = xfer_s = cpu_flops = cpu_bytes = 0.0
        link_bytes = 0
        if self.on_cpu and shallow:
            cpu_s, cpu_flops, cpu_bytes = self._cpu(shallow, n_s)
            kv_c = c * self.kv_full / cost.tp
            h2d = n_s * (self.hidden_bytes + kv_c)
            d2h = (n_d + n_p) * kv_c
            xfer_s = self.pcie_lat + max(h2d, d2h) / self.pcie_bw
            link_bytes = int(round(cost.tp * (h2d + d2h)))
        layers_s = float(sum(layer_s))
        suffix = np.concatenate([np.cumsum(np.asarray(layer_s)[::-1])[::-1], [0.0]])
        gpu = StepCost(0.0, 0.0, 0.0, 0.0, 0.0, compute + fill_s + head_s, comm + pp_s,
                       flops * cost.tp, hbm * cost.tp, 0.0)
        return RoutedStep(gpu, layer_s, suffix, layers_s, fill_s, head_s + pp_s, cpu_s, xfer_s, cpu_flops,
                          cpu_bytes, link_bytes, n_d, n_s)

    def _cpu(self, shallow: list[BatchItem], n_s: int) -> tuple[float, float, float]:
        """(seconds, flops, bytes) of the first ``c`` layers for the shallow tokens on the host CPU."""
        w = self.window
        pairs_g = pairs_l = 0
        for it in shallow:
            k = it.context_len + 1  # a decode query sees its context and itself
            pairs_g += k
            pairs_l += min(k, w) if w else k
        peak, bw = self.cpu_peak, self.cpu_bw
        lin_f = 2.0 * n_s * self.cpu_params
        lin_b = self.cpu_layer_bytes + n_s * self.cpu_act
        lin = max(lin_f / peak, lin_b / bw)
        g_f, l_f = self.cpu_attn_coef * pairs_g, self.cpu_attn_coef * pairs_l
        g_b, l_b = self.kv_full * (pairs_g + n_s), self.kv_full * (pairs_l + n_s)
        ng = self._globals(0, self.c)
        nl = self.c - ng
        seconds = self.c * lin + ng * max(g_f / peak, g_b / bw) + nl * max(l_f / peak, l_b / bw)
        return (seconds, self.c * lin_f + ng * g_f + nl * l_f, self.c * lin_b + ng * g_b + nl * l_b)
