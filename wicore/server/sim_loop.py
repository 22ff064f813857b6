"""The digital twin: the simulator's SimBackend paced to the wall clock.

Each step is planned by the same Engine at wall time ``now``; the SimPy
environment is advanced to ``now`` and the step is simulated on the modelled
hardware (``SimBackend.execute``, a SimPy process), which gives its simulated
end time; the engine thread then sleeps until the wall clock reaches it. So a
client sees the TTFT, inter-token gaps and queueing of the modelled deployment
(e.g. 2x T10 with Gemma-3-27B, ~1.24 s per step) while the tokens are
placeholder text.

Pacing is done here rather than with ``simpy.rt.RealtimeEnvironment`` so that
requests can enter between steps without a SimPy process polling the inbox.
Like ``RealtimeEnvironment(strict=False)``, a step whose bookkeeping took
longer than its simulated duration is not slowed further: the twin runs late
by that much, and the total is reported as ``lag_s`` in /status.
"""

from __future__ import annotations

import time
from typing import Any

from experiments.build import SimSetup
from wicore.types import Request, StepPlan, StepResult

PLACEHOLDER = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
               "incididunt ut labore et dolore magna aliqua. ")


class SimExecutor:
    name = "sim"

    def __init__(self, setup: SimSetup, placeholder_ids: list[int]) -> None:
        if setup.parallel.replicas != 1:
            raise ValueError("serve --backend sim: one replica per server (use parallel=auto or pp)")
        self.setup = setup
        self.env = setup.env
        self.backend = setup.driver.backends[0]
        self.placeholder = placeholder_ids or [0]
        self.t0 = time.perf_counter()
        self.lag_s = 0.0
        self.sim_busy_s = 0.0
        self._pos: dict[int, int] = {}

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, req: Request) -> None:
        self._pos[req.request_id] = 0

    def release(self, request_id: int) -> None:
        self._pos.pop(request_id, None)

    def execute(self, plan: StepPlan) -> tuple[StepResult, float]:
        env = self.env
        now = self.now()
        if now > env.now:
            env.run(until=now)
        proc = env.process(self.backend.execute(plan))
        env.run(until=proc)
        result = proc.value
        assert isinstance(result, StepResult)
        self.sim_busy_s += result.end - result.start
        ph = self.placeholder
        for it in plan.items:
            if it.emits_token:
                k = self._pos.get(it.request_id, 0)
                result.tokens[it.request_id] = [ph[k % len(ph)]]
                self._pos[it.request_id] = k + 1
        wait = result.end - self.now()
        if wait > 0:
            time.sleep(wait)
        else:
            self.lag_s -= wait
        return result, max(self.now(), result.end)

    def describe(self) -> dict[str, Any]:
        s = self.setup
        return {"name": "sim", "hardware": s.hw.name, "parallel": s.parallel.describe(),
                "simulated_now_s": float(self.env.now), "sim_busy_s": self.sim_busy_s, "lag_s": self.lag_s}
