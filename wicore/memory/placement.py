"""Static weight placement and KV budget for one model replica.

The baseline placement of an offloading engine (FlexGen / accelerate style):
each GPU keeps as many of its weights resident as fit in its budget; the rest
stays in host memory (or on NVMe when host memory is too small) and is
streamed to the GPU in every step, layer by layer, into a buffer of
``stream_buffer_layers`` layers, overlapping with the compute of the layers
before it. The streamed layers are spread evenly over the depth so that every
streamed layer has resident layers before it to hide its copy behind.

Budget per GPU (bytes)::

    usable    = memory * gpu_memory_utilization
    fixed     = workspace + embedding/LM-head share (+ stream buffer if offloading)
    all resident:  kv = usable - fixed - weights
    offloading:    kv = kv_min_gib,  resident weights = usable - fixed - kv

Pure policy code: no simpy, no torch, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wicore.errors import CapacityError, ConfigError
from wicore.hal import GIB, HardwareSpec
from wicore.model.spec import ModelSpec
from wicore.types import BatchItem, BlockRef, MemoryOp, StepPlan, StepResult

ACT_BYTES = 2


@dataclass(frozen=True)
class MemoryConfig:
    gpu_memory_utilization: float = 0.92  # fraction of each GPU's memory the engine may use
    workspace_gib: float = 0.5  # activations, CUDA context, allocator slack per GPU
    kv_min_gib: float = 2.0  # KV budget per GPU kept when weights must be offloaded
    page_tokens: int = 16  # tokens per KV page
    stream_buffer_layers: int = 2  # GPU buffers for streamed layers (double buffering)
    host_memory_utilization: float = 0.8  # fraction of host DRAM usable for weights + swapped KV
    swap_space_gib: float = 8.0  # host memory for swapped-out KV pages (swap preemption)
    offload_to: str = "auto"  # where non-resident weights live: auto | cpu | nvme

    def __post_init__(self) -> None:
        for name in ("gpu_memory_utilization", "host_memory_utilization"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ConfigError(f"memory.{name}: must be in (0, 1], got {v}")
        for name in ("workspace_gib", "kv_min_gib", "swap_space_gib"):
            if getattr(self, name) < 0:
                raise ConfigError(f"memory.{name}: must be >= 0, got {getattr(self, name)}")
        if self.page_tokens <= 0:
            raise ConfigError(f"memory.page_tokens: must be > 0, got {self.page_tokens}")
        if self.stream_buffer_layers < 1:
            raise ConfigError(f"memory.stream_buffer_layers: must be >= 1, got {self.stream_buffer_layers}")
        if self.offload_to not in ("auto", "cpu", "nvme"):
            raise ConfigError(f"memory.offload_to: unknown '{self.offload_to}', use auto, cpu or nvme")


@dataclass
class GPUPlacement:
    gpu: int
    capacity_bytes: int
    usable_bytes: int
    layers: list[int]
    weight_bytes: int
    resident_weight_bytes: int
    fixed_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: float
    streamed: list[tuple[int, int]] = field(default_factory=list)  # (layer, bytes) in stream order

    @property
    def streamed_bytes(self) -> int:
        return sum(b for _, b in self.streamed)


def spread(n_total: int, n_pick: int) -> list[int]:
    """``n_pick`` indices of ``range(n_total)`` spread evenly, the last one included."""
    if n_pick <= 0:
        return []
    return sorted({n_total - 1 - (i * n_total) // n_pick for i in range(n_pick)})


class StaticPlacement:
    def __init__(self, model: ModelSpec, hw: HardwareSpec, gpus: list[int], tp: int, pp: int,
                 cfg: MemoryConfig, name: str = "replica0") -> None:
        if len(gpus) != tp * pp:
            raise ConfigError(f"parallel: a replica needs tp*pp={tp * pp} GPUs, got {len(gpus)}")
        self.model, self.hw, self.cfg, self.gpus, self.tp, self.pp = model, hw, cfg, gpus, tp, pp
        L = model.num_layers
        stage_layers = [list(range(s * L // pp, (s + 1) * L // pp)) for s in range(pp)]
        layer_bytes = model.layer_bytes // tp
        embed_share = model.embedding_bytes // tp
        kv_tok_layer = model.kv_bytes_per_token_layer(ACT_BYTES) / tp
        self.placements: list[GPUPlacement] = []
        for s in range(pp):
            for t in range(tp):
                g = gpus[s * tp + t]
                layers = stage_layers[s]
                cap = hw.gpu.memory_bytes
                usable = int(cap * cfg.gpu_memory_utilization)
                weights = len(layers) * layer_bytes
                fixed = int(cfg.workspace_gib * GIB) + embed_share
                kv_tok = len(layers) * kv_tok_layer
                free = usable - fixed - weights
                min_kv = int(cfg.kv_min_gib * GIB)
                if free >= min_kv:
                    p = GPUPlacement(g, cap, usable, layers, weights, weights, fixed, free, kv_tok)
                else:
                    fixed += cfg.stream_buffer_layers * layer_bytes
                    room = usable - fixed - min_kv
                    if room < 0:
                        raise CapacityError(
                            f"hardware.gpu.memory_gib: {hw.gpu.name} has {usable / GIB:.2f} GiB usable, less than "
                            f"workspace + embeddings + {cfg.stream_buffer_layers} streamed layers + "
                            f"memory.kv_min_gib ({(fixed + min_kv) / GIB:.2f} GiB); lower memory.kv_min_gib "
                            "or memory.workspace_gib, or add GPUs")
                    n_res = min(len(layers), room // layer_bytes) if layer_bytes else len(layers)
                    pick = spread(len(layers), len(layers) - n_res)
                    streamed = [(layers[i], layer_bytes) for i in pick]
                    p = GPUPlacement(g, cap, usable, layers, weights, n_res * layer_bytes, fixed,
                                     usable - fixed - n_res * layer_bytes, kv_tok, streamed)
                self.placements.append(p)
        self.page_tokens = cfg.page_tokens
        self.page_bytes_per_gpu = [int(p.kv_bytes_per_token * cfg.page_tokens) for p in self.placements]
        self.num_pages = min(p.kv_budget_bytes // pb for p, pb in zip(self.placements, self.page_bytes_per_gpu))
        self.page_bytes = sum(self.page_bytes_per_gpu)
        self.offloaded_bytes = sum(p.streamed_bytes for p in self.placements)
        host_cap = int(hw.cpu.memory_bytes * cfg.host_memory_utilization)
        where = cfg.offload_to
        if where == "auto":
            where = "cpu" if self.offloaded_bytes <= host_cap - int(cfg.swap_space_gib * GIB) else "nvme"
        if where == "cpu" and self.offloaded_bytes > host_cap:
            raise CapacityError(
                f"memory.offload_to=cpu: {self.offloaded_bytes / GIB:.1f} GiB of weights to offload but host "
                f"memory holds {host_cap / GIB:.1f} GiB; use memory.offload_to=nvme or a larger host")
        if where == "nvme" and self.offloaded_bytes > hw.nvme.capacity_bytes:
            short = (self.offloaded_bytes - hw.nvme.capacity_bytes) / GIB
            raise CapacityError(
                f"model: {model.name} ({model.weight_bytes / GIB:.1f} GiB in {model.dtype}) does not fit "
                f"{hw.name} in any tier: {short:.1f} GiB short; use a smaller model or dtype, or bigger hardware")
        self.offload_tier = where if self.offloaded_bytes else ""
        self.host_swap_pages = int(cfg.swap_space_gib * GIB) // max(self.page_bytes, 1)
        self._ops = tuple(
            MemoryOp("fetch", where, f"gpu{p.gpu}", p.streamed_bytes, layer=p.streamed[0][0], device=p.gpu,
                     blocks=tuple(BlockRef("weight", layer, "layer", device=p.gpu) for layer, _ in p.streamed))
            for p in self.placements if p.streamed)

    def step_ops(self, now: float = 0.0, items: list[BatchItem] | None = None) -> tuple[MemoryOp, ...]:
        """Memory operations of the next step: stream the non-resident layers (the same every step)."""
        return self._ops

    def release(self, request_id: int) -> None:
        """A sequence left the GPU (finished, aborted, preempted): forget its pages (nothing here)."""

    def feedback(self, plan: StepPlan, result: StepResult, now: float) -> None:
        """A static placement learns nothing from a step."""

    def stream_floor_s(self, link_bytes_per_s: float) -> float:
        """Least time per step to bring the weights a GPU cannot keep over its link (slowest GPU)."""
        nvme = self.hw.nvme.read_gbps * 1e9
        bw = min(link_bytes_per_s, nvme) if self.offload_tier == "nvme" else link_bytes_per_s
        return max((p.streamed_bytes for p in self.placements), default=0) / bw

    @property
    def offloading(self) -> bool:
        return bool(self._ops)

    usage_changes_every_step = False  # tier usage depends only on the pages in use

    def tier_usage(self, kv_pages_used: int, swap_pages_used: int = 0) -> dict[str, tuple[int, int]]:
        """Bytes used and capacity per tier, given the pages in use."""
        usage: dict[str, tuple[int, int]] = {}
        for p, pb in zip(self.placements, self.page_bytes_per_gpu):
            used = p.resident_weight_bytes + p.fixed_bytes + kv_pages_used * pb
            usage[f"gpu{p.gpu}"] = (used, p.capacity_bytes)
        host = self.offloaded_bytes if self.offload_tier == "cpu" else 0
        usage["cpu"] = (host + swap_pages_used * self.page_bytes, self.hw.cpu.memory_bytes)
        if self.offload_tier == "nvme":
            usage["nvme"] = (self.offloaded_bytes, self.hw.nvme.capacity_bytes)
        return usage

    def describe(self) -> dict[str, float]:
        p0 = self.placements[0]
        return {
            "weights_per_gpu_gib": p0.weight_bytes / GIB,
            "resident_weights_per_gpu_gib": p0.resident_weight_bytes / GIB,
            "streamed_per_step_per_gpu_gib": p0.streamed_bytes / GIB,
            "kv_budget_per_gpu_gib": p0.kv_budget_bytes / GIB,
            "kv_pages": self.num_pages,
            "kv_tokens": self.num_pages * self.page_tokens,
            "offloaded_gib": self.offloaded_bytes / GIB,
        }
