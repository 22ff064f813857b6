"""Build a simulation from a resolved config. Every check runs here, before
the simulation starts, so a bad config fails at start-up with one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import simpy
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sim.attention_model import SyntheticAttention
from sim.backend import SimBackend
from sim.calibrated_backend import CalibratedSimBackend
from sim.calibrated_cost import CalibratedCostModel, measured_links
from sim.calibration import configured_table
from sim.cost_model import CostModel
from sim.driver import SimDriver
from sim.hardware import Machine
from sim.route_signals import BETA_DEFAULTS, SyntheticSignals
from sim.routing_cost import RoutingCost
from sim.workload import Workload, WorkloadConfig
from wicore.engine import Engine
from wicore.errors import ConfigError
from wicore.hal import HardwareSpec, hardware_from_config
from wicore.memory.manager import TieredWeights, check_policy_params
from wicore.memory.page_pool import PagePool
from wicore.memory.placement import MemoryConfig, StaticPlacement
from wicore.metrics import SLO, Recorder
from wicore.model.spec import ModelSpec
from wicore.paths import resolve_config_path
from wicore.routing.router import MoRRouter, RoutingConfig
from wicore.routing_quality import load_quality_table
from wicore.scheduler.scheduler import Scheduler


@dataclass
class Parallel:
    replicas: int
    tp: int
    pp: int

    def describe(self) -> str:
        return f"{self.replicas}x(tp{self.tp},pp{self.pp})"


@dataclass
class SimSetup:
    env: simpy.Environment
    driver: SimDriver
    engines: list[Engine]
    recorder: Recorder
    hw: HardwareSpec
    model: ModelSpec
    parallel: Parallel
    cost: CostModel
    placements: list[StaticPlacement]
    workload: Workload
    slo: SLO
    max_num_seqs: int


def plain(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        out = OmegaConf.to_container(node, resolve=True)
        assert isinstance(out, dict)
        return out  # type: ignore[return-value]
    return dict(node)


def resolve_model(cfg: Any, hw: HardwareSpec) -> ModelSpec:
    data = plain(cfg)
    if data.get("dtype", "auto") == "auto":
        data["dtype"] = "bf16" if hw.gpu.supports_bf16 else "fp16"
    return ModelSpec.from_config(data)


def resolve_parallel(cfg: Any, hw: HardwareSpec) -> Parallel:
    replicas = int(cfg.get("replicas", 1))
    pp = int(cfg.get("pp", 1))
    tp = cfg.get("tp")
    if replicas < 1 or pp < 1:
        raise ConfigError(f"parallel: replicas and pp must be >= 1, got replicas={replicas} pp={pp}")
    if tp is None:
        if hw.num_gpus % (replicas * pp):
            raise ConfigError(f"parallel: {hw.num_gpus} GPUs cannot be split into replicas={replicas} x pp={pp}")
        tp = hw.num_gpus // (replicas * pp)
    tp = int(tp)
    if replicas * tp * pp != hw.num_gpus:
        raise ConfigError(f"parallel: replicas*tp*pp = {replicas}*{tp}*{pp} must equal hardware.num_gpus="
                          f"{hw.num_gpus}")
    return Parallel(replicas, tp, pp)


def memory_config(cfg: DictConfig) -> MemoryConfig:
    """The placement budget fields of ``memory`` (the manager's other fields are read where used)."""
    return MemoryConfig(**{k: v for k, v in plain(cfg.memory).items() if k in MemoryConfig.__dataclass_fields__})


def pick(table: Any, name: str, field: str) -> Any:
    """Instantiate entry ``name`` of a ``{name: {_target_: ...}}`` table."""
    if name not in table:
        raise ConfigError(f"{field}: unknown '{name}', use one of {sorted(table)}")
    return instantiate(table[name])


def make_router(cfg: DictConfig, model: ModelSpec) -> MoRRouter | None:
    """The token router of one replica (``routing`` group), or None when routing is off. Every
    routing field is checked here, at start-up; each call returns a router with its own state."""
    rc = cfg.get("routing")
    if rc is None or not bool(rc.get("enabled", False)):
        return None
    conf = RoutingConfig(threshold=rc.threshold, cpu_depth=rc.cpu_depth, gpu_depth=rc.gpu_depth,
                         shallow_device=str(rc.shallow_device), scorer=str(rc.scorer)).validate(model.num_layers)
    factory = pick(rc.scorers, conf.scorer, "routing.scorer")
    if rc.get("quality_table"):
        load_quality_table(resolve_config_path(str(rc.quality_table)))  # fail at start-up, not after the run
    return MoRRouter(conf, factory())


def make_route_signals(cfg: DictConfig) -> SyntheticSignals:
    """Synthetic routing signals for the simulator (``routing.signals_table`` or the Beta model)."""
    rc = cfg.routing
    table = rc.get("signals_table")
    params = plain(rc.get("signals") or {})
    unknown = sorted(set(params) - set(BETA_DEFAULTS))
    if unknown:
        raise ConfigError(f"routing.signals: unknown field(s) {unknown}; known fields are {list(BETA_DEFAULTS)}")
    shapes = {k: float(params.get(k, d)) for k, d in BETA_DEFAULTS.items()}
    return SyntheticSignals(seed=int(rc.seed), table=str(table) if table is not None else None,
                            difficulty_a=shapes["difficulty_a"], difficulty_b=shapes["difficulty_b"],
                            concentration=shapes["concentration"])


def make_scheduler(cfg: DictConfig, model: ModelSpec, pool: PagePool, swap: PagePool | None) -> Scheduler:
    sc = cfg.scheduler
    return Scheduler(
        batching=pick(sc.batching_policies, sc.batching, "scheduler.batching"),
        queue=pick(sc.queue_policies, sc.queue, "scheduler.queue"),
        pool=pool, max_num_seqs=int(sc.max_num_seqs), max_batched_tokens=int(sc.max_batched_tokens),
        max_context=model.max_context, preemption=str(sc.preemption), swap_pool=swap)


def load_workload(cfg: DictConfig, model: ModelSpec) -> Workload:
    wl_cfg = WorkloadConfig.from_config(plain(cfg.workload))
    if wl_cfg.kind != "trace":
        longest = wl_cfg.prompt.upper_bound() + wl_cfg.output.upper_bound()
        if longest > model.max_context:
            raise ConfigError(f"workload: prompt + output can reach {longest} tokens, more than the model's "
                              f"context model.max_context={model.max_context}; lower workload.prompt/output")
    return Workload(wl_cfg)


def make_placement(cfg: DictConfig, model: ModelSpec, hw: HardwareSpec, gpus: list[int], par: Parallel,
                   mem: MemoryConfig, replica: int) -> StaticPlacement:
    """The memory manager of one replica: ``memory.manager`` static or hmt."""
    mc = cfg.memory
    manager = str(mc.get("manager", "static"))
    name = f"replica{replica}"
    if manager == "static":
        return StaticPlacement(model, hw, gpus, par.tp, par.pp, mem, name=name)
    if manager != "hmt":
        raise ConfigError(f"memory.manager: unknown '{manager}', use static or hmt")
    policy = str(mc.policy)
    if policy not in mc.policies:
        raise ConfigError(f"memory.policy: unknown '{policy}', use one of {sorted(mc.policies)}")
    if policy in mc:
        check_policy_params(policy, plain(mc[policy]))
    formats = {k: (model.dtype if v == "auto" else v) for k, v in plain(mc.formats).items()}
    factory = instantiate(mc.policies[policy])
    kv = mc.get("kv") or {}
    kv_factory = None
    if kv.get("tiering", False):
        kv_policy = str(kv.get("policy") or policy)
        if kv_policy not in mc.policies:
            raise ConfigError(f"memory.kv.policy: unknown '{kv_policy}', use one of {sorted(mc.policies)}")
        kv_factory = instantiate(mc.policies[kv_policy])
    return TieredWeights(model, hw, gpus, par.tp, par.pp, mem, factory, formats, name=name,
                         kv_policy_factory=kv_factory, kv_host_gib=float(kv.get("host_gib", 0.0)),
                         kv_skip_below=float(kv.get("skip_below", 0.0)))


def build_sim(cfg: DictConfig, progress: Any = None) -> SimSetup:
    hw = hardware_from_config(plain(cfg.hardware))
    table = configured_table(cfg.backend.get("calibration"), hw.calibration,  # None: datasheet roofline
                             str(cfg.backend.get("calibration_statistic", "median")))
    links: dict[str, Any] = {}
    if table is not None:
        hw, links = measured_links(hw, table)
    model = resolve_model(cfg.model, hw)
    par = resolve_parallel(cfg.parallel, hw)
    mem = memory_config(cfg)
    sc = cfg.scheduler
    workload = load_workload(cfg, model)
    slo = SLO(**plain(cfg.slo))
    env = simpy.Environment()
    machine = Machine(env, hw, record=bool(cfg.backend.get("record_links", False)))
    kernels = int(cfg.backend.kernels_per_layer)
    if table is None:
        cost = CostModel(model, hw, tp=par.tp, pp=par.pp, kernels_per_layer=kernels)
    else:
        cost = CalibratedCostModel(model, hw, table, par.tp, par.pp, kernels,
                                   measure_attention=bool(cfg.backend.get("measure_attention", False)), links=links,
                                   max_num_seqs=int(cfg.scheduler.max_num_seqs))
    recorder = Recorder()
    engines, backends, placements = [], [], []
    per = par.tp * par.pp
    for r in range(par.replicas):
        gpus = list(range(r * per, (r + 1) * per))
        placement = make_placement(cfg, model, hw, gpus, par, mem, r)
        if placement.num_pages < 1:
            raise ConfigError("memory: no room for a single KV page; raise memory.kv_min_gib or "
                              "memory.gpu_memory_utilization")
        pool = PagePool(placement.num_pages, placement.page_tokens, placement.page_bytes)
        swap = PagePool(placement.host_swap_pages, placement.page_tokens, placement.page_bytes, "swap")
        scheduler = make_scheduler(cfg, model, pool, swap)
        router = make_router(cfg, model)
        if router is not None and table is not None:
            raise ConfigError("routing: the calibrated simulator (backend.calibration) does not cost routed "
                              "steps; set backend.calibration=null or routing=none")
        engines.append(Engine(scheduler, placement, recorder, replica=r, router=router))
        backend: SimBackend
        if isinstance(cost, CalibratedCostModel):  # static placement: every forward streams its layers again
            backend = CalibratedSimBackend(env, machine, cost, gpus, record_steps=int(cfg.report.trace_steps),
                                           restream=str(cfg.memory.get("manager", "static")) == "static")
        else:
            backend = SimBackend(env, machine, cost, gpus, record_steps=int(cfg.report.trace_steps))
        lookahead = cfg.memory.get("lookahead")
        if lookahead is not None:
            if int(lookahead) < 1:
                raise ConfigError(f"memory.lookahead: must be >= 1 layer or null, got {lookahead}")
            backend.lookahead = int(lookahead)
        if isinstance(placement, TieredWeights) and placement.kv is not None:
            backend.attention = SyntheticAttention(model.num_layers, model.num_global_layers,
                                                   model.sliding_window, placement.page_tokens,
                                                   seed=int(cfg.seed))
        if router is not None:
            rcfg = router.config
            backend.routing = RoutingCost(cost, rcfg.cpu_depth, router.gpu_depth, rcfg.shallow_device)
            backend.signals = make_route_signals(cfg)
        backends.append(backend)
        placements.append(placement)
    balancer = pick(cfg.parallel.balancers, cfg.parallel.balancer, "parallel.balancer")
    max_time = cfg.get("max_time_s")
    driver = SimDriver(env, engines, backends, balancer, workload,
                       max_time_s=float(max_time) if max_time is not None else None, progress=progress)
    return SimSetup(env, driver, engines, recorder, hw, model, par, cost, placements, workload, slo,
                    int(sc.max_num_seqs))
