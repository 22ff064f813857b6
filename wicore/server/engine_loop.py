"""The engine thread: owns the Engine and runs ``schedule -> execute -> update``.

HTTP handlers (asyncio) talk to it only through ``submit`` / ``cancel`` (a locked
inbox plus a wake-up event); the thread sends each request's tokens and its end
back to the handler's ``asyncio.Queue`` with one ``call_soon_threadsafe`` per
step. Capacity: ``scheduler.max_num_seqs`` run at once, ``max_queue`` more wait;
beyond that ``submit`` raises ``QueueFull`` (HTTP 429).

Backends plug in as an ``Executor``: the real runtime (``TorchExecutor``) or the
simulator paced to the wall clock (``wicore.server.sim_loop.SimExecutor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from wicore.engine import Engine
from wicore.metrics import Recorder
from wicore.scheduler.sequence import Sequence
from wicore.types import Request, RequestStatus, StepPlan, StepResult

log = logging.getLogger("wicore.server")
RECORDER_RESET_STEPS = 20_000  # the engine's Recorder grows per step: start a fresh one now and then


class QueueFull(Exception):
    """Running set and waiting queue are full."""


class Executor(Protocol):
    name: str

    def now(self) -> float:
        """The engine's clock: wall seconds since the server started."""
        ...

    def add(self, req: Request) -> None:
        """A request enters the engine (the runtime keeps its prompt ids)."""
        ...

    def release(self, request_id: int) -> None:
        """A request left the engine: free its runtime state (KV slot)."""
        ...

    def execute(self, plan: StepPlan) -> tuple[StepResult, float]:
        """Run one step; returns its result and the time to pass to ``Engine.update``."""
        ...

    def describe(self) -> dict[str, Any]:
        ...


@dataclass(eq=False)
class Handle:
    """One request as the HTTP side sees it. Events on ``queue``: ``("tokens", [ids])`` and
    ``("done", finish_reason)`` with finish_reason stop | length | timeout | cancelled | error:<why>."""

    request_id: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, float | int]
    stop_ids: tuple[int, ...]
    priority: int
    timeout_s: float | None
    queue: asyncio.Queue[tuple[str, Any]]
    aloop: asyncio.AbstractEventLoop
    seq: Sequence | None = None
    sent: int = 0  # tokens handed to the HTTP side (engine thread)
    received: int = 0  # tokens the HTTP side consumed (usage)
    stop_hit: bool = False  # the HTTP side ended it on a stop string
    finish_reason: str = ""
    submitted_at: float = field(default_factory=time.perf_counter)


