"""Pipeline-parallel execution of the engine's StepPlans over ``pp`` ranks (one process per device).

Rank 0 is the process that runs the engine and the driver: the same ``Engine``, the same plans as on
one GPU. It owns stage 0 (embedding + the first layers) and a ``PipelineBackend`` in place of the
``TorchBackend``. Ranks 1..pp-1 are worker processes started with ``torch.multiprocessing`` (spawn)
that each build only their stage (``wicore.runtime.stage``: their layers' tensors, their layers' KV
cache, their streamed layers in pinned host memory when the placement says so); the last one also
holds the final norm, the LM head (its own copy of the embedding matrix when tied) and the sampler.

One step (``PipelineBackend.execute``)::

    rank 0:  describe the step (ids, phases, positions, tokens, slots, sampling) --gloo--> every worker
             for each forward of the step (every prefill chunk alone, then the decode batch):
                 stage 0 -> hidden states --isend (NCCL / gloo)--> rank 1
    rank r:  recv hidden from r-1 -> its layers -> isend to r+1          (forwards overlap across ranks)
    last:    norm + head on the last positions -> sample -> tokens (+ attention mass) -> host
    workers: reply (status, streamed bytes, copy time; the last rank: tokens, mass) --gloo--> rank 0
    rank 0:  StepResult with the fields TorchBackend fills

Host syncs per step: none on rank 0 (it only waits for the replies on the gloo group), none on the
middle ranks, one on the last rank (its tokens and attention mass, copied to the host together).
Attention mass (``measure_attention``) is summed over the stages' layers: each stage adds its
layers' mass to the running sum it received and sends it on, so the last rank's pages equal the
single-GPU ones. Greedy tokens equal the single-GPU run with the same config and seed (and the same
device type: the random init and the sampler's generator are device-type specific).

Failure handling: every control receive has a timeout (``step_timeout_s``; workers idle up to
``idle_timeout_s`` between steps); a worker that raises replies with its traceback and stops; one that
dies closes its sockets, so rank 0's receive raises at once; rank 0 turns either into a
``PipelineError`` naming the rank, and ``close()`` stops the workers (a stop message, then kill after a
grace period) and destroys the process group. Rank 0 dying closes the workers' sockets too, so they
exit. ``PipelineConfig.fault`` injects a failure on one rank (tests of these paths).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wicore.errors import ConfigError
from wicore.runtime.backend import TorchBackend
from wicore.runtime.pipeline_config import Fault, PipelineConfig, pipeline_devices
from wicore.runtime.pipeline_wire import (
    CONFIG_FAILED,
    RESET,
    STAT_FIELDS,
    STATS,
    STOP,
    Control,
    PipelineError,
    StepDescription,
    decode_json,
    error_of,
)
from wicore.runtime.pipeline_worker import (
    StageExecutor,
    build_rank_stage,
    destroy_group,
    init_dist,
    leave_group_within,
    stop_processes,
    worker_main,
)
from wicore.runtime.stage import Stage
from wicore.types import BatchItem, OpTiming, Phase, StepPlan, StepResult, add_page_mass, kv_pages

__all__ = ["Fault", "PipelineBackend", "PipelineConfig", "PipelineError", "launch", "pipeline_devices"]


# ----- rank 0 ---------------------------------------------------------------------------------------
class PipelineBackend(TorchBackend):
    """The engine's backend on rank 0: same interface and ``StepResult`` fields as ``TorchBackend``.

    Request bookkeeping (token lists, KV slots, random prompts) is ``TorchBackend``'s; ``execute`` runs
    stage 0 here and the rest on the workers. Weight fetch ops of the plan are carried out by each
    stage's ``LayerStreamer`` (as ``StreamingTorchBackend`` does): ``link_bytes`` is the bytes every
    GPU streamed in this step, ``transfer_s`` the copy time measured on all of them (summed over the
    links), one ``fetch`` op per streaming rank on ``pcie<rank>``. Create with ``launch``.
    """

    def __init__(self, cfg: PipelineConfig, stage: Stage, ctl: Control, procs: list[Any], tmpdir: str,
                 clock_start: float = 0.0) -> None:
        super().__init__(stage.model, stage.cache, clock_start, seed=cfg.seed,
                         measure_attention=cfg.measure_attention, page_tokens=cfg.page_tokens)
        self.cfg, self.stage, self.ctl, self.procs = cfg, stage, ctl, procs
        self.executor = StageExecutor(stage, 0, cfg)
        self.free_slots = list(range(cfg.slots - 1, -1, -1))  # not the stage graphs' scratch slot past them
        self.steps = 0
        self.broken: str | None = None
        self.closed = False
        self._tmpdir = tmpdir
        self._finalizer = weakref.finalize(self, stop_processes, procs, 0.0)

    @property
    def pp(self) -> int:
        return self.cfg.pp

    # ----- one step --------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        if self.closed or self.broken:
            raise PipelineError(f"pipeline: not usable ({'closed' if self.closed else self.broken})")
        if any(op.op in ("swap_out", "swap_in") for op in plan.memory_ops):
            raise ConfigError("scheduler.preemption=swap: KV swapping is not implemented with parallel.pp > 1 "
                              "on the real runtime; use scheduler.preemption=recompute or parallel.pp=1")
        self.steps += 1
        try:
            return self._execute(plan)
        except Exception as e:
            err = self._diagnose(e)
            self.broken = str(err).splitlines()[0]
            if err is e:
                raise
            raise err from e
        except BaseException:  # interrupted half-way: the ranks are out of step
            self.broken = "interrupted during a step"
            raise

    def _describe_step(self, plan: StepPlan) -> tuple[StepDescription, list[int], list[BatchItem]]:
        rows: list[list[int]] = []
        ids: list[int] = []
        emit: list[int] = []
        dec: list[BatchItem] = []
        for it in plan.items:
            if it.phase is not Phase.PREFILL:
                continue
            rid, ctx, n = it.request_id, it.context_len, it.num_tokens
            free = ctx == 0 and rid in self.slots
            rows.append([rid, 0, ctx, n, int(it.emits_token), self._slot(rid), int(free)])
            ids += self.tokens[rid][ctx:ctx + n]
            if it.emits_token:
                emit.append(rid)
        for it in plan.items:
            if it.phase is Phase.DECODE:
                rid = it.request_id
                rows.append([rid, 1, it.context_len, 1, 1, self._slot(rid), 0])
                ids.append(self.tokens[rid][it.context_len])
                emit.append(rid)
                dec.append(it)
        sampling = [(float((self.requests[r].sampling or {}).get("temperature", 0.0)),
                     float((self.requests[r].sampling or {}).get("top_k", 0)),
                     float((self.requests[r].sampling or {}).get("top_p", 1.0))) for r in emit]
        return StepDescription.build(plan.step_id, rows, ids, sampling), emit, dec

    def _execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter() - self.t0
        desc, emit, dec = self._describe_step(plan)
        sends: list[Any] = []
        for r in range(1, self.pp):
            sends += self.ctl.send(r, desc.header(), desc.payload)
        if self.cfg.fault is not None:
            self.cfg.fault.trigger(0, self.steps)
        self.executor.run(desc)
        replies = [self._reply(r, f"step {plan.step_id}") for r in range(1, self.pp)]
        self.executor.flush()
        self.ctl.wait(sends)
        result = StepResult(plan.step_id, start, start)
        head, floats, _ = replies[-1]
        n_tok, n_rows, n_pages = head[4], head[5], head[6]
        values = floats[STAT_FIELDS:].tolist()  # CPU tensors: no device sync
        for rid, tok in zip(emit, values[:n_tok]):
            self.tokens[rid].append(int(tok))
            result.tokens[rid] = [int(tok)]
        if n_rows:
            mass = values[n_tok:n_tok + n_rows * n_pages]
            page = self.cfg.page_tokens
            add_page_mass(result.attention_mass, [it.request_id for it in dec],
                          (mass[i * n_pages:(i + 1) * n_pages] for i in range(len(dec))),
                          [kv_pages(it.context_len + 1, page) for it in dec])
        end = time.perf_counter() - self.t0
        result.end, result.compute_s = end, end - start
        result.ops.append(OpTiming("compute", ",".join(self.cfg.devices), start, end))
        stats = [self.executor.counters()] + [f[:STAT_FIELDS] for _, f, _ in replies]
        for rank, (copy_s, moved, _) in enumerate(s.tolist() for s in stats):
            result.transfer_s += copy_s
            if moved:
                result.link_bytes += int(moved)
                result.ops.append(OpTiming("fetch", f"pcie{rank}", start, end, int(moved)))
        return result

    def _reply(self, rank: int, what: str) -> tuple[list[int], torch.Tensor, bytes]:
        """Worker ``rank``'s reply to ``what``; its failure, death or silence as a ``PipelineError``."""
        try:
            head, floats, data = self.ctl.receive_reply(rank)
        except Exception as e:  # noqa: BLE001 - the socket closed (the worker died) or the wait timed out
            proc = self.procs[rank - 1]
            proc.join(1.0)  # a worker that just died: let its exit code show
            if proc.exitcode is not None:
                raise PipelineError(f"pipeline rank {rank} exited with code {proc.exitcode} ({what})") from e
            raise PipelineError(f"pipeline rank {rank} did not answer {what} within {self.cfg.step_timeout_s:g} s "
                                f"(PipelineConfig.step_timeout_s): {e}") from e
        if (err := error_of(rank, head, data, f"at {what}")) is not None:
            raise err
        return head, floats, data

    def _diagnose(self, e: BaseException) -> BaseException:
        """The error to raise for ``e``: a worker's own report as is; otherwise which ranks died."""
        if isinstance(e, PipelineError | ConfigError):
            return e
        for p in self.procs:
            p.join(0.1)  # a worker that just died: let its exit code show
        dead = [f"rank {r + 1} exited with code {p.exitcode}" for r, p in enumerate(self.procs)
                if p.exitcode is not None]
        why = "; ".join(dead) if dead else f"rank 0: {type(e).__name__}: {e}"
        return PipelineError(f"pipeline failed at step {self.steps}: {why}")

    # ----- stats, reset, shutdown -----------------------------------------------------------------------
    def _ask(self, kind: int) -> list[dict[str, Any]]:
        out = []
        for r in range(1, self.pp):
            self.ctl.wait(self.ctl.send(r, torch.tensor([kind, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int64)))
            out.append(decode_json(self._reply(r, "a stats request" if kind == STATS else "a reset")[2]))
        return out

    def stage_stats(self) -> list[dict[str, Any]]:
        """Per rank: device, layers, KV bytes, streaming counters (synchronised), peak GPU memory."""
        local = json.loads(json.dumps(self.executor.stats(), default=str))
        return [local] + (self._ask(STATS) if not self.broken and not self.closed else [])

    def reset_counters(self) -> None:
        """Zero the streaming and activation counters (and the peak-memory statistics) on every rank."""
        self.executor.reset()
        self._ask(RESET)

    def describe(self) -> dict[str, Any]:
        stages = self.stage_stats()
        out: dict[str, Any] = {"device": ",".join(self.cfg.devices), "pp": self.pp, "kv_slots": self.cfg.slots,
                               "kv_len": self.cache.max_len,
                               "kv_cache_bytes": sum(int(s.get("kv_cache_bytes", 0)) for s in stages),
                               "stages": [{k: v for k, v in s.items() if k != "stream"} for s in stages],
                               "cuda_graphs": str(stages[0].get("cuda_graphs", "off"))}
        streams = [s["stream"] for s in stages if s.get("stream")]
        if streams:
            copy_s = sum(float(s["copy_s"]) for s in streams)
            timed = sum(int(s["timed_bytes"]) for s in streams)
            out.update({"stream_host_format": streams[0]["host_format"], "stream_mode": streams[0]["mode"],
                        "streamed_layers": sum(int(s["num_streamed"]) for s in streams),
                        "stream_bytes_per_forward": sum(int(s["bytes_per_forward"]) for s in streams),
                        "stream_bytes_copied": sum(int(s["bytes_copied"]) for s in streams),
                        "stream_copy_s": copy_s,
                        "stream_achieved_GBps": timed / copy_s / 1e9 if copy_s > 0 else float("nan")})
            for s, stage in zip(stages, out["stages"]):
                if s.get("stream"):
                    stage["stream_achieved_GBps"] = s["stream"]["achieved_GBps"]
                    stage["streamed_layers"] = s["stream"]["num_streamed"]
        return out

    def close(self) -> None:
        """Stop the workers (a stop message; killed after a grace period) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        grace, left = 0.5, False
        if not self.broken:
            with contextlib.suppress(Exception):
                stop = torch.tensor([STOP, 0, 0, 0, 0, 0, 0, 0], dtype=torch.int64)
                for r in range(1, self.pp):
                    self.ctl.wait(self.ctl.send(r, stop))
                grace = 30.0
            if grace > 1.0:
                # NCCL's destroy_process_group is collective in recent torch releases (ncclCommFinalize +
                # ncclCommDestroy): the stopped workers wait in theirs for this rank's, so it runs before waiting
                # for them (run after, the workers sat in theirs until the grace period ran out)
                left = leave_group_within(grace)
        stop_processes(self.procs, grace)
        if self.stage.streamer is not None:
            with contextlib.suppress(Exception):
                self.stage.streamer.close()
        if not left:
            destroy_group(abort=bool(self.broken))
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._finalizer.detach()

    def __enter__(self) -> PipelineBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _await(conns: list[Any], procs: list[Any], what: str, timeout_s: float) -> list[Any]:
    """Wait for message ``what`` from every worker's start-up pipe, watching that they stay alive."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(conns):
        for i, (c, p) in enumerate(zip(conns, procs)):
            if i in got:
                continue
            msg = None
            with contextlib.suppress(EOFError, OSError):
                msg = c.recv() if c.poll(0.02) else None
            if msg is not None and msg[0] == "error":
                text = f"pipeline rank {i + 1}: {msg[2]}"
                raise ConfigError(text) if msg[1] == CONFIG_FAILED else PipelineError(f"{text} (during start-up)")
            if msg is not None and msg[0] == what:
                got[i] = msg[1] if len(msg) > 1 else None
            elif msg is None and not p.is_alive():
                raise PipelineError(f"pipeline rank {i + 1} exited with code {p.exitcode} during start-up")
        if time.monotonic() > deadline:
            raise PipelineError(f"pipeline: a worker sent no '{what}' within {timeout_s:.0f} s "
                                "(PipelineConfig.start_timeout_s)")
    return [got[i] for i in range(len(conns))]


def launch(cfg: PipelineConfig) -> PipelineBackend:
    """Start ranks 1..pp-1 (spawned processes), join the process group as rank 0, build every stage
    (in parallel) and return rank 0's backend. Errors (a ConfigError on any rank included) are raised
    here, with every worker stopped. Set ``backend.t0`` to the run's clock start before executing."""
    cfg.check()
    if dist.is_initialized():
        raise ConfigError("parallel.pp: torch.distributed is already initialised in this process "
                          "(one pipeline per process); close the other pipeline first")
    if os.path.isdir("/sys/class/net/lo"):  # every rank runs on this host: gloo over loopback (inherited by
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the workers), whatever the hostname resolves to
    tmpdir = tempfile.mkdtemp(prefix="wicore-pp-")
    rendezvous = os.path.join(tmpdir, "rendezvous")
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    conns: list[Any] = []
    try:
        for rank in range(1, cfg.pp):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=worker_main, args=(rank, cfg, rendezvous, child), daemon=True,
                            name=f"wicore-pp-rank{rank}")
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        _await(conns, procs, "started", cfg.start_timeout_s)
        ctl = init_dist(0, cfg, rendezvous)
        if cfg.fault is not None:
            cfg.fault.trigger(0, 0)
        stage = build_rank_stage(cfg, 0)
        _await(conns, procs, "ready", cfg.start_timeout_s)
    except BaseException:
        stop_processes(procs, 0.0)
        destroy_group(abort=True)
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        for c in conns:
            c.close()
    return PipelineBackend(cfg, stage, ctl, procs, tmpdir)
