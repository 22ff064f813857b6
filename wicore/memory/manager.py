"""HMT: hierarchical memory for model weights, GPU -> CPU -> NVMe.

Weights are cut into blocks, one per (GPU shard, layer, parameter group):
``attn`` (q/k/v/o projections and norms) and ``mlp`` (gate/up/down). Each GPU
keeps a cache of blocks in the *hot* format (the model dtype), managed by a
replacement policy (``wicore.memory.policies``: LRU, LFU, ARC, LRFU, A2CR); a
block not on the GPU lives in host memory in the *warm* format (8-bit
group-wise by default) or, when host memory is full, on NVMe in the *cold*
format (4-bit group-wise). Every step reads every layer in order, so every
block is accessed once per step:

* a hit costs nothing;
* a miss becomes a ``fetch`` op over the GPU's PCIe link (NVMe reads cross the
  NVMe link too) of the block's *stored* bytes, with ``convert_bytes`` = its hot
  size: the backend charges the dequantisation on the GPU as a pass over
  those bytes, and the layer waits for the block (stall) when it has not
  arrived in time;
* the policy's victims are dropped from the GPU: weights are read-only and the
  lower tier keeps its copy, so demotion moves no bytes.

At load time blocks are placed in layer order: the GPU cache is filled first
(through the policy), the rest go to host memory while it has room, then NVMe.

Pure policy code: no simpy, no torch, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from wicore.errors import CapacityError, ConfigError
from wicore.hal import GIB, HardwareSpec
from wicore.memory.formats import Format, format_from_name
from wicore.memory.kv_tiers import TieredKV
from wicore.memory.placement import MemoryConfig, StaticPlacement
from wicore.memory.policies.base import ReplacementPolicy
from wicore.model.spec import ModelSpec
from wicore.types import BatchItem, BlockRef, MemoryOp, StepPlan, StepResult


@dataclass
class TierStats:
    """Accesses served by each tier (a GPU hit, or a miss fetched from cpu / nvme)."""

    accesses: int = 0
    served: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)  # stored bytes moved from each tier

    def hit_rates(self) -> dict[str, float]:
        return {t: n / self.accesses for t, n in self.served.items()} if self.accesses else {}


class TieredWeights(StaticPlacement):
    """Weight blocks cached on each GPU by a replacement policy; KV budget as in StaticPlacement."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, gpus: list[int], tp: int, pp: int,
                 cfg: MemoryConfig, policy_factory: Any, formats: Mapping[str, str],
                 name: str = "replica0", record_blocks: int = 200_000, kv_policy_factory: Any = None,
                 kv_host_gib: float = 0.0, kv_skip_below: float = 0.0) -> None:
        super().__init__(model, hw, gpus, tp, pp, cfg, name)
        self.kv: TieredKV | None = None
        self.access_log: list[tuple[float, tuple[int, int, str], int]] | None = None  # set to [] to record
        if kv_policy_factory is not None:
            if kv_host_gib <= 0:
                raise ConfigError(f"memory.kv.host_gib: must be > 0 with KV tiering, got {kv_host_gib}")
            if not 0 <= kv_skip_below < 1:
                raise ConfigError(f"memory.kv.skip_below: must be in [0, 1), got {kv_skip_below}")
            self.kv = TieredKV(kv_policy_factory(capacity=self.num_pages), self.page_tokens,
                               self.page_bytes_per_gpu, gpus, model.num_layers, kv_skip_below)
            self.num_pages += int(kv_host_gib * GIB) // max(self.page_bytes, 1)  # admission: GPU + host
        self.formats: dict[str, Format] = {
            tier: format_from_name(str(formats.get(tier, default)), f"memory.formats.{tier}")
            for tier, default in (("gpu", model.dtype), ("cpu", "int8"), ("nvme", "int4"))}
        self.hot = self.formats["gpu"]
        self.stats = TierStats()
        self.record_blocks = record_blocks
        self.block_rows: dict[str, list[Any]] = {"time": [], "replica": [], "gpu": [], "layer": [],
                                                 "group": [], "tier": []}
        self._replica = int(name.removeprefix("replica")) if name.startswith("replica") else 0
        groups = (("attn", model.attn_params_per_layer + model.norm_params_per_layer // 2),
                  ("mlp", model.mlp_params_per_layer + model.norm_params_per_layer // 2))
        self.blocks: list[tuple[int, int, str, int]] = []  # (gpu, layer, group, params of the shard)
        for p in self.placements:
            for layer in p.layers:
                for group, params in groups:
                    self.blocks.append((p.gpu, layer, group, params // tp))
        host_room = int(hw.cpu.memory_bytes * cfg.host_memory_utilization) - int(cfg.swap_space_gib * GIB)
        self.home: dict[tuple[int, int, str], str] = {}
        self.policies: dict[int, ReplacementPolicy] = {}
        for p in self.placements:
            capacity = p.resident_weight_bytes + (cfg.stream_buffer_layers * (model.layer_bytes // tp)
                                                  if p.streamed else 0)
            if capacity < max(self.hot.nbytes(b[3]) for b in self.blocks):
                raise CapacityError(f"memory: GPU {p.gpu} cannot hold one weight block; lower "
                                    "memory.kv_min_gib or memory.workspace_gib")
            self.policies[p.gpu] = policy_factory(capacity=capacity)
        host_used = 0
        for gpu, layer, group, params in self.blocks:
            key = (gpu, layer, group)
            out = self.policies[gpu].access(key, 0.0, self.hot.nbytes(params))
            if out.admitted:
                self._record(0.0, key, "gpu")
            warm = self.formats["cpu"].nbytes(params)
            if host_used + warm <= host_room:
                self.home[key] = "cpu"
                host_used += warm
            else:
                self.home[key] = "nvme"
            for victim in out.evicted:
                vkey = cast(tuple[int, int, str], victim)
                self._record(0.0, vkey, self.home.get(vkey, "cpu"))
        self.host_weight_bytes = host_used
        self.nvme_weight_bytes = sum(self.formats["nvme"].nbytes(b[3]) for b in self.blocks
                                     if self.home[(b[0], b[1], b[2])] == "nvme")
        if self.nvme_weight_bytes > hw.nvme.capacity_bytes:
            raise CapacityError(f"model: {model.name} does not fit {hw.name} in any tier "
                                f"({self.nvme_weight_bytes / GIB:.1f} GiB left for NVMe)")

    def _record(self, now: float, key: tuple[int, int, str], tier: str) -> None:
        rows = self.block_rows
        if len(rows["time"]) >= self.record_blocks:
            return
        gpu, layer, group = key
        for k, v in (("time", now), ("replica", self._replica), ("gpu", gpu), ("layer", layer),
                     ("group", group), ("tier", f"gpu{gpu}" if tier == "gpu" else tier)):
            rows[k].append(v)

    @property
    def offloading(self) -> bool:
        return True

    usage_changes_every_step = True  # the policy's resident set moves

    def step_ops(self, now: float = 0.0, items: list[BatchItem] | None = None) -> tuple[MemoryOp, ...]:
        """Access every block in layer order; fetch the misses from their home tier (and the KV
        pages the step reads that are in host memory, when KV tiering is on)."""
        stats = self.stats
        fetch: dict[tuple[int, str], list[tuple[BlockRef, int, int]]] = {}
        for gpu, layer, group, params in self.blocks:
            key = (gpu, layer, group)
            hot = self.hot.nbytes(params)
            if self.access_log is not None:
                self.access_log.append((now, key, hot))
            out = self.policies[gpu].access(key, now, hot)
            stats.accesses += 1
            if out.hit:
                stats.served["gpu"] = stats.served.get("gpu", 0) + 1
                continue
            src = self.home[key]
            stored = self.formats[src].nbytes(params)
            stats.served[src] = stats.served.get(src, 0) + 1
            stats.bytes_in[src] = stats.bytes_in.get(src, 0) + stored
            fetch.setdefault((gpu, src), []).append((BlockRef("weight", layer, group, device=gpu), stored, hot))
            if out.admitted:
                self._record(now, key, "gpu")
            for victim in out.evicted:
                vkey = cast(tuple[int, int, str], victim)
                self._record(now, vkey, self.home[vkey])
        ops: list[MemoryOp] = []
        for (gpu, src), blocks in fetch.items():
            ops.append(MemoryOp("fetch", src, f"gpu{gpu}", sum(s for _, s, _ in blocks), layer=blocks[0][0].layer,
                                device=gpu, blocks=tuple(b for b, _, _ in blocks),
                                convert_bytes=sum(h for _, _, h in blocks) if src != "gpu" else 0,
                                block_bytes=tuple(s for _, s, _ in blocks)))
        if self.kv is not None and items:
            ops += self.kv.step_ops(items, now)
        return tuple(ops)

    def stream_floor_s(self, link_bytes_per_s: float) -> float:
        """Least time per step to fetch what a GPU cannot keep: the best resident set keeps the
        blocks that are dearest to fetch (NVMe-homed first), the rest come from their home tier
        in its format (slowest GPU)."""
        nvme_bw = min(link_bytes_per_s, self.hw.nvme.read_gbps * 1e9)
        worst = 0.0
        for p in self.placements:
            cost = []  # (seconds to fetch, hot bytes) per block of this GPU
            for gpu, layer, group, params in self.blocks:
                if gpu != p.gpu:
                    continue
                home = self.home[(gpu, layer, group)]
                bw = nvme_bw if home == "nvme" else link_bytes_per_s
                cost.append((self.formats[home].nbytes(params) / bw, self.hot.nbytes(params)))
            excess = sum(h for _, h in cost) - self.policies[p.gpu].capacity
            t = 0.0
            for sec, hot in sorted(cost):  # fetch the cheapest blocks, keep the dear ones resident
                if excess <= 0:
                    break
                t += sec * min(1.0, excess / hot)
                excess -= hot
            worst = max(worst, t)
        return worst

    def feedback(self, plan: StepPlan, result: StepResult, now: float) -> None:
        """Attention mass per KV page goes to the KV policy (weight blocks get none)."""
        if self.kv is not None:
            self.kv.feedback(result, now)

    def release(self, request_id: int) -> None:
        if self.kv is not None:
            self.kv.release(request_id)

    def resident_bytes(self, gpu: int) -> int:
        return self.policies[gpu].used

    def tier_usage(self, kv_pages_used: int, swap_pages_used: int = 0) -> dict[str, tuple[int, int]]:
        usage: dict[str, tuple[int, int]] = {}
        gpu_pages = kv_pages_used if self.kv is None else self.kv.resident_pages
        for p, pb in zip(self.placements, self.page_bytes_per_gpu):
            used = self.policies[p.gpu].used + p.fixed_bytes + gpu_pages * pb
            if p.streamed:  # the stream buffer is part of the policy's cache here
                used -= self.cfg.stream_buffer_layers * (self.model.layer_bytes // self.tp)
            usage[f"gpu{p.gpu}"] = (used, p.capacity_bytes)
        host_kv = (kv_pages_used - gpu_pages + swap_pages_used) * self.page_bytes
        usage["cpu"] = (self.host_weight_bytes + host_kv, self.hw.cpu.memory_bytes)
        if self.nvme_weight_bytes:
            usage["nvme"] = (self.nvme_weight_bytes, self.hw.nvme.capacity_bytes)
        return usage

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(super().describe())
        d.update({"manager": "hmt", "policy": type(next(iter(self.policies.values()))).__name__,
                  "format_gpu": self.hot.name, "format_cpu": self.formats["cpu"].name,
                  "format_nvme": self.formats["nvme"].name,
                  "host_weights_gib": self.host_weight_bytes / GIB, "nvme_weights_gib": self.nvme_weight_bytes / GIB,
                  "weight_blocks": len(self.blocks)})
        return d


def check_policy_params(name: str, params: Mapping[str, Any]) -> None:
    """Reject obviously bad replacement-policy weights at start-up."""
    weights = {k: v for k, v in params.items() if k.endswith("_weight")}
    for k, v in weights.items():
        if v < 0:
            raise ConfigError(f"memory.{name}.{k}: must be >= 0, got {v}")
    if weights and not any(weights.values()):
        raise ConfigError(f"memory.{name}: all weights are zero; give at least one a positive value")
