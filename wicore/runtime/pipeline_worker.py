"""The worker side of a pipeline (ranks 1..pp-1, spawned processes), and what every rank runs of a step.

``StageExecutor`` runs one rank's stage on the forwards of a step description: it receives the hidden
states (and the running attention-mass sum) of the stage before it, runs its layers and sends them on;
the last rank samples. ``worker_main`` is a worker's entry point: it joins the process group, builds
its stage, reports over the start-up pipe, then serves control messages (step, stats, reset, stop)
until stopped, replying to each with a status; an exception is replied with its traceback and ends the
worker. See ``wicore.runtime.pipeline`` for the whole protocol.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from wicore.errors import ConfigError
from wicore.model.sampling import sample_host_params
from wicore.model.transformer import to_torch_dtype
from wicore.runtime.graph_stage import GraphStage
from wicore.runtime.pipeline_config import PipelineConfig
from wicore.runtime.pipeline_wire import (
    CONFIG_FAILED,
    FAILED,
    HEADER,
    OK,
    RESET,
    STAT_FIELDS,
    STATS,
    STEP,
    STOP,
    Control,
    StepDescription,
)
from wicore.runtime.stage import Stage, build_stage


def build_rank_stage(cfg: PipelineConfig, rank: int) -> Stage:
    """Rank ``rank``'s stage as ``cfg`` describes it (rank 0 builds it in the driver process, the others in their
    workers): its layers, KV cache (with the graphs' scratch slot), streamed layers (on the graph-safe schedule
    when the stages decode through CUDA graphs)."""
    return build_stage(cfg.spec, rank, cfg.pp, cfg.devices[rank], cfg.cache_slots, cfg.max_len,
                       streamed=cfg.streamed_on(rank), seed=cfg.seed, checkpoint=cfg.checkpoint, fill=cfg.fill,
                       host_format=cfg.host_format, buffers=cfg.stream_buffers, pin=cfg.pin,
                       schedule="forward" if cfg.cuda_graphs else "cycle")


# ----- one rank's share of a step ------------------------------------------------------------------
class StageExecutor:
    """Runs this rank's stage on the forwards of a step description (the same code on every rank)."""

    def __init__(self, stage: Stage, rank: int, cfg: PipelineConfig) -> None:
        self.stage, self.rank, self.pp = stage, rank, cfg.pp
        self.first, self.last = rank == 0, rank == cfg.pp - 1
        self.measure, self.page_tokens = cfg.measure_attention, cfg.page_tokens
        self.dtype = to_torch_dtype(cfg.spec.dtype)
        self.hidden = cfg.spec.hidden_size
        self.generator = torch.Generator(device=stage.device).manual_seed(cfg.seed) if self.last else None
        self.sends: list[tuple[Any, torch.Tensor]] = []
        self.activation_bytes = 0
        self.counts = (0, 0, 0)  # last rank, last step: tokens, attention-mass rows, pages per row
        self._copy_s, self._forwards = 0.0, 0
        self.graph = (GraphStage(stage.model, stage.cache, first=self.first, hidden_size=self.hidden, dtype=self.dtype,
                                 measure_attention=self.measure, page_size=self.page_tokens)
                      if cfg.cuda_graphs else None)

    def _recv_into(self, buf: torch.Tensor) -> torch.Tensor:
        work = dist.irecv(buf, self.rank - 1)
        assert work is not None
        work.wait()  # NCCL: the compute stream waits, not the host; gloo: the host waits (with the timeout)
        return buf

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._recv_into(torch.empty(shape, dtype=dtype, device=self.stage.device))

    def _send(self, t: torch.Tensor) -> None:
        t = t.contiguous()
        self.sends.append((dist.isend(t, self.rank + 1), t))
        self.activation_bytes += t.numel() * t.element_size()

    def flush(self) -> None:
        """Wait for this step's sends (their tensors stay alive until then)."""
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()

    @torch.inference_mode()
    def run(self, desc: StepDescription) -> torch.Tensor | None:
        """This rank's part of the step; the last rank returns its tokens (then the attention mass rows,
        flattened) as one float64 CPU tensor: its one host sync of the step."""
        st, dev = self.stage, self.stage.device
        for row in desc.rows():
            if row[6]:  # recompute preemption: the request starts over in its slot
                st.cache.free(row[5])
        items, ids, sampling = desc.device_views(dev)
        logits: list[torch.Tensor] = []
        mass: torch.Tensor | None = None
        for f in desc.forwards():
            r0, r1 = f.rows
            slots = items[r0:r1, 5]
            if f.decode:
                pos = items[r0:r1, 2].unsqueeze(1)
            else:
                pos = torch.arange(f.context, f.context + f.tokens, device=dev)[None, :]
            measure = self.measure and f.decode
            if f.decode and f.tokens == 1 and self.graph is not None:
                y, m = self._graph_decode(f.batch, pos, slots, ids[f.ids[0]:f.ids[1]] if self.first else None)
            else:
                m_in: torch.Tensor | None = None
                if self.first:
                    x = ids[f.ids[0]:f.ids[1]].view(f.batch, f.tokens)
                else:
                    x = self._recv((f.batch, f.tokens, self.hidden), self.dtype)
                    if measure:
                        m_in = self._recv((f.batch, st.cache.max_len), torch.float32)
                y, m = st.model(x, pos, st.cache, slots, m_in, attention_mass=measure, page_size=self.page_tokens)
            if not self.last:
                self._send(y)
                if m is not None:
                    self._send(m)
            else:
                if f.emits:
                    logits.append(y[:, -1])
                if m is not None:
                    mass = m
        if not self.last:
            return None
        self.counts = (0, 0, 0)
        if not logits:
            return torch.zeros(0, dtype=torch.float64)
        rows, pages = (int(mass.shape[0]), int(mass.shape[1])) if mass is not None else (0, 0)
        self.counts = (desc.n_emit, rows, pages)
        # parameters in a CPU tensor: all greedy is the argmax alone and leaves the generator as it was
        tokens = sample_host_params(torch.cat(logits), sampling[:, 0], sampling[:, 1], sampling[:, 2], self.generator)
        parts = [tokens.double()] + ([mass.double().flatten()] if mass is not None else [])
        return torch.cat(parts).cpu()

    def _graph_decode(self, b: int, pos: torch.Tensor, slots: torch.Tensor,
                      ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's decode forward of ``b`` rows through the stage's graphs: inputs staged into the bucket (the
        hidden states and mass received straight into its buffers), the replay, the outputs' first ``b`` rows."""
        assert self.graph is not None
        bk = self.graph.stage(pos, slots, ids)
        if not self.first:
            assert bk.hidden is not None
            self._recv_into(bk.hidden[:b])
            if bk.mass_in is not None:
                self._recv_into(bk.mass_in[:b])
        y, m = self.graph.run(bk)
        return y[:b], (m[:b] if m is not None else None)

    def counters(self) -> torch.Tensor:
        """[copy seconds, bytes streamed in, forwards] since the last call (copies still in flight count later)."""
        s = self.stage.streamer
        if s is None:
            return torch.zeros(STAT_FIELDS, dtype=torch.float64)
        s._harvest()
        copy_s, forwards = s.copy_s - self._copy_s, s.forwards - self._forwards
        self._copy_s, self._forwards = s.copy_s, s.forwards
        return torch.tensor([copy_s, forwards * s.bytes_per_forward, forwards], dtype=torch.float64)

    def reset(self) -> None:
        if self.stage.streamer is not None:
            self.stage.streamer.synchronize()
            self.stage.streamer.reset_counters()
        self._copy_s, self._forwards = 0.0, 0
        self.activation_bytes = 0
        if self.stage.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.stage.device)

    def stats(self) -> dict[str, Any]:
        out = self.stage.describe()
        if self.graph is not None:
            out.update(self.graph.describe())
        if self.stage.streamer is not None:
            out["stream"] = self.stage.streamer.stats(sync=True)
        out["activation_bytes_sent"] = self.activation_bytes
        if self.stage.device.type == "cuda":
            out["peak_gpu_GiB"] = torch.cuda.max_memory_allocated(self.stage.device) / 2**30
        return out


