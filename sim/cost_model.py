"""Op -> seconds: a per-layer roofline cost model of one engine step.

For each decoder layer of a step (tokens ``T`` = sum of the items' tokens):

* projections + MLP (GEMMs):  flops = 2 * T * params_per_layer / tp,
  bytes = weights of the layer / tp + activations in and out;
* attention: flops = 4 * num_heads * head_dim * A / tp, where A is the number
  of (query, key) pairs: a query at 0-based position p attends p + 1 keys on
  global layers and min(p + 1, window) on local (sliding-window) layers;
  bytes = K/V read for the keys touched + K/V written for the new tokens;
* time = max(flops / (peak * compute_efficiency),
             bytes / (bandwidth * bandwidth_efficiency))  for the GEMM part
         + the same for the attention part + kernels_per_layer * launch overhead;
* tensor parallel: every layer ends with two all-reduces of T * hidden
  activations over the inter-GPU link (ring: 2 (tp - 1) / tp of the bytes,
  plus the link latency, per all-reduce);
* the LM head runs for the tokens that emit an output token.

Pipeline parallel splits the layers over ``pp`` GPUs; a step goes through the
stages one after the other (no micro-batching), plus the activation hand-over.

``layer(items)`` (one local and one global layer) and ``head(emit, tokens)`` are
the parts ``step`` sums; the routed-step cost (``sim.routing_cost``) combines
them per layer when tokens run different depths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wicore.errors import ConfigError
from wicore.hal import HardwareSpec
from wicore.model.spec import DTYPE_BYTES, ModelSpec
from wicore.types import BatchItem

ACT_BYTES = 2  # activations are fp16/bf16 whatever the weight format


@dataclass(slots=True)
class LayerCost:
    """One decoder layer of a set of items, per GPU (``CostModel.layer``)."""

    tokens: int  # tokens through the layer
    emit: int  # items that emit a token (rows of the LM head)
    local_s: float  # one local (sliding-window) layer, compute only
    global_s: float  # one global layer, compute only
    comm_s: float  # tensor-parallel all-reduces of one layer
    lin_flops: float  # projections + MLP
    global_flops: float  # attention of a global layer
    local_flops: float  # attention of a local layer
    lin_bytes: float  # weights + activations of the GEMMs
    global_bytes: float  # K/V read and written by a global layer
    local_bytes: float  # K/V read and written by a local layer
    ar_bytes: float  # activations of one all-reduce


@dataclass(slots=True)
class StepCost:
    local_layer_s: float  # one local (sliding-window) layer, compute only
    global_layer_s: float  # one global layer, compute only
    comm_per_layer_s: float  # tensor-parallel all-reduces of one layer
    head_s: float  # embedding + final norm + LM head
    pp_transfer_s: float  # pipeline stage hand-overs
    compute_s: float  # sum of all compute (layers + head)
    comm_s: float  # all inter-GPU communication
    flops: float
    hbm_bytes: float
    comm_bytes: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


def _sum_min(start: int, end: int, cap: int) -> int:
    """sum_{k=start}^{end} min(k, cap) for 1 <= start <= end."""
    if end <= cap:
        return (start + end) * (end - start + 1) // 2
    if start > cap:
        return (end - start + 1) * cap
    return (start + cap) * (cap - start + 1) // 2 + (end - cap) * cap


class CostModel:
    def __init__(self, model: ModelSpec, hw: HardwareSpec, tp: int = 1, pp: int = 1,
                 kernels_per_layer: int = 12) -> None:
        if tp < 1 or pp < 1:
            raise ConfigError(f"parallel: tp and pp must be >= 1, got tp={tp} pp={pp}")
        if model.num_kv_heads % tp and tp % model.num_kv_heads:
            raise ConfigError(f"parallel.tp={tp} does not divide model.num_kv_heads={model.num_kv_heads}")
        self.model = model
        self.hw = hw
        self.tp = tp
        self.pp = pp
        gpu = hw.gpu
        if model.dtype == "bf16" and not gpu.supports_bf16:
            raise ConfigError(f"model.dtype=bf16 but {gpu.name} has no bf16 support; "
                              "set model.dtype=fp16 (or auto)")
        compute_dtype = "int8" if model.dtype in ("int8", "int4") else model.dtype
        self.peak = gpu.peak_flops(compute_dtype) * gpu.compute_efficiency
        if self.peak <= 0:
            raise ConfigError(f"hardware.gpu: {gpu.name} has no {compute_dtype} peak; choose another model.dtype")
        self.bw = gpu.mem_bandwidth_gbps * 1e9 * gpu.bandwidth_efficiency
        self.launch_s = kernels_per_layer * gpu.launch_overhead_us * 1e-6
        self.wbytes = DTYPE_BYTES[model.dtype]
        self.kv_tok_layer = model.kv_bytes_per_token_layer(ACT_BYTES) / tp
        self.layer_weight_bytes = model.layer_bytes / tp
        self.layer_params = (model.attn_params_per_layer + model.mlp_params_per_layer) / tp
        self.attn_coef = 4.0 * model.num_heads * model.head_dim / tp
        self.act_per_token = ACT_BYTES * (6 * model.hidden_size + 2 * model.q_dim + 2 * model.kv_dim
                                          + 3 * model.intermediate_size / tp)
        link = hw.interconnect
        self.link_bw = link.bandwidth_gbps * 1e9
        self.link_lat = link.latency_us * 1e-6
        self.head_bytes = model.vocab_size * model.hidden_size * self.wbytes / tp
        self.n_local = model.num_local_layers
        self.n_global = model.num_global_layers
        self.window = model.sliding_window

    def roof(self, flops: float, nbytes: float) -> float:
        return max(flops / self.peak, nbytes / self.bw)

    def allreduce_s(self, nbytes: float) -> float:
        if self.tp == 1:
            return 0.0
        return self.link_lat + 2 * (self.tp - 1) / self.tp * nbytes / self.link_bw

    def head(self, emit: int, tokens: int) -> tuple[float, float, float]:
        """(seconds, flops, bytes) of embedding + final norm + LM head, per GPU: ``emit`` rows
        through the LM head, ``tokens`` hidden states read."""
        m = self.model
        head_flops = 2.0 * emit * m.hidden_size * m.vocab_size / self.tp
        head_bytes = self.head_bytes + tokens * m.hidden_size * ACT_BYTES
        return self.roof(head_flops, head_bytes) + self.launch_s, head_flops, head_bytes

    def layer(self, items: Iterable[BatchItem]) -> LayerCost:
        """One local and one global layer of ``items`` (no LM head), per GPU."""
        tokens = emit = 0
        pairs_g = pairs_l = keys_g = keys_l = 0
        dec_g = dec_l = 0  # decodes: a query at position c sees c + 1 keys (min(c + 1, w) on local layers)
        w = self.window
        for it in items:
            n, c = it.num_tokens, it.context_len
            tokens += n
            emit += it.emits_token
            if n == 1:
                dec_g += c + 1
                dec_l += c + 1 if c < w else w
            else:
                pairs_g += (2 * c + n + 1) * n // 2
                keys_g += c + n
                if w:
                    pairs_l += _sum_min(c + 1, c + n, w)
                    keys_l += min(c + n, w + n - 1)
        pairs_g += dec_g
        keys_g += dec_g
        pairs_l += dec_l
        keys_l += dec_l
        if not w:
            pairs_l, keys_l = pairs_g, keys_g
        lin_flops = 2.0 * tokens * self.layer_params
        lin_bytes = self.layer_weight_bytes + tokens * self.act_per_token
        lin_s = self.roof(lin_flops, lin_bytes)
        kv = self.kv_tok_layer
        g_flops, l_flops = self.attn_coef * pairs_g, self.attn_coef * pairs_l
        g_bytes, l_bytes = kv * (keys_g + tokens), kv * (keys_l + tokens)
        global_s = lin_s + self.roof(g_flops, g_bytes) + self.launch_s
        local_s = lin_s + self.roof(l_flops, l_bytes) + self.launch_s
        ar_bytes = tokens * self.model.hidden_size * ACT_BYTES
        comm_layer = 2 * self.allreduce_s(ar_bytes)
        return LayerCost(tokens, emit, local_s, global_s, comm_layer, lin_flops, g_flops, l_flops,
                         lin_bytes, g_bytes, l_bytes, ar_bytes)

    def step(self, items: Iterable[BatchItem]) -> StepCost:
        lc = self.layer(items)
        local_s, global_s, comm_layer, ar_bytes = lc.local_s, lc.global_s, lc.comm_s, lc.ar_bytes
        lin_flops, g_flops, l_flops = lc.lin_flops, lc.global_flops, lc.local_flops
        lin_bytes, g_bytes, l_bytes = lc.lin_bytes, lc.global_bytes, lc.local_bytes
        head_s, head_flops, _ = self.head(lc.emit, lc.tokens)
        pp_s = 0.0
        if self.pp > 1:
            pp_s = (self.pp - 1) * (self.link_lat + ar_bytes / self.link_bw)
        nl, ng = self.n_local, self.n_global
        compute = nl * local_s + ng * global_s + head_s
        comm = (nl + ng) * comm_layer + pp_s
        flops = (nl + ng) * lin_flops + ng * g_flops + nl * l_flops + head_flops
        hbm = (nl + ng) * lin_bytes + ng * g_bytes + nl * l_bytes + self.head_bytes
        return StepCost(local_s, global_s, comm_layer, head_s, pp_s, compute, comm,
                        flops * self.tp, hbm * self.tp,
                        (nl + ng) * 2 * ar_bytes * (self.tp > 1) + pp_s * 0)

    def layer_times(self, cost: StepCost) -> list[float]:
        """Per-layer compute + communication time of a step, in layer order."""
        m = self.model
        return [(cost.global_layer_s if m.is_global(i) else cost.local_layer_s) + cost.comm_per_layer_s
                for i in range(m.num_layers)]
