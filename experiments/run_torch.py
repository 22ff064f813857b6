"""Run an experiment on the real PyTorch runtime: the same engine, scheduler and
result schema as the simulator, on the device torch gives us."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from experiments.build import load_workload, make_router, make_scheduler, memory_config, plain
from experiments.run import write_results
from sim.workload import Workload
from wicore.engine import Engine
from wicore.errors import ConfigError
from wicore.hal import HardwareSpec
from wicore.memory.page_pool import PagePool
from wicore.memory.placement import StaticPlacement
from wicore.metrics import SLO, Recorder
from wicore.model.spec import ModelSpec
from wicore.runtime.gc_freeze import frozen_gc
from wicore.types import Request

log = logging.getLogger("wicore")


@dataclass
class TorchSetup:
    engine: Engine
    backend: Any  # TorchBackend
    workload: Workload
    recorder: Recorder
    hw: HardwareSpec
    spec: ModelSpec
    placement: StaticPlacement
    t0: float
    pp: int = 1  # pipeline stages (backend: a PipelineBackend when > 1; close() it when done)
    warmup: dict[str, Any] | None = None  # what the warm-up ran (None: backend.warmup=false)


def torch_pipeline_depth(cfg: DictConfig) -> int:
    """``parallel.pp`` of a backend=torch run: one replica, no tensor parallelism on the real runtime."""
    par = cfg.get("parallel") or {}
    replicas, tp, pp = int(par.get("replicas", 1)), par.get("tp"), int(par.get("pp", 1))
    if replicas != 1:
        raise ConfigError(f"parallel.replicas={replicas}: backend=torch runs one model replica; "
                          "use parallel.replicas=1 (replicas are simulated by backend=sim)")
    if tp is not None and int(tp) != 1:
        raise ConfigError(f"parallel.tp={tp}: tensor parallelism is not implemented on the real runtime; "
                          "use parallel.tp=1 (pipeline parallelism: parallel=pp)")
    if pp < 1:
        raise ConfigError(f"parallel.pp: must be >= 1, got {pp}")
    return pp


def _build_pipeline(cfg: DictConfig, spec: ModelSpec, hw: HardwareSpec, placement: StaticPlacement,
                    devices: tuple[str, ...], workload: Workload, slots: int, max_len: int) -> TorchSetup:
    """pp > 1: spawn the other ranks, each builds its stage (its layers, KV cache, streamed layers)."""
    import torch

    from wicore.runtime import pipeline

    if bool((cfg.get("routing") or {}).get("enabled", False)):
        raise ConfigError("routing.enabled: MoR routing is not implemented with parallel.pp > 1 on the real "
                          "runtime; use routing.enabled=false or parallel.pp=1")
    bc, mem = cfg.backend, memory_config(cfg)
    pcfg = pipeline.PipelineConfig(
        spec=spec, devices=devices, slots=slots, max_len=max_len,
        streamed=tuple(tuple(layer for layer, _ in p.streamed) for p in placement.placements),
        seed=int(cfg.seed), checkpoint=str(cfg.checkpoint) if cfg.get("checkpoint") else None,
        host_format=str(bc.get("host_format") or "auto"), stream_buffers=mem.stream_buffer_layers,
        measure_attention=bool(bc.measure_attention), page_tokens=mem.page_tokens, threads=torch.get_num_threads(),
        cuda_graphs=cuda_graphs_enabled(bc.get("cuda_graphs", False), torch.device(devices[0])))
    if cuda_graphs_enabled(bc.get("prefill_graphs", False), torch.device(devices[0]), "backend.prefill_graphs"):
        log.warning("backend.prefill_graphs: prefill graphs are not implemented with parallel.pp > 1; the stages "
                    "prefill eagerly (their decode forwards follow backend.cuda_graphs)")
    pool = PagePool(slots * max_len // mem.page_tokens, mem.page_tokens, placement.page_bytes)
    recorder = Recorder()
    engine = Engine(make_scheduler(cfg, spec, pool, None), placement, recorder)
    backend = pipeline.launch(pcfg)
    # warmed up as one GPU is (otherwise the first step through the ranks pays their lazy set-up: first steps of
    # 0.62-1.13 s on 2 H200s against 30-42 ms later), with greedy requests, which leave the last rank's sampling
    # generator untouched
    try:
        warmed = _warm_up(cfg, backend, workload, max_len) if bool(bc.get("warmup", True)) else None
    except BaseException:  # a rank failed during the warm-up: stop the others before reporting it
        backend.close()
        raise
    t0 = time.perf_counter()
    backend.t0 = t0
    return TorchSetup(engine, backend, workload, recorder, hw, spec, placement, t0, len(devices), warmup=warmed)


def _mor_runtime(cfg: DictConfig, router: Any, model: Any, cache: Any) -> Any:
    """The real runtime's side of MoR routing: routed decode rows and the learned router's weights."""
    from wicore.model.router_weights import has_router, load_router
    from wicore.runtime.mor import MoRRuntime

    rc = router.config
    weights = None
    if cfg.get("checkpoint") and has_router(str(cfg.checkpoint)):
        w = load_router(str(cfg.checkpoint), model.spec, cache.device)
        if rc.scorer == "learned" or rc.cpu_depth in w.depths:  # learned: a router for cpu_depth must exist
            i = w.index(rc.cpu_depth)
            weights = (w.weight[i], w.bias[i])
    elif rc.scorer == "learned":
        raise ConfigError("routing.scorer=learned needs a checkpoint with a fitted router (router.safetensors; "
                          "python -m experiments.train_small writes one): give checkpoint=<dir> or another "
                          "routing.scorer (confidence, entropy, attention, random)")
    return MoRRuntime(model, cache, rc.cpu_depth, rc.gpu_depth, rc.shallow_device, weights)


def kv_page_budget(cfg: DictConfig, slots: int, max_len: int, page_tokens: int, pp: int) -> int:
    """KV pages the scheduler may hand out: ``backend.kv_pages``, or (null) as many as the slots hold.
    Fewer pages than the slots hold make the scheduler preempt (``scheduler.preemption``) when they run
    out, as on a device whose KV budget is smaller than its slots."""
    full = slots * max_len // page_tokens
    value = cfg.backend.get("kv_pages")
    if value is None:
        return full
    pages = int(value)
    if pp > 1:
        raise ConfigError(f"backend.kv_pages={pages}: a KV page budget below the slots is not implemented with "
                          "parallel.pp > 1 on the real runtime; use backend.kv_pages=null or parallel.pp=1")
    if not 1 <= pages <= full:
        raise ConfigError(f"backend.kv_pages={pages}: must be between 1 and the {full} pages of {page_tokens} "
                          f"tokens that {slots} slots (scheduler.max_num_seqs) of backend.max_len={max_len} "
                          "tokens hold, or null (= all of them)")
    return pages


def cuda_graphs_enabled(value: Any, device: Any, key: str = "backend.cuda_graphs") -> bool:
    """``backend.cuda_graphs`` / ``backend.prefill_graphs``: true (graphs on CUDA, the same padded path eagerly
    elsewhere), false, or auto (on for CUDA devices only). Routing and NVMe weight streaming always run eagerly;
    layers streamed from host memory run on the streamer's graph-safe schedule so the graphs capture them."""
    text = str(value).lower()
    if text not in ("true", "false", "auto"):
        raise ConfigError(f"{key}: '{value}' is not one of true, false, auto")
    return text == "true" or (text == "auto" and device.type == "cuda")


