"""TorchDriver: the same engine loop on the wall clock.

::

    while work remains:
        submit the requests whose arrival time has come
        plan = engine.schedule(now)
        if plan is None: sleep until the next arrival
        result = backend.execute(plan)          # real kernels; times relative to the run start
        engine.update(plan, result, now)

Arrivals follow the same ``Workload`` as the simulator: open-loop arrival
times are honoured on the wall clock, closed-loop users send their next
request when the previous one finished (plus think time).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

from sim.workload import Workload
from wicore.engine import Engine
from wicore.runtime.backend import TorchBackend
from wicore.scheduler.sequence import Sequence


class TorchDriver:
    def __init__(self, engine: Engine, backend: TorchBackend, workload: Workload, clock_start: float,
                 max_time_s: float | None = None, progress: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.backend = backend
        self.workload = workload
        self.t0 = clock_start
        self.max_time_s = max_time_s
        self.progress = progress
        self._due: list[tuple[float, int, int]] = []  # (time, request index, user)
        self._next = 0
        self._user_of: dict[int, int] = {}
        engine.on_done = self._on_done

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def _on_done(self, seq: Sequence) -> None:
        self.backend.release(seq.request_id)
        if self.progress is not None:
            self.progress(1)
        user = self._user_of.pop(seq.request_id, None)
        if user is not None and self._next < self.workload.n:
            t = max(seq.finish_time, 0.0) + self.workload.think_time(seq.request_id)
            heapq.heappush(self._due, (t, self._next, user))
            self._next += 1

    def _submit_due(self, now: float) -> None:
        wl = self.workload
        while self._due and self._due[0][0] <= now:
            t, i, user = heapq.heappop(self._due)
            req = wl.request(i, t, user if user >= 0 else None)
            if user >= 0:
                self._user_of[i] = user
            self.backend.add_request(req)
            self.engine.add_request(req, now)

    def run(self) -> float:
        wl = self.workload
        if wl.closed_loop:
            for u in range(min(wl.cfg.concurrency, wl.n)):
                heapq.heappush(self._due, (0.0, u, u))
            self._next = min(wl.cfg.concurrency, wl.n)
        else:
            self._due = [(float(wl.arrivals[i]), i, -1) for i in range(wl.n)]
            heapq.heapify(self._due)
            self._next = wl.n
        engine = self.engine
        while self._due or engine.has_work:
            now = self.now()
            if self.max_time_s is not None and now > self.max_time_s:
                break
            self._submit_due(now)
            plan = engine.schedule(now)
            if plan is None:
                if self._due:
                    time.sleep(max(0.0, min(self._due[0][0] - self.now(), 0.05)))
                continue
            result = self.backend.execute(plan)
            engine.update(plan, result, self.now())
        return self.now()
