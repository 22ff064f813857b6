"""Full garbage collections skip the set-up's objects during a real-runtime run (wicore/runtime/gc_freeze.py)."""

from __future__ import annotations

import gc

import pytest

from tests.conftest import make_cfg
from wicore.runtime.gc_freeze import frozen_gc

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RUN = ["model=tiny-gemma3", "backend=torch", "backend.device=cpu", "workload.num_requests=2",
       "workload.concurrency=2", "workload.prompt.kind=fixed", "workload.prompt.value=8", "workload.output.kind=fixed",
       "workload.output.value=3", "report.enabled=false", "progress=false"]


def test_frozen_gc_freezes_inside_and_unfreezes_after():
    assert gc.get_freeze_count() == 0
    with frozen_gc() as n:
        assert n > 1000 and gc.get_freeze_count() > 1000  # (a frozen object that dies by refcount leaves it)
        fresh = [[] for _ in range(10)]  # made inside: not frozen
        assert gc.get_freeze_count() <= n and fresh
    assert gc.get_freeze_count() == 0
    with frozen_gc(False) as n:
        assert n == 0 == gc.get_freeze_count()


@pytest.mark.parametrize("freeze", [True, False])
def test_run_torch_runs_its_driver_with_the_setup_frozen(tmp_path, monkeypatch, freeze):
    from experiments.run_torch import run_torch
    from wicore.runtime.driver import TorchDriver

    seen: list[int] = []
    original = TorchDriver.run

    def run(self):  # type: ignore[no-untyped-def]
        seen.append(gc.get_freeze_count())
        return original(self)

    monkeypatch.setattr(TorchDriver, "run", run)
    out = run_torch(make_cfg(*RUN, f"backend.gc_freeze={str(freeze).lower()}"), tmp_path / "run")
    assert out["finished"] == 2 and len(seen) == 1
    assert (seen[0] > 1000) is freeze and gc.get_freeze_count() == 0


def test_the_freezes_collection_stays_off_the_run_clock(tmp_path, monkeypatch):
    """The freeze's full collection (150-200 ms in a process that has profiled or run before) and the set-up after
    the warm-up happen before the clock starts: requests arriving at 0 are not held behind them."""
    import time

    import pandas as pd

    from experiments.run_torch import run_torch

    def slow_collect(*args: object) -> int:
        time.sleep(0.4)
        return 0

    monkeypatch.setattr(gc, "collect", slow_collect)
    run_torch(make_cfg(*RUN), tmp_path / "run")
    requests = pd.read_parquet(tmp_path / "run" / "requests.parquet")
    steps = pd.read_parquet(tmp_path / "run" / "steps.parquet")
    assert float(steps["start"].iloc[0]) < 0.2 and float(requests["queue_delay"].max()) < 0.2