class EngineLoop:
    def __init__(self, engine: Engine, executor: Executor, max_queue: int = 256,
                 idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.ex = executor
        self.max_running = engine.scheduler.max_num_seqs
        self.max_queue = max_queue
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[Handle] = []
        self._cancels: list[int] = []
        self._handles: dict[int, Handle] = {}
        self._finished: list[Sequence] = []
        self._outstanding = 0
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.tokens_out = 0
        self.error: str | None = None
        self.snapshot: dict[str, Any] = {}
        self.on_finish: Callable[[Handle, Sequence], None] | None = None  # metrics hook (engine thread)
        engine.on_done = self._on_done
        self._publish()

    # ----- called from the HTTP side (any thread) --------------------------------
    def submit(self, prompt_ids: list[int], max_tokens: int, sampling: dict[str, float | int],
               stop_ids: tuple[int, ...], priority: int = 0, timeout_s: float | None = None) -> Handle:
        aloop = asyncio.get_running_loop()
        with self._lock:
            if self._outstanding >= self.max_running + self.max_queue:
                raise QueueFull(f"server busy: {self._outstanding} requests in flight "
                                f"(max_num_seqs={self.max_running} + max_queue={self.max_queue})")
            self._outstanding += 1
            h = Handle(next(self._ids), prompt_ids, max_tokens, sampling, stop_ids, priority, timeout_s,
                       asyncio.Queue(), aloop)
            self._inbox.append(h)
        self._wake.set()
        return h

    def cancel(self, request_id: int) -> None:
        """Abort a request (client went away); its KV pages are freed in the engine thread."""
        with self._lock:
            self._cancels.append(request_id)
        self._wake.set()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ----- thread ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="wicore-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self._run()
        except Exception as e:  # a bug in a backend: report it on /health, fail every request in flight
            log.exception("engine loop stopped")
            self.error = f"{type(e).__name__}: {e}"
            for h in list(self._handles.values()) + self._inbox:
                self._post([(h, ("done", "error:engine_failed"))])

    def _run(self) -> None:
        engine, ex = self.engine, self.ex
        while not self._stop:
            self._drain()
            plan = engine.schedule(ex.now())
            if self._finished:
                self._post(self._finish_events())
            if plan is None:
                self._publish()
                if not self._inbox and not self._cancels:
                    self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            result, t = ex.execute(plan)
            engine.update(plan, result, t)
            self.steps += 1
            self._post(self._token_events(plan) + self._finish_events())
            self._publish()
            if self.steps % RECORDER_RESET_STEPS == 0:
                engine.recorder = Recorder()

    def _drain(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        engine, ex = self.engine, self.ex
        for h in inbox:
            now = ex.now()
            req = Request(h.request_id, now, len(h.prompt_ids), h.max_tokens, priority=h.priority,
                          deadline_s=h.timeout_s, prompt_ids=h.prompt_ids, sampling=h.sampling,
                          stop_token_ids=h.stop_ids)
            self._handles[h.request_id] = h
            ex.add(req)
            h.seq = engine.add_request(req, now)
        for rid in cancels:
            if rid in self._handles:
                engine.cancel(rid, ex.now(), "cancelled")
        if self._finished:
            self._post(self._finish_events())

    def _on_done(self, seq: Sequence) -> None:
        self.ex.release(seq.request_id)
        self._finished.append(seq)

    def _token_events(self, plan: StepPlan) -> list[tuple[Handle, tuple[str, Any]]]:
        events: list[tuple[Handle, tuple[str, Any]]] = []
        handles = self._handles
        for item in plan.items:
            if not item.emits_token:
                continue
            h = handles.get(item.request_id)
            if h is None or h.seq is None:
                continue
            ids = h.seq.token_ids
            if len(ids) > h.sent:
                new = ids[h.sent:]
                h.sent = len(ids)
                self.tokens_out += len(new)
                events.append((h, ("tokens", new)))
        return events

    def _finish_events(self) -> list[tuple[Handle, tuple[str, Any]]]:
        events: list[tuple[Handle, tuple[str, Any]]] = []
        finished, self._finished = self._finished, []
        for seq in finished:
            h = self._handles.pop(seq.request_id, None)
            if h is None:
                continue
            if seq.status is RequestStatus.FINISHED:
                toks = seq.token_ids
                reason = "stop" if toks and toks[-1] in seq.req.stop_token_ids else "length"
            elif seq.abort_reason in ("deadline", "cancelled"):
                reason = "timeout" if seq.abort_reason == "deadline" else "cancelled"
            else:
                reason = f"error:{seq.abort_reason or 'aborted'}"
            h.finish_reason = reason
            with self._lock:
                self._outstanding -= 1
            if self.on_finish is not None:
                self.on_finish(h, seq)
            events.append((h, ("done", reason)))
        return events

    def _post(self, events: list[tuple[Handle, tuple[str, Any]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, tuple[str, Any]]]] = {}
        for h, ev in events:
            by_loop.setdefault(h.aloop, []).append((h, ev))
        for aloop, evs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the event loop is closed (server shutting down)
                aloop.call_soon_threadsafe(_deliver, evs)

    def _publish(self) -> None:
        """A consistent copy of the engine's state for /status and /metrics (read from other threads)."""
        sched = self.engine.scheduler
        used = sched.pool.used_pages
        swapped = sched.swap_pool.used_pages if sched.swap_pool else 0
        tiers = self.engine.placement.tier_usage(used, swapped)
        self.snapshot = {
            "waiting": len(sched.queue) + len(self._inbox), "running": len(sched.running),
            "outstanding": self._outstanding, "kv_pages_used": used, "kv_pages_total": sched.pool.num_pages,
            "kv_swap_pages_used": swapped, "steps": self.steps, "tokens_out": self.tokens_out,
            "tiers": {k: {"used_bytes": int(u), "capacity_bytes": int(c)} for k, (u, c) in tiers.items()},
            "backend": self.ex.describe(),
        }


def _deliver(events: list[tuple[Handle, tuple[str, Any]]]) -> None:
    for h, ev in events:
        h.queue.put_nowait(ev)


class TorchExecutor:
    """The real runtime: ``TorchBackend`` on the wall clock it was built with."""

    name = "torch"

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.t0 = float(backend.t0)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, req: Request) -> None:
        self.backend.add_request(req)

    def release(self, request_id: int) -> None:
        self.backend.release(request_id)

    def execute(self, plan: StepPlan) -> tuple[StepResult, float]:
        result = self.backend.execute(plan)
        return result, self.now()

    def describe(self) -> dict[str, Any]:
        return {"name": "torch", "kv_slots_used": len(self.backend.slots), **self.backend.describe()}
