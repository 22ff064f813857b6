"""SimDriver: runs the engine loop of every replica as a SimPy process.

::

    while work remains:
        plan = engine.schedule(env.now)
        if plan is None: wait for an arrival
        result = yield from backend.execute(plan)
        engine.update(plan, result, env.now)

Requests come from an arrival process (open loop, trace) or from closed-loop
user processes, through the load balancer when there are several replicas.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import simpy

from sim.backend import SimBackend
from sim.workload import Workload
from wicore.engine import Engine
from wicore.scheduler.load_balance import LoadBalancer
from wicore.scheduler.sequence import Sequence
from wicore.types import Request


class SimDriver:
    def __init__(self, env: simpy.Environment, engines: list[Engine], backends: list[SimBackend],
                 balancer: LoadBalancer, workload: Workload, max_time_s: float | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.env = env
        self.engines = engines
        self.backends = backends
        self.balancer = balancer
        self.workload = workload
        self.max_time_s = max_time_s
        self.progress = progress
        self._wake: list[simpy.Event | None] = [None] * len(engines)
        self._waiters: dict[int, simpy.Event] = {}
        self._submitted = 0
        self._all_submitted = False
        self._user_woken = False  # a step finished a closed-loop user's request
        self.completed = 0
        for e in engines:
            e.on_done = self._on_done

    # ----- requests ------------------------------------------------------------
    def submit(self, req: Request) -> None:
        if len(self.engines) == 1:
            i = 0
        else:
            i = self.balancer.choose(req, [e.outstanding_tokens() for e in self.engines])
        self._submitted += 1
        if self._submitted >= self.workload.n:
            self._all_submitted = True
        self.engines[i].add_request(req, float(self.env.now))
        self._poke(i)
        if self._all_submitted:
            for j in range(len(self.engines)):
                self._poke(j)

    def _poke(self, i: int) -> None:
        ev = self._wake[i]
        if ev is not None and not ev.triggered:
            self._wake[i] = None
            ev.succeed()

    def _on_done(self, seq: Sequence) -> None:
        self.completed += 1
        if self.progress is not None:
            self.progress(1)
        ev = self._waiters.pop(seq.request_id, None)
        if ev is not None:
            ev.succeed()
            self._user_woken = True

    def _arrivals(self) -> Generator[simpy.Event, Any, None]:
        wl = self.workload
        env = self.env
        for i in range(wl.n):
            t = float(wl.arrivals[i])
            if t > env.now:
                yield env.timeout(t - env.now)
            self.submit(wl.request(i, env.now))

    def _user(self, user: int, counter: list[int]) -> Generator[simpy.Event, Any, None]:
        wl = self.workload
        env = self.env
        while counter[0] < wl.n:
            i = counter[0]
            counter[0] += 1
            done = env.event()
            self._waiters[i] = done
            self.submit(wl.request(i, env.now, user))
            yield done
            think = wl.think_time(i)
            if think > 0:
                yield env.timeout(think)

    # ----- replicas ----------------------------------------------------------------
    def _replica(self, i: int) -> Generator[simpy.Event, Any, None]:
        env = self.env
        engine = self.engines[i]
        backend = self.backends[i]
        while True:
            plan = engine.schedule(float(env.now))
            if plan is None:
                if self._all_submitted and not engine.has_work:
                    return
                ev = self._wake[i] = env.event()
                yield ev
                continue
            result = yield from backend.execute(plan)
            engine.update(plan, result, float(env.now))
            if self._user_woken:  # let the users whose request finished submit the next one before the
                self._user_woken = False  # next schedule, as the real driver does (no think time)
                yield env.timeout(0)

    def run(self) -> float:
        """Simulate until every request is done (or ``max_time_s``); returns the end time."""
        env = self.env
        procs = [env.process(self._replica(i)) for i in range(len(self.engines))]
        if self.workload.closed_loop:
            counter = [0]
            for u in range(min(self.workload.cfg.concurrency, self.workload.n)):
                env.process(self._user(u, counter))
        else:
            env.process(self._arrivals())
        until: Any = env.all_of(procs)
        if self.max_time_s is not None:
            until = env.any_of([until, env.timeout(self.max_time_s)])
        env.run(until=until)
        return float(env.now)