def build_torch(cfg: DictConfig) -> TorchSetup:
    """Load (or build) the model and wire engine + TorchBackend; every check runs here."""
    import torch

    from wicore.devices import probe, resolve_device
    from wicore.model.checkpoint import checkpoint_fill, load_checkpoint, spec_from_checkpoint
    from wicore.model.kv_cache import KVCache
    from wicore.model.transformer import Transformer, build_model, preferred_dtype_name, to_torch_dtype
    from wicore.runtime.backend import TorchBackend

    bc = cfg.backend
    device = resolve_device(str(bc.device), "backend.device", "backend.device=cpu")
    want_graphs = cuda_graphs_enabled(bc.get("cuda_graphs", False), device)
    want_prefill_graphs = cuda_graphs_enabled(bc.get("prefill_graphs", False), device, "backend.prefill_graphs")
    hw = probe(measure=False)
    budget = bc.get("gpu_budget_gib")
    if budget is not None:  # emulate a smaller GPU (e.g. a 16 GB T10 on an 80 GB card)
        if float(budget) <= 0:
            raise ConfigError(f"backend.gpu_budget_gib: must be > 0 (or null), got {budget}")
        hw = replace(hw, gpu=replace(hw.gpu, memory_gib=float(budget)))
    data = plain(cfg.model)
    if data.get("dtype", "auto") == "auto":
        data["dtype"] = preferred_dtype_name(device)
    if cfg.get("checkpoint"):
        spec = spec_from_checkpoint(str(cfg.checkpoint), data["dtype"])
    else:
        spec = ModelSpec.from_config(data)
    pp = torch_pipeline_depth(cfg)
    if pp > 1 and str(cfg.scheduler.preemption) == "swap":
        raise ConfigError("scheduler.preemption=swap: KV swapping is not implemented with parallel.pp > 1 on the "
                          "real runtime; use scheduler.preemption=recompute or parallel.pp=1")
    if pp > 1:
        from wicore.runtime.pipeline import pipeline_devices

        devices = pipeline_devices(device, pp, spec.num_layers, torch.cuda.device_count())
    mem = memory_config(cfg)
    placement = StaticPlacement(spec, hw, list(range(pp)), 1, pp, mem)  # decides before anything is allocated
    store = None
    if placement.offload_tier == "nvme":  # the streamed layers live on the drive (int4, or int8), read every forward
        from wicore.runtime.nvme_store import NvmeStore
        from wicore.runtime.offload import nvme_host_format

        nvme_host_format(bc.get("host_format"))  # float formats are refused before anything is written
        if pp > 1:
            raise ConfigError(f"memory.offload_to: {placement.offloaded_bytes / 2**30:.1f} GiB of weights go to the "
                              "NVMe tier, which the real runtime implements for parallel.pp=1 only; use "
                              "parallel.pp=1, memory.offload_to=cpu (if host memory holds them) or raise "
                              "backend.gpu_budget_gib")
        store = NvmeStore(bc.get("nvme_dir"))  # a directory we cannot write fails here, naming backend.nvme_dir
    slots = int(cfg.scheduler.max_num_seqs)
    max_len = min(int(bc.max_len), spec.max_context)
    workload = load_workload(cfg, spec)
    if workload.max_total_tokens() > max_len:
        raise ConfigError(f"workload: a request can reach {workload.max_total_tokens()} tokens but a KV slot "
                          f"holds backend.max_len={max_len}; raise backend.max_len or shorten the workload")
    if not cfg.get("checkpoint") and spec.weight_bytes > 0.5 * hw.cpu.memory_bytes:
        raise ConfigError(f"model={spec.name}: random weights for {spec.weight_bytes / 2**30:.0f} GiB would not fit "
                          f"this host's {hw.cpu.dram_gib:.0f} GiB; give checkpoint=<dir> or a small spec "
                          "(model=tiny-gemma3)")
    kv_pages = kv_page_budget(cfg, slots, max_len, mem.page_tokens, pp)
    if pp > 1:
        return _build_pipeline(cfg, spec, hw, placement, devices, workload, slots, max_len)
    home = torch.device("cpu") if placement.offloading else device  # streamed layers stay on the host
    fill = None
    if cfg.get("checkpoint") and store is not None:
        # NVMe tier: a meta model whose tensors are read one at a time while the streamer writes the streamed
        # layers to the drive, so host memory never holds the whole model
        spec, fill = checkpoint_fill(str(cfg.checkpoint), data["dtype"])
        with torch.device("meta"):
            model = Transformer(spec).to(dtype=to_torch_dtype(spec.dtype)).eval()
    elif cfg.get("checkpoint"):
        model, spec = load_checkpoint(str(cfg.checkpoint), device=home, dtype=to_torch_dtype(data["dtype"]))
    else:
        model = build_model(spec, device=home, dtype=spec.dtype, seed=int(cfg.seed))
    router = make_router(cfg, spec)
    # graphs capture the streamed layers too, on the streamer's graph-safe schedule (not from the NVMe tier)
    graph_safe = router is None and store is None
    streamer = None
    if placement.offloading:
        from wicore.runtime.offload import offload_model

        streamed = [layer for layer, _ in placement.placements[0].streamed]
        streamer = offload_model(model, streamed, device, host_format=str(bc.get("host_format") or "auto"),
                                 buffers=mem.stream_buffer_layers, lookahead=mem.stream_buffer_layers - 1,
                                 fill=fill, source="nvme" if store is not None else "host", store=store,
                                 schedule="forward" if graph_safe and (want_graphs or want_prefill_graphs) else "cycle")
    if bool(bc.get("fuse_projections", False)):  # one GEMM for q/k/v and one for gate/up (resident layers)
        from wicore.model.fuse import fuse_projections

        fuse_projections(model, device, skip_layers=set(streamer.order) if streamer is not None else set())
    # CUDA-graph decode: one extra KV slot is the scratch slot of the padding rows
    graphs = want_graphs and graph_safe
    cache = KVCache(spec, slots + int(graphs), max_len, device=device, dtype=to_torch_dtype(spec.dtype))
    pool = PagePool(kv_pages, mem.page_tokens, placement.page_bytes)
    swap = PagePool(placement.host_swap_pages, mem.page_tokens, placement.page_bytes, "swap")  # swap preemption
    recorder = Recorder()
    engine = Engine(make_scheduler(cfg, spec, pool, swap), placement, recorder, router=router)
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"seed": int(cfg.seed), "measure_attention": bool(bc.measure_attention),
                          "mor": _mor_runtime(cfg, router, model, cache) if router is not None else None,
                          "page_tokens": mem.page_tokens}
    kw.update(cuda_graphs=graphs, prefill_graphs=want_prefill_graphs and graph_safe)
    if streamer is None:
        backend = TorchBackend(model, cache, t0, **kw)
    else:
        from wicore.runtime.offload import StreamingTorchBackend

        backend = StreamingTorchBackend(model, cache, t0, streamer=streamer, **kw)
    warmed = _warm_up(cfg, backend, workload, max_len) if bool(bc.get("warmup", True)) else None
    if warmed is not None:
        t0 = backend.t0
    return TorchSetup(engine, backend, workload, recorder, hw, spec, placement, t0, warmup=warmed)