# ----- process group ---------------------------------------------------------------------------------
def init_dist(rank: int, cfg: PipelineConfig, rendezvous: str) -> Control:
    cuda = torch.device(cfg.devices[rank]).type == "cuda"
    timeout = timedelta(seconds=cfg.step_timeout_s)
    kw: dict[str, Any] = {}
    if cuda:
        torch.cuda.set_device(torch.device(cfg.devices[rank]))
        kw["device_id"] = torch.device(cfg.devices[rank])
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=cfg.pp, timeout=timeout, **kw)
    return Control(dist.new_group(backend="gloo", timeout=timeout), cfg.step_timeout_s)


def _failure(e: BaseException) -> tuple[int, bytes]:
    status = CONFIG_FAILED if isinstance(e, ConfigError) else FAILED
    text = str(e) if isinstance(e, ConfigError) else traceback.format_exc()
    return status, text.encode()


def worker_main(rank: int, cfg: PipelineConfig, rendezvous: str, conn: Any) -> None:
    """Entry point of worker ``rank``: start-up over the pipe ``conn``, then serve steps until stopped."""
    ctl: Control | None = None
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        conn.send(("started",))
        ctl = init_dist(rank, cfg, rendezvous)
        if cfg.fault is not None:
            cfg.fault.trigger(rank, 0)
        stage = build_rank_stage(cfg, rank)
        conn.send(("ready", stage.describe()))
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, which raises it
        status, text = _failure(e)
        with contextlib.suppress(Exception):
            conn.send(("error", status, text.decode()))
        destroy_group(abort=True)
        return
    finally:
        conn.close()
    clean = False
    try:
        clean = _serve(StageExecutor(stage, rank, cfg), ctl, cfg)
    finally:
        destroy_group(abort=not clean)


