"""``experiments.validate --profile``: the calibration tables measured in the validation's own process.

Host-bound step costs move from one process to the next (``benchmarks/results/gpu_step_modes/pin_check``:
the same graph step 9-16 % slower in one process than in the next), while a run and its repeat in one
process agree within a few per cent. A table profiled in another process carries that offset into
every comparison. With ``--profile`` the runner profiles, right before the torch runs and in the same
process, one table per run shape the selected entries have: the model and dtype, the torch side's
CUDA-graph settings and ``max_len``, and for an offloaded entry its GPU budget (layers streamed from
host memory, captured by the graphs as the runtime does; an entry with ``memory.offload_to=nvme`` runs
eagerly on the runtime, and its shape says so, though the profile streams from host memory). The
tables land in ``DIR/calibration/`` and each entry's sim side uses the one of its shape. 2-GPU entries are left to ``--calibration-2gpu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from wicore.errors import ConfigError


@dataclass(frozen=True)
class Shape:
    """What a table must match to cost an entry's runs."""

    model: str
    dtype: str
    max_len: int
    cuda_graphs: bool
    prefill_graphs: bool
    gpu_budget_gib: float | None

    @property
    def file_name(self) -> str:
        graphs = ("_graphs" if self.cuda_graphs else "") + ("_prefill" if self.prefill_graphs else "")
        budget = f"_gpu{self.gpu_budget_gib:g}g" if self.gpu_budget_gib is not None else ""
        return f"{self.model}_{self.dtype}_len{self.max_len}{graphs}{budget}.csv"


def entry_shape(cfg: DictConfig, gpu_budget_gib: float | None) -> tuple[Shape, Any]:
    """(shape, model spec) of an entry from its composed torch-side config (dtype ``auto`` resolved as
    ``build_torch`` resolves it)."""
    from experiments.build import plain
    from experiments.run_torch import cuda_graphs_enabled
    from wicore.devices import resolve_device
    from wicore.model.spec import ModelSpec
    from wicore.model.transformer import preferred_dtype_name

    bc = cfg.backend
    device = resolve_device(str(bc.device), "backend.device", "backend.device=cpu")
    data = plain(cfg.model)
    if data.get("dtype", "auto") == "auto":
        data["dtype"] = preferred_dtype_name(device)
    spec = ModelSpec.from_config(data)
    # the runtime runs a model streaming from the NVMe tier eagerly (experiments.run_torch)
    eager = gpu_budget_gib is not None and str(cfg.get("memory", {}).get("offload_to", "auto")) == "nvme"
    shape = Shape(spec.name, spec.dtype, min(int(bc.max_len), spec.max_context),
                  not eager and cuda_graphs_enabled(bc.get("cuda_graphs", False), device),
                  not eager and cuda_graphs_enabled(bc.get("prefill_graphs", False), device, "backend.prefill_graphs"),
                  gpu_budget_gib)
    return shape, (spec, device)


def profile_shapes(shapes: dict[Shape, Any], folder: Path, grid_items: tuple[str, ...], log: Any) -> dict[Shape, str]:
    """Profile every shape (``shapes[shape] = (spec, device)``) into ``folder``; returns each table's path."""
    from wicore.runtime.profiler import ProfileGrid, grid_with, profile

    grid = grid_with(ProfileGrid(primitives=False, reps=12, rounds=3), list(grid_items))
    out: dict[Shape, str] = {}
    for shape, (spec, device) in shapes.items():
        path = folder / shape.file_name
        log(f"profile ({shape.model} {shape.dtype}, max_len {shape.max_len}"
            f"{', CUDA-graph decode' if shape.cuda_graphs else ''}{', CUDA-graph prefill' if shape.prefill_graphs else ''}"
            f"{f', {shape.gpu_budget_gib:g} GiB budget' if shape.gpu_budget_gib is not None else ''}) -> {path}")
        try:
            profile(spec, device, path, grid, max_len=shape.max_len, cuda_graphs=shape.cuda_graphs,
                    prefill_graphs=shape.prefill_graphs, gpu_budget_gib=shape.gpu_budget_gib, log=lambda m: None)
        except ConfigError as e:
            raise ConfigError(f"--profile: {shape.model} {shape.dtype}: {e}") from None
        out[shape] = str(path.resolve())
    return out
