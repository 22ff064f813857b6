"""Device manager: describe the machine the real backend runs on.

``probe()`` builds the same ``HardwareSpec`` the simulator reads from a
profile, from what torch and the OS report: the accelerators torch exposes
(CUDA, ROCm through the same API, or none: then the CPU itself is the compute
device), host cores and memory, and — when ``measure=True`` — host<->device
copy bandwidth (pinned and pageable) and disk read bandwidth, timed for real.
Numbers the probe cannot know (tensor-core peaks) come from ``peaks`` or stay
0 and are marked in ``sources``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wicore.errors import ConfigError
from wicore.hal import GIB, CPUSpec, GPUSpec, HardwareSpec, LinkSpec, NVMeSpec

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, field: str, cpu_hint: str) -> torch.device:
    """The ``torch.device`` a config names (``auto``: cuda when torch sees one, else cpu). ``field`` names
    the setting in the errors, ``cpu_hint`` how to ask for the CPU instead."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{field}: '{name}' is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}=cuda but torch sees no CUDA device; use {cpu_hint}")
    return dev


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 0.0


def measure_disk_read_gbps(path: Path | None = None, nbytes: int = 256 * 2**20) -> float:
    """Write a file, drop nothing (no root assumed), read it back: an upper bound
    (page cache) unless the file is larger than memory. Returns GB/s."""
    folder = Path(path) if path else Path(tempfile.gettempdir())
    f = folder / f"wicore-probe-{os.getpid()}.bin"
    try:
        f.write_bytes(os.urandom(1 << 20) * (nbytes >> 20))
        t0 = time.perf_counter()
        with f.open("rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
        return nbytes / (time.perf_counter() - t0) / 1e9
    finally:
        f.unlink(missing_ok=True)


def measure_copy_gbps(device: Any, nbytes: int = 256 * 2**20, pinned: bool = True) -> float:
    """Host -> device copy bandwidth in GB/s (median of 5)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8)
    if pinned and device.type == "cuda":
        host = host.pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return nbytes / times[len(times) // 2] / 1e9


def probe(measure: bool = False, peaks: dict[str, float] | None = None) -> HardwareSpec:
    """Describe this machine. ``peaks`` may give fp16_tflops / bf16_tflops / int8_tops /
    mem_bandwidth_gbps for the accelerator (the probe cannot read them)."""
    import torch

    peaks = peaks or {}
    cores = os.cpu_count() or 1
    host_gib = _host_memory_gib()
    cpu = CPUSpec(name=f"{cores}-core host", cores=cores, dram_gib=host_gib,
                  dram_bandwidth_gbps=peaks.get("dram_bandwidth_gbps", 20.0),
                  peak_gflops=peaks.get("cpu_gflops", 50.0 * cores))
    sources = {"cpu": "probed: os.cpu_count, physical pages; bandwidth/peak from `peaks` or a default guess"}
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.is_bf16_supported()
        gpu = GPUSpec(name=props.name, vendor="amd" if torch.version.hip else "nvidia",
                      memory_gib=props.total_memory / GIB,
                      mem_bandwidth_gbps=peaks.get("mem_bandwidth_gbps", 0.0) or 1.0,
                      fp16_tflops=peaks.get("fp16_tflops", 0.0), bf16_tflops=peaks.get("bf16_tflops", 0.0),
                      int8_tops=peaks.get("int8_tops", 0.0), fp32_tflops=peaks.get("fp32_tflops", 0.0),
                      supports_bf16=bf16)
        device = torch.device("cuda", 0)
        sources["gpu"] = "probed: torch.cuda.get_device_properties; peaks from `peaks` (0 = unknown)"
    else:
        n = 1
        gpu = GPUSpec(name="cpu", vendor="cpu", memory_gib=host_gib, mem_bandwidth_gbps=cpu.dram_bandwidth_gbps,
                      fp16_tflops=0.0, bf16_tflops=0.0, int8_tops=0.0, fp32_tflops=cpu.peak_gflops / 1e3,
                      supports_bf16=True)
        device = torch.device("cpu")
        sources["gpu"] = "no accelerator: the CPU is the compute device"
    pinned = pageable = 0.0
    disk = 0.0
    if measure:
        pinned = measure_copy_gbps(device, pinned=True)
        pageable = measure_copy_gbps(device, pinned=False)
        disk = measure_disk_read_gbps()
        sources["pcie"] = "measured: host->device copies of 256 MiB (median of 5)"
        sources["nvme"] = "measured: read of a 256 MiB temp file (may hit the page cache)"
    pcie = LinkSpec(kind="pcie", bandwidth_gbps=pinned or 12.0, pageable_bandwidth_gbps=pageable or 6.0)
    inter = LinkSpec(kind="pcie", bandwidth_gbps=pinned or 10.0)
    nvme = NVMeSpec(capacity_gib=_free_disk_gib(), read_gbps=disk or 2.0, write_gbps=1.0)
    return HardwareSpec(name="probed", gpu=gpu, num_gpus=n, cpu=cpu, pcie=pcie, interconnect=inter,
                        nvme=nvme, sources=sources)


def _free_disk_gib(path: str = ".") -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / GIB