def _warm_up(cfg: DictConfig, backend: Any, workload: Any, max_len: int) -> dict[str, Any]:
    """Warm the backend up (``wicore.runtime.warmup``) with the run's longest prefill chunk and every decode
    batch size it can capture; the warm-up restarts the backend's clock and counters. Returns what ran."""
    from wicore.runtime.warmup import warm_up

    rows = int(cfg.scheduler.max_num_seqs)
    batches = list(backend.graph.buckets) if getattr(backend, "graph", None) is not None else [rows]
    longest = min(int(workload.prompts.max()), int(cfg.scheduler.max_batched_tokens))
    prefill = getattr(backend, "prefill_graph", None)
    sizes: list[int] = []
    if prefill is not None:  # every bucket a chunk of the run can pad to (chunks are at most `longest` tokens)
        top = prefill.bucket(longest) or longest
        sizes = [b for b in prefill.buckets if b <= top]
    return warm_up(backend, min(longest, max_len - len(batches) - 1), batches, sizes)


def run_torch(cfg: DictConfig, out: Path, progress_bar: bool = False,
              prompts: Sequence[list[int]] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on the real runtime and write its results to ``out``. ``prompts``: token ids of real
    prompts (request ``i`` gets ``prompts[i % len(prompts)]``, which also sets its prompt length);
    None: the workload's lengths with deterministic pseudo-random ids."""
    from wicore.runtime.driver import TorchDriver

    s = build_torch(cfg)
    if prompts:
        make = s.workload.request

        def with_prompt(i: int, arrival_time: float, user: int | None = None) -> Request:
            ids = list(prompts[i % len(prompts)])
            return replace(make(i, arrival_time, user), prompt_ids=ids, prompt_tokens=len(ids))

        s.workload.request = with_prompt  # type: ignore[method-assign]
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=s.workload.n, unit="req", desc=f"running on {s.backend.device}", mininterval=0.5)

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(n)

    try:
        driver = TorchDriver(s.engine, s.backend, s.workload, s.t0, progress=progress)
        with frozen_gc(bool(cfg.backend.get("gc_freeze", True))):  # full collections skip the set-up's objects
            # the clock starts here: the set-up since the warm-up and the freeze's one full collection (150-200 ms
            # in a process that has profiled or run before) stay off it, as they stay off the simulator's
            driver.t0 = s.backend.t0 = time.perf_counter()
            end = driver.run()
        if bar is not None:
            bar.close()
        device = ",".join(s.backend.cfg.devices) if s.pp > 1 else s.backend.device
        run_info = {"backend": "torch", "hardware": f"{s.hw.gpu.name} ({device})", "parallel": f"1x(tp1,pp{s.pp})",
                    "wall_s": end, "checkpoint": str(cfg.checkpoint) if cfg.get("checkpoint") else "random weights"}
        return write_results(cfg, out, s.recorder, s.hw, s.spec, SLO(**plain(cfg.slo)), end, run_info,
                             {**s.placement.describe(), **s.backend.describe(),
                              "warmup": s.warmup or "off"}, None)
    finally:
        if s.pp > 1:
            s.backend.close()
        if getattr(s.backend, "mor", None) is not None:
            s.backend.mor.close()
        if getattr(s.backend, "streamer", None) is not None:  # hooks off, NVMe reader stopped, its store removed
            s.backend.streamer.close()