def _serve(ex: StageExecutor, ctl: Control, cfg: PipelineConfig) -> bool:
    """Answer rank 0's messages until it says stop (True) or something fails (False)."""
    steps = 0
    while True:
        try:
            head = ctl.recv(0, HEADER, torch.int64, timeout_s=cfg.idle_timeout_s).tolist()
        except Exception:  # noqa: BLE001 - rank 0 is gone (its sockets closed) or silent for too long
            return False
        kind, step_id = head[0], head[1]
        if kind == STOP:
            return True
        try:
            if kind == STEP:
                payload = ctl.recv(0, StepDescription.payload_len(head), torch.int64)
                steps += 1
                if cfg.fault is not None:
                    cfg.fault.trigger(ex.rank, steps)
                out = ex.run(StepDescription(step_id, head[2], head[3], head[4], payload))
                ex.flush()
                floats = ex.counters() if out is None else torch.cat([ex.counters(), out])
                ctl.reply(OK, step_id, floats, counts=ex.counts if out is not None else (0, 0, 0))
            elif kind == STATS:
                ctl.reply(OK, step_id, data=json.dumps(ex.stats(), default=str).encode())
            elif kind == RESET:
                ex.reset()
                ctl.reply(OK, step_id)
            else:
                raise RuntimeError(f"pipeline: unknown message kind {kind}")
        except Exception as e:  # noqa: BLE001 - reported to rank 0; this rank stops serving
            status, text = _failure(e)
            with contextlib.suppress(Exception):
                ctl.reply(status, step_id, data=text)
            return False


def destroy_group(abort: bool) -> None:
    """Leave the process group (``abort``: NCCL work may be pending after a failure; abort it, which a
    plain destroy would wait for)."""
    if not dist.is_initialized():
        return
    aborter = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort and aborter is not None and dist.get_backend() == "nccl":
        with contextlib.suppress(Exception):
            aborter()
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def leave_group_within(timeout_s: float) -> bool:
    """``destroy_group(abort=False)`` in a helper thread, waited for at most ``timeout_s``: True when it
    finished (or there was no group). False leaves it running (a daemon thread) for a caller that then
    stops the other ranks instead; the group must not be destroyed again meanwhile."""
    if not dist.is_initialized():
        return True
    t = threading.Thread(target=destroy_group, args=(False,), name="wicore-pp-leave", daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()


def stop_processes(procs: list[Any], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
