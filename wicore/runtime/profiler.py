"""Hardware profiler: measure what the real runtime spends per op and write a calibration table.

``wicore profile --model <config name | checkpoint dir> --device cuda --out calib.csv [--quick]``

Composite ops, timed through the code path ``TorchBackend.execute`` runs (the
same ``Transformer.forward`` with a ``KVCache`` of ``max_len`` tokens per slot,
the same input construction, in the model dtype, under ``inference_mode``):

* ``decode_forward`` (batch B x context C): one batched forward of B rows, each
  one token at position C;
* ``decode_forward_mass``: the same with the attention mass returned and read
  back per row (``backend.measure_attention=true``), host timed;
* ``prefill_forward`` (tokens T, context C): one forward of a T-token chunk of
  one request at positions [C, C + T);
* ``sample`` (batch rows): ``TorchBackend._sample`` (greedy rows: the argmax
  alone; otherwise ``sample`` with per-row parameters) + the step's one
  ``.tolist()`` sync + the token bookkeeping, host timed, for greedy requests;
* ``decode_step`` / ``decode_step_mass`` (batch x context) and ``prefill_step``
  (tokens x context): whole steps through ``TorchBackend.execute`` itself, timed
  by the interval the step reports (what a run's ``steps.parquet`` records):
  the forward, sampling, the host sync and the host work inside ``execute``.
  With ``cuda_graphs`` the backend decodes through its CUDA graphs, as a run
  with ``backend.cuda_graphs=true`` does (``decode_forward`` is then the graph
  replay). With ``prefill_graphs`` prefill steps run through the backend's
  prefill graphs (``GraphPrefill``), as with ``backend.prefill_graphs=true``,
  and the context-0 ``prefill_step`` points are the graph length buckets (so
  every chunk length a run pads to is a measured point). ``prefill_step_pair``:
  the same step with two prefill items of that length and context, from which
  the simulator takes what one more item adds to a step. The simulator prefers
  these to the composed forward + sample;
* ``prefill_step_many`` (tokens x context, ``grid.prefill_many`` items): the
  same step with that many items, from which the simulator takes what the
  third and later items add;
* ``step_overhead`` (batch running): host time between the end one step reports
  and the start of the next, on the real driver, engine and backend;
  ``engine_overhead``: the engine and driver alone, with a no-op backend;
  ``admit_overhead`` (batch admitted): the host time before a step that admits
  that many new requests right after as many finished (closed loop), which
  the simulator charges instead of ``step_overhead`` before such steps
  (``wicore.runtime.profile_overhead``).

Primitive ops (GEMMs, attention kernels, copies, disk) come from
``wicore.runtime.profile_primitives``. As a check of the decomposition, a few
whole decode steps are also timed through ``TorchBackend.execute`` itself and
compared, in the meta JSON, with decode_forward(_mass) + sample.

Timing: CUDA events on a GPU (host clock for ops that synchronise the host),
``perf_counter`` on the CPU; each point is the median of ``reps`` runs after
``warmup`` runs. Table format: ``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sim.calibration import CalibrationTable
from wicore import devices
from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.spec import ModelSpec
from wicore.model.transformer import Transformer, build_model, preferred_dtype_name, to_torch_dtype
from wicore.runtime.backend import TorchBackend
from wicore.runtime.buckets import prefill_buckets
from wicore.runtime.gc_freeze import frozen_gc
from wicore.runtime.graph_decode import GraphDecode
from wicore.runtime.profile_overhead import (
    engine_decode_times,
    measure_admit_gaps_on,
    measure_step_gaps,
    measure_step_overhead,
)
from wicore.runtime.profile_primitives import (
    MIB,
    profile_attention,
    profile_copies,
    profile_disk,
    profile_gemms,
)
from wicore.runtime.timing import interleaved, point, time_op
from wicore.types import BatchItem, Phase, Request, StepPlan, add_page_mass, kv_pages

REPO_ROOT = Path(__file__).resolve().parents[2]
Log = Callable[[str], None]


@dataclass(frozen=True)
class ProfileGrid:
    """The points to measure (capped at run time by ``max_len``, the model and device memory)."""

    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (16, 64, 256, 1024, 2048)
    prefill_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    prefill_context_points: tuple[tuple[int, int], ...] = ((64, 256), (256, 256), (64, 1024), (256, 1024))
    overhead_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    overhead_steps: int = 50
    primitives: bool = True
    gemm_tokens: tuple[int, ...] = (1, 8, 32, 128, 512, 2048)
    attn_batches: tuple[int, ...] = (1, 8, 32)
    attn_contexts: tuple[int, ...] = (256, 1024, 2048)
    attn_prefill_tokens: tuple[int, ...] = (128, 512, 2048)
    copy_sizes: tuple[int, ...] = tuple(MIB * 4**k for k in range(6))  # 1 MiB .. 1 GiB
    disk_sizes: tuple[int, ...] = (64 * MIB, 256 * MIB)
    check_points: tuple[tuple[int, int], ...] = ((1, 256), (8, 256), (32, 1024))  # whole decode steps (B, C)
    steps: bool = True  # decode_step(_mass) / prefill_step through TorchBackend.execute
    # decode_step(_mass) as the real engine + driver drive them (a short run per batch and context, as runs record
    # their steps) instead of a backend stepping a fixed batch at one position among the other points
    engine_steps: bool = False
    # prefill_step_many: one step of this many prefill items (0 or <= 2: not measured), for what the third and later
    # items of a step add
    prefill_many: int = 8
    rounds: int = 4  # forwards and steps: the reps of all points of an op spread over rounds (timing.interleaved)
    reps: int = 20
    warmup: int = 3

    @property
    def admit_rounds(self) -> int:
        """``admit_overhead`` gaps per batch: a fifth of ``overhead_steps`` (each takes two steps), at least 3."""
        return max(3, self.overhead_steps // 5)

    @classmethod
    def quick(cls) -> ProfileGrid:
        """A small grid: a CPU run on tiny-gemma3 takes seconds."""
        return cls(decode_batches=(1, 2, 4, 8), decode_contexts=(16, 64, 256),
                   prefill_tokens=(16, 32, 64, 128, 256), prefill_context_points=((32, 128), (64, 128)),
                   overhead_batches=(1, 2, 4, 8), overhead_steps=20, gemm_tokens=(1, 8, 32, 128),
                   attn_batches=(1, 8), attn_contexts=(64, 256), attn_prefill_tokens=(64, 256),
                   copy_sizes=(MIB, 4 * MIB, 16 * MIB), disk_sizes=(16 * MIB,), check_points=((4, 64),),
                   rounds=1, reps=7, warmup=2)


@dataclass
class _Run:
    model: Transformer
    spec: ModelSpec
    name: str
    dtype: str
    device: torch.device
    device_name: str
    cache: KVCache
    grid: ProfileGrid
    log: Log
    cuda_graphs: bool = False
    prefill_graphs: bool = False
    streamer: Any = None  # a LayerStreamer when profiling under a GPU budget (streamed layers)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, op: str, seconds: list[float], **coords: int) -> None:
        self.rows.append(point(op, self.name, self.dtype, self.device_name, seconds, **coords))


# ----- setup -----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    return devices.resolve_device(name, "profile --device", "--device cpu")


def _auto_dtype(dtype: str | None, device: torch.device) -> str | None:
    return dtype if dtype not in (None, "auto") else preferred_dtype_name(device)


def resolve_spec(source: ModelSpec | str | Path, device: torch.device,
                 dtype: str | None = None) -> tuple[ModelSpec, str, Path | None]:
    """(spec, description, checkpoint directory or None) of a ModelSpec, a checkpoint directory, a model config
    name of ``conf/model`` or the path of such a YAML file; nothing is built."""
    if isinstance(source, ModelSpec):
        spec = source if dtype in (None, "auto") else source.with_dtype(str(dtype))
        return spec, f"spec {spec.name} (random weights)", None
    path = Path(source)
    if path.is_dir():
        from wicore.model.checkpoint import spec_from_checkpoint

        dt = _auto_dtype(dtype, device)
        return spec_from_checkpoint(str(path), dt or "auto"), f"checkpoint {path}", path
    yml = path if path.suffix in (".yaml", ".yml") else REPO_ROOT / "conf" / "model" / f"{source}.yaml"
    if not yml.is_file():
        raise ConfigError(f"profile --model: '{source}' is neither a checkpoint directory nor a model config "
                          f"(looked for {yml}); use a name of conf/model/ or a checkpoint path")
    data = yaml.safe_load(yml.read_text())
    data["dtype"] = _auto_dtype(dtype if dtype not in (None, "auto") else data.get("dtype", "auto"), device)
    return ModelSpec.from_config(data), f"config {yml.name} (random weights)", None


def load_model(source: ModelSpec | str | Path, device: torch.device, dtype: str | None = None,
               seed: int = 0) -> tuple[Transformer, ModelSpec, str]:
    """(model, spec, description) from a ModelSpec (random weights), a checkpoint directory, a model config
    name of ``conf/model`` or the path of such a YAML file."""
    spec, description, checkpoint = resolve_spec(source, device, dtype)
    if checkpoint is not None:
        from wicore.model.checkpoint import load_checkpoint

        model, spec = load_checkpoint(checkpoint, device=device, dtype=_auto_dtype(dtype, device))
        return model.eval(), spec, description
    return build_model(spec, device, spec.dtype, seed=seed), spec, description


def _stream(model: Transformer, spec: ModelSpec, device: torch.device, budget_gib: float,
            notes: dict[str, Any], graphs: bool = False) -> tuple[Any, list[int]]:
    """Stream the layers the static placement (default memory config) leaves off a GPU of ``budget_gib``
    from host memory, as ``backend.gpu_budget_gib`` does on the real runtime (``graphs``: on the graph-safe
    schedule, as runs with CUDA graphs do)."""
    from wicore.memory.placement import MemoryConfig, StaticPlacement
    from wicore.runtime.offload import offload_model

    if budget_gib <= 0:
        raise ConfigError(f"profile --gpu-budget-gib: must be > 0, got {budget_gib}")
    hw = devices.probe(measure=False)
    hw = replace(hw, gpu=replace(hw.gpu, memory_gib=float(budget_gib)))
    mem = MemoryConfig()
    placement = StaticPlacement(spec, hw, [0], 1, 1, mem)
    streamed = [layer for layer, _ in placement.placements[0].streamed]
    if not streamed:
        notes["gpu_budget"] = f"{budget_gib} GiB holds every layer: nothing streamed"
        return None, []
    model.to("cpu")  # the streamer moves the resident part back and keeps the streamed layers on the host
    streamer = offload_model(model, streamed, device, host_format="auto", buffers=mem.stream_buffer_layers,
                             lookahead=mem.stream_buffer_layers - 1, schedule="forward" if graphs else "cycle")
    notes["gpu_budget"] = (f"{budget_gib} GiB: {len(streamed)} of {spec.num_layers} layers streamed from host "
                           "memory every forward (static placement, default memory config)")
    return streamer, streamed


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _kv_slots(spec: ModelSpec, device: torch.device, max_len: int, want: int, itemsize: int,
              notes: dict[str, Any]) -> int:
    """KV slots to allocate: ``want``, fewer when the device's free memory cannot hold them."""
    per_slot = 2 * spec.num_layers * spec.num_kv_heads * max_len * spec.head_dim * itemsize
    if device.type != "cuda":
        return want
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(0.6 * free // per_slot)
    if fit < 1:
        raise ConfigError(f"profile: one KV slot of max_len={max_len} tokens ({per_slot / 2**30:.2f} GiB) does not "
                          f"fit the {free / 2**30:.1f} GiB left after the weights; lower --max-len")
    if fit < want:
        notes["kv_slots_capped"] = f"{fit} slots fit the device memory: batches above {fit} were not measured"
    return min(fit, want)


# ----- composite ops -------------------------------------------------------------------------------
def _decode_fn(run: _Run, b: int, c: int, mass: bool, page_tokens: int,
               graph: GraphDecode | None = None) -> Callable[[], Any]:
    """One decode forward of ``b`` rows at position ``c``, built and called as TorchBackend.execute does
    (``graph``: through the CUDA-graph decoder, as with ``backend.cuda_graphs``)."""
    model, cache, dev = run.model, run.cache, run.device
    gen = torch.Generator().manual_seed(b * 7919 + c)
    toks = torch.randint(0, run.spec.vocab_size, (b,), generator=gen).tolist()
    rids = list(range(b))
    if graph is not None:
        return partial(graph.run, toks, [c] * b, rids)

    def fn() -> Any:
        x = torch.tensor([[t] for t in toks], device=dev)
        pos = torch.tensor([[c] for _ in rids], device=dev)
        slots = torch.tensor(rids, device=dev)
        out = model(x, pos, cache, slots, return_attention_mass=mass, last_only=True, page_size=page_tokens)
        if isinstance(out, tuple):
            logits, m = out
            feedback: dict[int, list[float]] = {}
            add_page_mass(feedback, rids, m.tolist(), [kv_pages(c + 1, page_tokens)] * b)
            return logits[:, -1]
        return out[:, -1]
    return fn


def _prefill_fn(run: _Run, t: int, c: int) -> Callable[[], Any]:
    model, cache, dev = run.model, run.cache, run.device
    ids = torch.randint(0, run.spec.vocab_size, (c + t,), generator=torch.Generator().manual_seed(t)).tolist()

    def fn() -> Any:
        x = torch.tensor([ids[c: c + t]], device=dev)
        pos = torch.arange(c, c + t, device=dev)[None, :]
        logits = model(x, pos, cache, torch.tensor([0], device=dev), last_only=True)
        return logits[:, -1]
    return fn


def _backend(run: _Run, batch: int, prompt: int, page_tokens: int, measure: bool,
             graphs: bool = False) -> TorchBackend:
    """A real TorchBackend over the run's model and cache with ``batch`` requests of ``prompt`` ids
    (``graphs``: decoding through CUDA graphs; the cache's last slot is their scratch slot)."""
    be: TorchBackend
    if run.streamer is not None:
        from wicore.runtime.offload import StreamingTorchBackend

        be = StreamingTorchBackend(run.model, run.cache, time.perf_counter(), streamer=run.streamer, seed=0,
                                   measure_attention=measure, page_tokens=page_tokens, cuda_graphs=graphs,
                                   prefill_graphs=run.prefill_graphs)
    else:
        be = TorchBackend(run.model, run.cache, time.perf_counter(), seed=0, measure_attention=measure,
                          page_tokens=page_tokens, cuda_graphs=graphs, prefill_graphs=run.prefill_graphs)
    for rid in range(batch):
        ids = torch.randint(0, run.spec.vocab_size, (prompt,), generator=torch.Generator().manual_seed(rid))
        be.add_request(Request(rid, 0.0, prompt, 1 << 30, prompt_ids=ids.tolist()))
    return be


def _sample_fn(run: _Run, b: int, page_tokens: int) -> Callable[[], Any]:
    """Sampling of ``b`` rows as TorchBackend.execute runs it: per-request parameters, one sample call (the
    argmax alone: the profiled requests are greedy, as the validation workloads are), the step's host sync
    (``.tolist()``), the token bookkeeping."""

    be = _backend(run, b, 1, page_tokens, False)
    logits = [torch.randn(b, run.spec.vocab_size, device=run.device)]
    rids = list(range(b))

    def fn() -> Any:
        new = be._sample(rids, torch.cat(logits)).tolist()
        out = {}
        for rid, tok in zip(rids, new):
            be.tokens[rid].append(tok)
            out[rid] = [tok]
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        return out
    return fn


def _check_steps(run: _Run, points: list[tuple[int, int]], page_tokens: int, measure: bool) -> list[dict[str, Any]]:
    """Whole decode steps through ``TorchBackend.execute`` vs the sum of their composite rows. A point the
    ``decode_step(_mass)`` grid measured already is read from its row; others are timed here."""
    out = []
    g = run.grid
    op = "decode_forward_mass" if measure else "decode_forward"
    whole = {(r["batch"], r["context"]): r["seconds"] for r in run.rows
             if r["op"] == ("decode_step_mass" if measure else "decode_step")}
    for b, c in points:
        step = whole.get((b, c))
        if step is None:
            be = _backend(run, b, c + g.reps + g.warmup + 2, page_tokens, measure, run.cuda_graphs)
            plan = StepPlan(1, 0, 0.0, [BatchItem(rid, Phase.DECODE, 1, c, True) for rid in range(b)])
            step = float(np.median(time_op(partial(be.execute, plan), run.device, g.reps, g.warmup, wall=True)))
        parts = {r["op"]: r["seconds"] for r in run.rows if (r["op"] == op and r["batch"] == b and r["context"] == c)
                 or (r["op"] == "sample" and r["batch"] == b)}
        composed = parts.get(op, math.nan) + parts.get("sample", math.nan)
        out.append({"op": op, "batch": b, "context": c, "execute_s": step, "composed_s": composed,
                    "error": composed / step - 1 if step > 0 else math.nan})
    return out


def _step_timer(be: TorchBackend, plans: dict[Any, StepPlan]) -> Callable[[Any, int, int], list[float]]:
    """A ``timing.interleaved`` timer of whole steps: ``plans[point]`` through ``be.execute``."""
    return lambda p, n, warmup: _step_times(be, plans[p], n, warmup)


def _step_times(be: TorchBackend, plan: StepPlan, reps: int, warmup: int,
                before: Callable[[], None] | None = None) -> list[float]:
    """Seconds of ``reps`` executions of ``plan`` after ``warmup`` ones, each the interval the step
    reports (``end - start`` of its StepResult: what a run records as the step's duration); ``before``
    runs ahead of every execution, outside the timed interval."""
    out = []
    for i in range(warmup + reps):
        if before is not None:
            before()
        r = be.execute(plan)
        if i >= warmup:
            out.append(r.end - r.start)
    return out


def prefill_step_ops(grid: ProfileGrid, slots: int) -> list[tuple[str, int]]:
    """The whole prefill steps to time, (op, items): one item, two, and ``grid.prefill_many`` when it is above two
    and the KV slots hold that many requests."""
    ops = [("prefill_step", 1), ("prefill_step_pair", 2)]
    if 2 < grid.prefill_many <= slots:
        ops.append(("prefill_step_many", grid.prefill_many))
    return ops


def step_contexts(contexts: Sequence[int], max_len: int, depth: int) -> list[int]:
    """Decode contexts of whole-step points whose requests get ``depth`` more tokens while they are timed:
    a context past ``max_len - depth`` is lowered to it rather than dropped, so a run that decodes near
    ``max_len`` interpolates up to a measured point instead of extrapolating flat from the next one down."""
    return sorted({min(int(c), max_len - depth) for c in contexts}) if max_len > depth else []


def decode_plans(batches: list[int], contexts: list[int]) -> dict[tuple[int, int], StepPlan]:
    """One decode step per (batch, context) point: requests 0..batch-1, one token each at ``context``."""
    return {(b, c): StepPlan(1, 0, 0.0, [BatchItem(rid, Phase.DECODE, 1, c, True) for rid in range(b)])
            for b in batches for c in contexts}


def profile_steps(run: _Run, batches: list[int], contexts: list[int], prefill: list[tuple[int, int]],
                  page_tokens: int) -> None:
    """``decode_step`` / ``decode_step_mass`` (batch x context), ``prefill_step`` and ``prefill_step_pair``
    (tokens x context; one and two prefill items): whole steps through ``TorchBackend.execute``, decoding
    (and prefilling) through CUDA graphs when the run's are on."""
    g = run.grid
    depth = g.reps + g.warmup + 2  # every timed execution appends one token per row
    for mass in (False, True):
        op = "decode_step_mass" if mass else "decode_step"
        run.log(f"{op}{' (CUDA graphs)' if run.cuda_graphs else ''}{' (engine-driven)' if g.engine_steps else ''}: "
                f"batch {batches} x context {contexts}")
        if g.engine_steps:
            be = _backend(run, 0, 1, page_tokens, mass, run.cuda_graphs)
            times = engine_decode_times(be, run.spec, batches, contexts, g.reps, g.warmup, page_tokens)
        else:
            be = _backend(run, max(batches), max(contexts) + depth, page_tokens, mass, run.cuda_graphs)
            plans = decode_plans(batches, contexts)
            times = interleaved(list(plans), _step_timer(be, plans), g.reps, g.warmup, g.rounds)
            for rid in range(max(batches)):
                be.release(rid)
        for (b, c), ts in times.items():
            run.add(op, ts, batch=b, context=c)
    for op, n in prefill_step_ops(g, run.cache.max_slots - int(run.cuda_graphs)):
        run.log(f"{op}{' (CUDA graphs)' if run.prefill_graphs else ''}: (tokens, context) {prefill}")
        be = _backend(run, n, max(t + c for t, c in prefill) + depth, page_tokens, False, run.cuda_graphs)
        for (t, c), ts in interleaved(prefill, _prefill_timer(be, n), g.reps, g.warmup, g.rounds).items():
            run.add(op, ts, batch=n, tokens=t, context=c)
        for rid in range(n):
            be.release(rid)


def _prefill_timer(be: TorchBackend, n: int) -> Callable[[Any, int, int], list[float]]:
    """A ``timing.interleaved`` timer of steps that prefill requests 0..n-1 with one (tokens, context) chunk each;
    at context 0 each execution starts them as new requests, as in a run (not as a restart, which zeroes the
    slot first)."""
    reqs = [be.requests[rid] for rid in range(n)]

    def restart() -> None:
        for r in reqs:
            be.release(r.request_id)
            be.add_request(r)

    def timer(p: Any, reps: int, warmup: int) -> list[float]:
        t, c = p
        plan = StepPlan(1, 0, 0.0, [BatchItem(r.request_id, Phase.PREFILL, t, c, True) for r in reqs])
        return _step_times(be, plan, reps, warmup, restart if c == 0 else None)
    return timer


def profile_composite(run: _Run, max_len: int, page_tokens: int) -> None:
    g, dev = run.grid, run.device
    slots = run.cache.max_slots - int(run.cuda_graphs)  # with graphs the last slot is the padding rows' scratch
    batches = [b for b in g.decode_batches if b <= slots]
    contexts = sorted({min(c, max_len - 1) for c in g.decode_contexts})
    for mass in (False, True):
        op = "decode_forward_mass" if mass else "decode_forward"
        graph = (GraphDecode(run.model, run.cache, None, mass, page_tokens, scratch_slot=slots)
                 if run.cuda_graphs else None)
        run.log(f"{op}{' (CUDA graphs)' if graph is not None else ''}: batch {batches} x context {contexts}")
        fns = {(b, c): _decode_fn(run, b, c, mass, page_tokens, graph) for b in batches for c in contexts}
        timer = (lambda p, n, w, fns=fns, mass=mass: time_op(fns[p], dev, n, w, wall=mass))  # noqa: E731
        for (b, c), ts in interleaved(list(fns), timer, g.reps, g.warmup, g.rounds).items():
            run.add(op, ts, batch=b, context=c)
        del graph, fns
    points = [(t, 0) for t in g.prefill_tokens if t <= max_len]
    points += [(t, c) for t, c in g.prefill_context_points if c + t <= max_len]
    run.log(f"prefill_forward: (tokens, context) {points}")
    pfns = {(t, c): _prefill_fn(run, t, c) for t, c in points}
    for (t, c), ts in interleaved(points, lambda p, n, w: time_op(pfns[p], dev, n, w), g.reps, g.warmup,
                                  g.rounds).items():
        run.add("prefill_forward", ts, batch=1, tokens=t, context=c)
    if g.steps:
        steps_at = points
        if run.prefill_graphs:  # every length bucket a chunk pads to (the forwards above keep the grid's)
            steps_at = [(t, 0) for t in prefill_buckets(max_len)] + [p for p in points if p[1] > 0]
        depth = g.reps + g.warmup + 2
        ok = [(t, c) for t, c in steps_at if t + c + depth <= max_len]
        profile_steps(run, batches, step_contexts(contexts, max_len, depth), ok, page_tokens)
    run.log(f"sample: batch {batches}")
    for b in batches:
        run.add("sample", time_op(_sample_fn(run, b, page_tokens), dev, g.reps, g.warmup, wall=True), batch=b)
    over = [b for b in g.overhead_batches if b <= slots]
    run.log(f"step_overhead (real backend), engine_overhead (no-op backend): batch {over}")
    for b in over:
        run.add("step_overhead", measure_step_gaps(run.model, run.cache, b, steps=g.overhead_steps,
                                                   warmup=g.warmup, prompt_tokens=16, page_tokens=page_tokens,
                                                   cuda_graphs=run.cuda_graphs),
                batch=b)
        run.add("engine_overhead", measure_step_overhead(run.spec, b, steps=g.overhead_steps, warmup=g.warmup,
                                                         page_tokens=page_tokens), batch=b)
    run.log(f"admit_overhead (real backend): batch {over}")
    be = _backend(run, 0, 1, page_tokens, True, run.cuda_graphs)  # decode and prefill as the run's backend does
    for b in over:
        run.add("admit_overhead", measure_admit_gaps_on(be, run.spec, b, rounds=g.admit_rounds,
                                                        prompt_tokens=16, page_tokens=page_tokens), batch=b)


def profile(spec_or_checkpoint: ModelSpec | str | Path, device: str | torch.device, out_csv: str | Path,
            grid: ProfileGrid | None = None, quick: bool = False, *, dtype: str | None = None,
            name: str | None = None, max_len: int = 2048, page_tokens: int = 16, seed: int = 0,
            threads: int | None = None, disk_dir: str | Path | None = None, log: Log | None = None,
            cuda_graphs: bool = False, gpu_budget_gib: float | None = None, prefill_graphs: bool = False,
            pp: int = 1) -> Path:
    """Measure the runtime's ops for a model on ``device`` and write ``out_csv`` + ``<out_csv>.meta.json``.

    ``grid``: the points (default: ``ProfileGrid()``, or ``ProfileGrid.quick()`` with ``quick``);
    ``name``: the model name the rows carry (default: the spec's; the simulator matches it against
    ``model.name``); ``max_len``: tokens per KV slot, as ``backend.max_len`` of the runs to mirror;
    ``threads``: torch CPU threads while profiling (None: as is; the runs to mirror must use the same);
    ``disk_dir``: where ``disk_read`` writes its temp files (default: the temp dir, often a tmpfs);
    ``cuda_graphs``: decode through CUDA graphs as runs with ``backend.cuda_graphs=true`` do (the
    decode ops and whole steps; on a CPU device the same padded path runs eagerly); ``gpu_budget_gib``: the
    GPU budget of the runs to mirror (``backend.gpu_budget_gib``): the layers the static placement streams
    under it are streamed from host memory, as the runtime does, so forwards and whole steps include the
    streaming (its copies and its host cost); ``prefill_graphs``: prefill steps through the prefill graphs
    as runs with ``backend.prefill_graphs=true`` do; ``pp`` > 1: whole pipeline-parallel steps on ``pp`` ranks from
    ``device`` on (``wicore.runtime.profile_pipeline``), as runs with ``parallel.pp`` do."""
    t_start = time.perf_counter()
    dev = resolve_device(device) if isinstance(device, str) else device
    threads_before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"profile --threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _profile(spec_or_checkpoint, dev, out_csv, grid, quick, dtype, name, max_len, page_tokens, seed,
                        disk_dir, log, t_start, cuda_graphs, gpu_budget_gib, prefill_graphs, pp)
    finally:
        torch.set_num_threads(threads_before)


