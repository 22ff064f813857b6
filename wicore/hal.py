"""Hardware abstraction: device descriptions and the backend contract.

A ``HardwareSpec`` describes a machine the same way whether it comes from a
profile in ``conf/hardware/`` (the simulator) or from probing real devices
(the torch backend). Units are in the field names: ``_gib`` = 2**30 bytes,
``_gbps`` = 1e9 bytes per second, ``_tflops`` = 1e12 operations per second,
``_us`` = microseconds.

A ``Backend`` turns a ``StepPlan`` into a ``StepResult``; a driver owns the
clock and runs the one engine loop (see ``wicore.engine``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from wicore.errors import ConfigError
from wicore.types import StepPlan, StepResult

GIB = 2**30
GB = 1e9


@dataclass(frozen=True)
class GPUSpec:
    name: str
    vendor: str
    memory_gib: float  # device memory capacity
    mem_bandwidth_gbps: float  # peak device-memory bandwidth
    fp16_tflops: float  # dense fp16 tensor-core peak
    bf16_tflops: float  # dense bf16 peak (0 when unsupported)
    int8_tops: float  # dense int8 peak
    fp32_tflops: float  # non-tensor fp32 peak
    supports_bf16: bool
    launch_overhead_us: float = 5.0  # per kernel launch, host side
    tdp_w: float = 0.0
    compute_efficiency: float = 0.7  # achievable fraction of the tensor peak for large GEMMs
    bandwidth_efficiency: float = 0.85  # achievable fraction of the memory bandwidth

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_flops(self, dtype: str) -> float:
        table = {
            "fp16": self.fp16_tflops,
            "bf16": self.bf16_tflops,
            "int8": self.int8_tops,
            "fp32": self.fp32_tflops,
        }
        if dtype not in table:
            raise ConfigError(f"model.dtype: unknown dtype '{dtype}'; use one of {sorted(table)}")
        return table[dtype] * 1e12


@dataclass(frozen=True)
class CPUSpec:
    name: str
    cores: int
    dram_gib: float  # host memory capacity
    dram_bandwidth_gbps: float
    peak_gflops: float  # fp32 peak of all cores (AVX FMA)
    compute_efficiency: float = 0.5
    bandwidth_efficiency: float = 0.7

    @property
    def memory_bytes(self) -> int:
        return int(self.dram_gib * GIB)


@dataclass(frozen=True)
class LinkSpec:
    """A point-to-point path: host<->GPU PCIe, GPU<->GPU (PCIe P2P or NVLink)."""

    kind: str  # "pcie" | "nvlink" | "infinity_fabric" | "hccs" ...
    bandwidth_gbps: float  # per direction, achievable with pinned host memory
    pageable_bandwidth_gbps: float = 0.0  # achievable from pageable memory (0: same as pinned)
    latency_us: float = 10.0
    generation: int = 0  # PCIe generation (0 when not PCIe)
    lanes: int = 0

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbps * GB

    def effective_bytes_per_s(self, pinned: bool = True) -> float:
        if pinned or self.pageable_bandwidth_gbps <= 0:
            return self.bandwidth_gbps * GB
        return self.pageable_bandwidth_gbps * GB


@dataclass(frozen=True)
class NVMeSpec:
    capacity_gib: float
    read_gbps: float
    write_gbps: float
    queue_depth: int = 32
    latency_us: float = 80.0

    @property
    def capacity_bytes(self) -> int:
        return int(self.capacity_gib * GIB)


@dataclass(frozen=True)
class HardwareSpec:
    """A whole machine: ``num_gpus`` identical GPUs, one host, one NVMe.

    Each GPU has its own host link (``pcie``). ``shared_upstream_gbps`` > 0
    models GPUs behind one PCIe switch / NUMA node whose uplink they share.
    """

    name: str
    gpu: GPUSpec
    num_gpus: int
    cpu: CPUSpec
    pcie: LinkSpec
    interconnect: LinkSpec
    nvme: NVMeSpec
    shared_upstream_gbps: float = 0.0
    numa_nodes: int = 1
    sources: dict[str, str] = field(default_factory=dict)
    calibration: str | None = None  # measured cost table of this machine (docs/calibration.md); None: roofline

    @property
    def total_gpu_bytes(self) -> int:
        return self.gpu.memory_bytes * self.num_gpus


T = TypeVar("T")


def build_dataclass(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown and missing fields.

    Nested dataclass fields are built recursively. Errors name the dotted field
    (``where``) so a config mistake points at the line to change.
    """
    if dataclasses.is_dataclass(data):
        return data  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names) - {"_target_"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    nested = {"gpu": GPUSpec, "cpu": CPUSpec, "pcie": LinkSpec, "interconnect": LinkSpec, "nvme": NVMeSpec}
    for key, value in data.items():
        if key == "_target_":
            continue
        if cls is HardwareSpec and key in nested:
            kwargs[key] = build_dataclass(nested[key], value, f"{where}.{key}")
        else:
            kwargs[key] = value
        del hints[key]
    missing = [n for n, f in names.items() if n in hints and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    obj = cls(**kwargs)
    _check_positive(obj, where)
    return obj


def _check_positive(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value < 0:
            raise ConfigError(f"{where}.{f.name}: must be >= 0, got {value}")
        if f.name.endswith("efficiency") and not 0 < value <= 1:
            raise ConfigError(f"{where}.{f.name}: must be in (0, 1], got {value}")


def hardware_from_config(cfg: dict[str, Any]) -> HardwareSpec:
    hw = build_dataclass(HardwareSpec, cfg, "hardware")
    if hw.num_gpus < 1:
        raise ConfigError(f"hardware.num_gpus: must be >= 1, got {hw.num_gpus}")
    if hw.gpu.memory_gib <= 0 or hw.gpu.mem_bandwidth_gbps <= 0:
        raise ConfigError("hardware.gpu: memory_gib and mem_bandwidth_gbps must be > 0")
    if hw.pcie.bandwidth_gbps <= 0:
        raise ConfigError("hardware.pcie.bandwidth_gbps: must be > 0")
    return hw


class Backend(Protocol):
    """Executes plans. The sim backend returns a SimPy event that yields the
    ``StepResult``; the torch backend runs the work and returns the result."""

    def execute(self, plan: StepPlan) -> Any:
        """Run ``plan``; the driver gets a ``StepResult`` (directly or as the
        value of the returned event). Must not change engine state."""
        ...


class Driver(Protocol):
    """Owns the clock and runs ``engine.schedule -> backend.execute ->
    engine.update`` until the workload is done."""

    def run(self) -> StepResult | None: ...
