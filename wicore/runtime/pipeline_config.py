"""Configuration of a pipeline-parallel run: what every rank needs to build its stage and serve steps
(``PipelineConfig``, picklable: it is sent to the spawned workers), the devices of the ranks, and a
fault to inject on one rank (tests of the error paths)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from wicore.errors import ConfigError
from wicore.model.spec import ModelSpec
from wicore.runtime.stage import stage_layers


@dataclass(frozen=True)
class Fault:
    """Make rank ``rank`` fail: ``step`` 0 while building its stage, k >= 1 at its k-th step;
    ``mode`` "raise" (an exception), "exit" (the process dies, exit code 17) or "hang" (sleeps)."""

    rank: int
    step: int
    mode: str = "raise"

    def trigger(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.step:
            return
        if self.mode == "exit":
            os._exit(17)
        if self.mode == "hang":
            time.sleep(1e6)
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a rank needs to build its stage and serve steps (picklable: sent to the workers)."""

    spec: ModelSpec
    devices: tuple[str, ...]  # one per rank: "cuda:0", "cuda:1" or "cpu", "cpu"
    slots: int  # KV slots (scheduler.max_num_seqs)
    max_len: int  # tokens per KV slot
    streamed: tuple[tuple[int, ...], ...] = ()  # per rank: decoder layers streamed from host memory
    seed: int = 0
    checkpoint: str | None = None  # HF-layout checkpoint; None: random weights
    fill: str | None = None  # "module:function" giving values by parameter name (else build_model's init)
    host_format: str = "auto"
    stream_buffers: int = 2
    pin: str = "auto"
    measure_attention: bool = False
    # decode forwards of every stage through CUDA graphs (``GraphStage``; eagerly off CUDA), each stage's KV cache
    # one slot larger: the scratch slot of the padding rows
    cuda_graphs: bool = False
    page_tokens: int = 16
    threads: int = 0  # torch CPU threads per worker (0: torch's default)
    start_timeout_s: float = 1800.0  # starting a worker and building its stage
    step_timeout_s: float = 300.0  # a worker's reply to one step
    idle_timeout_s: float = 30 * 86400.0  # a worker waiting for the next message
    fault: Fault | None = None

    @property
    def cache_slots(self) -> int:
        """KV slots of every stage's cache: ``slots``, and the graphs' scratch slot with ``cuda_graphs``."""
        return self.slots + int(self.cuda_graphs)

    @property
    def pp(self) -> int:
        return len(self.devices)

    def streamed_on(self, rank: int) -> tuple[int, ...]:
        return self.streamed[rank] if self.streamed else ()

    def check(self) -> None:
        if self.pp < 2:
            raise ConfigError(f"parallel.pp: a pipeline needs >= 2 stages, got {self.pp}")
        if self.spec.num_layers < self.pp:
            raise ConfigError(f"parallel.pp={self.pp}: the model has {self.spec.num_layers} decoder layers, "
                              "fewer than the stages; lower parallel.pp")
        if self.streamed and len(self.streamed) != self.pp:
            raise ConfigError(f"pipeline: streamed layers given for {len(self.streamed)} ranks, need {self.pp}")
        for r in range(self.pp):
            layers = stage_layers(self.spec.num_layers, self.pp, r)
            if bad := sorted(set(self.streamed_on(r)) - set(layers)):
                raise ConfigError(f"pipeline: rank {r} streams layers {bad} outside its stage "
                                  f"{layers.start}..{layers.stop - 1}")
        kinds = {torch.device(d).type for d in self.devices}
        if len(kinds) != 1 or not kinds <= {"cpu", "cuda"}:
            raise ConfigError(f"backend.device: pipeline devices {list(self.devices)} must all be cuda or all cpu")
        if "cuda" in kinds and len(set(self.devices)) != self.pp:
            raise ConfigError(f"backend.device: pipeline ranks need distinct GPUs, got {list(self.devices)}")


def pipeline_devices(device: torch.device, pp: int, num_layers: int, visible_gpus: int) -> tuple[str, ...]:
    """The devices of ``pp`` ranks starting at ``device`` (cuda:k .. cuda:k+pp-1, or the CPU for every
    rank); ``ConfigError`` when the model's layers or the visible GPUs cannot be split that way."""
    if pp < 2:
        raise ConfigError(f"parallel.pp: a pipeline needs >= 2 stages, got {pp}")
    if num_layers < pp:
        raise ConfigError(f"parallel.pp={pp}: the model has {num_layers} decoder layers, fewer than the "
                          "stages; lower parallel.pp")
    if device.type == "cpu":
        return ("cpu",) * pp
    if device.type != "cuda":
        raise ConfigError(f"backend.device={device}: pipeline parallel runs on CUDA GPUs or on the CPU")
    base = device.index or 0
    if base + pp > visible_gpus:
        raise ConfigError(f"parallel.pp={pp}: needs GPUs {base}..{base + pp - 1} but torch sees {visible_gpus} "
                          "(CUDA_VISIBLE_DEVICES); lower parallel.pp or use backend.device=cpu")
    return tuple(f"cuda:{base + r}" for r in range(pp))