def _profile(spec_or_checkpoint: ModelSpec | str | Path, dev: torch.device, out_csv: str | Path,
             grid: ProfileGrid | None, quick: bool, dtype: str | None, name: str | None, max_len: int,
             page_tokens: int, seed: int, disk_dir: str | Path | None, log: Log | None, t_start: float,
             cuda_graphs: bool = False, gpu_budget_gib: float | None = None, prefill_graphs: bool = False,
             pp: int = 1) -> Path:
    say: Log = log or (lambda msg: print(f"[profile] {msg}", file=sys.stderr))
    g = grid or (ProfileGrid.quick() if quick else ProfileGrid())
    if g.reps < 1 or g.warmup < 0:
        raise ConfigError(f"profile grid: reps must be >= 1 and warmup >= 0, got {g.reps}, {g.warmup}")
    if pp < 1:
        raise ConfigError(f"profile --pp: must be >= 1, got {pp}")
    if pp > 1:
        if prefill_graphs or gpu_budget_gib is not None:
            raise ConfigError(f"profile --pp {pp}: the pipeline prefills eagerly with every layer resident; drop "
                              "--prefill-graphs and --gpu-budget-gib (--cuda-graphs: decode through each stage's "
                              "graphs, as runs with backend.cuda_graphs=true)")
        from wicore.runtime.profile_pipeline import profile_pipeline

        spec, source, checkpoint = resolve_spec(spec_or_checkpoint, dev, dtype)
        max_len = min(int(max_len), spec.max_context)
        rows, extra = profile_pipeline(spec, checkpoint, dev, pp, g, name or spec.name, max_len, page_tokens, seed,
                                       say, cuda_graphs)
        meta = {**_run_meta(dev, name or spec.name, source, spec.dtype, max_len, page_tokens, quick, g, t_start),
                **extra, "cuda_graphs": bool(cuda_graphs), "prefill_graph_buckets": None, "gpu_budget_gib": None,
                "device_name": rows[0]["device_name"], "summary": {}}
        path = CalibrationTable.write(out_csv, rows, meta)
        say(f"wrote {len(rows)} rows to {path} in {meta['profile_s']} s")
        return path
    model, spec, source = load_model(spec_or_checkpoint, dev, dtype, seed)
    max_len = min(int(max_len), spec.max_context)
    notes: dict[str, Any] = {}
    streamer, streamed = (_stream(model, spec, dev, gpu_budget_gib, notes, cuda_graphs or prefill_graphs)
                          if gpu_budget_gib is not None
                          else (None, []))
    tdt = to_torch_dtype(spec.dtype)
    want = max([*g.decode_batches, *(b for b, _ in g.check_points), max(2, g.prefill_many) if g.steps else 1])
    slots = _kv_slots(spec, dev, max_len, want + int(cuda_graphs), torch.empty(0, dtype=tdt).element_size(),
                      notes) - int(cuda_graphs)
    cache = KVCache(spec, slots + int(cuda_graphs), max_len, device=dev, dtype=tdt)  # + the graphs' scratch slot
    dname = device_name(dev)
    run = _Run(model, spec, name or spec.name, spec.dtype, dev, dname, cache, g, say, cuda_graphs, prefill_graphs,
               streamer, notes=notes)
    say(f"{run.name} ({source}, {spec.dtype}) on {dname}: max_len {max_len}, {slots} KV slots"
        f"{', CUDA-graph decode' if cuda_graphs else ''}{', CUDA-graph prefill' if prefill_graphs else ''}")
    with torch.inference_mode(), frozen_gc():  # as runs time their steps (backend.gc_freeze)
        profile_composite(run, max_len, page_tokens)
        checks = [(b, c) for b, c in g.check_points if b <= slots and c < max_len]
        notes["execute_check"] = (_check_steps(run, checks, page_tokens, False)
                                  + _check_steps(run, checks, page_tokens, True))
        skipped: dict[str, str] = {}
        if g.primitives:
            say("primitives: GEMMs, attention, copies, disk")
            run.rows += profile_gemms(spec, dev, tdt, g.gemm_tokens, g.reps, g.warmup, run.name, spec.dtype, dname)
            run.rows += profile_attention(spec, dev, tdt, g.attn_batches,
                                          [s for s in g.attn_contexts if s <= max_len],
                                          [t for t in g.attn_prefill_tokens if t <= max_len], g.reps, g.warmup,
                                          run.name, spec.dtype, dname)
            copies, skipped = profile_copies(dev, g.copy_sizes, g.reps, g.warmup, dname)
            run.rows += copies
            disk, notes["disk_read"] = profile_disk(g.disk_sizes, max(3, g.reps // 4), dname, disk_dir)
            run.rows += disk
    meta = {**_run_meta(dev, run.name, source, spec.dtype, max_len, page_tokens, quick, g, t_start),
            "device_name": dname, "kv_slots": slots, "cuda_graphs": bool(cuda_graphs), "pp": 1,
            "prefill_graph_buckets": list(prefill_buckets(max_len)) if prefill_graphs else None,
            "gpu_budget_gib": gpu_budget_gib, "streamed_layers": streamed,
            "stream_schedule": ("forward" if streamer.per_forward else "cycle") if streamer is not None else None,
            "skipped": skipped, "notes": notes,
            "summary": summarize(run.rows)}
    path = CalibrationTable.write(out_csv, run.rows, meta)
    say(f"wrote {len(run.rows)} rows to {path} in {meta['profile_s']} s")
    return path


def _run_meta(dev: torch.device, name: str, source: str, dtype: str, max_len: int, page_tokens: int, quick: bool,
              grid: ProfileGrid, t_start: float) -> dict[str, Any]:
    """The meta entries every table has: what was measured, where, with which software, and how long it took."""
    return {"torch_version": torch.__version__, "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"), "device": str(dev), "model": name, "source": source, "dtype": dtype, "max_len": max_len,
        "page_tokens": page_tokens, "cuda": torch.version.cuda, "host": platform.platform(),
        "python": platform.python_version(), "threads": torch.get_num_threads(), "quick": quick, "grid": asdict(grid),
        "profile_s": round(time.perf_counter() - t_start, 2)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Headline figures of a profile: best achieved GEMM TFLOP/s and copy / disk bandwidths (GB/s)."""
    out: dict[str, float] = {}
    for r in rows:
        op = r["op"]
        if op.startswith("gemm_") and r["seconds"] > 0:
            # nbytes = N * K * itemsize, so flops = 2 * M * N * K = 2 * M * nbytes / itemsize
            itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}.get(r["dtype"], 2)
            tflops = 2 * r["tokens"] * r["nbytes"] / itemsize / r["seconds"] / 1e12
            out["gemm_tflops_max"] = max(out.get("gemm_tflops_max", 0.0), tflops)
        elif r["nbytes"] and r["seconds"] > 0 and not r["model"]:
            key = f"{op}_gbps_max"
            out[key] = max(out.get(key, 0.0), r["nbytes"] / r["seconds"] / 1e9)
    return out


def grid_with(grid: ProfileGrid, items: list[str]) -> ProfileGrid:
    """``grid`` with ``FIELD=VALUES`` overrides: integer fields take one integer, tuple-of-int fields a comma
    list, ``prefill_context_points`` / ``check_points`` pairs ``a:b`` (comma separated, empty for none)."""
    kinds = {f.name: f.type for f in fields(ProfileGrid)}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in kinds:
            raise ConfigError(f"profile --grid: '{item}' must be FIELD=VALUES with FIELD one of {sorted(kinds)}")
        kind = str(kinds[key])
        try:
            if kind == "bool":
                changes[key] = text.lower() in ("1", "true", "yes")
            elif kind == "int":
                changes[key] = int(text)
            elif "tuple[int, int]" in kind:
                changes[key] = tuple(tuple(int(x) for x in p.split(":")) for p in text.split(",") if p)
            else:
                changes[key] = tuple(int(x) for x in text.split(",") if x)
        except ValueError:
            raise ConfigError(f"profile --grid: cannot read '{item}' (integers, comma lists, a:b pairs)") from None
    return replace(grid, **changes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wicore profile", description="measure op costs and write a calibration table")
    ap.add_argument("--model", required=True, help="model config name (conf/model) or checkpoint directory")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:1 | cpu")
    ap.add_argument("--out", required=True, help="calibration table CSV to write (+ .meta.json)")
    ap.add_argument("--quick", action="store_true", help="small grid (seconds on CPU with tiny-gemma3)")
    ap.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: the model config's, auto)")
    ap.add_argument("--name", default=None, help="model name in the rows (default: the spec's name)")
    ap.add_argument("--max-len", type=int, default=2048, help="tokens per KV slot (backend.max_len)")
    ap.add_argument("--no-primitives", action="store_true", help="composite ops only")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--disk-dir", default=None, help="folder for the disk-read test (default: the temp dir)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="decode through CUDA graphs, as runs with backend.cuda_graphs=true do")
    ap.add_argument("--prefill-graphs", action="store_true",
                    help="prefill through CUDA graphs (length buckets), as runs with backend.prefill_graphs=true do")
    ap.add_argument("--pp", type=int, default=1,
                    help="pipeline stages: whole steps of a run with parallel.pp=N on N GPUs from --device on")
    ap.add_argument("--gpu-budget-gib", type=float, default=None,
                    help="GPU budget of the runs to mirror (backend.gpu_budget_gib): stream what does not fit")
    ap.add_argument("--grid", action="append", default=[], metavar="FIELD=VALUES",
                    help="override a grid field, e.g. decode_batches=1,4,16 or reps=10 (repeatable)")
    args = ap.parse_args(argv)
    grid = ProfileGrid.quick() if args.quick else ProfileGrid()
    if args.no_primitives:
        grid = replace(grid, primitives=False)
    try:
        grid = grid_with(grid, args.grid)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        profile(args.model, args.device, args.out, grid, quick=args.quick, dtype=args.dtype, name=args.name,
                max_len=args.max_len, threads=args.threads, disk_dir=args.disk_dir, cuda_graphs=args.cuda_graphs,
                gpu_budget_gib=args.gpu_budget_gib, prefill_graphs=args.prefill_graphs, pp=args.pp)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
