"""Warm-up of the real backend before the clock starts (wicore/runtime/warmup.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from experiments.run_torch import build_torch
from tests.conftest import make_cfg
from wicore.runtime.driver import TorchDriver

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RUN = ["model=tiny-gemma3", "backend=torch", "backend.device=cpu", "workload.num_requests=6",
       "workload.concurrency=3", "workload.prompt.kind=uniform", "workload.prompt.low=5", "workload.prompt.high=40",
       "workload.output.kind=fixed", "workload.output.value=6", "report.enabled=false", "progress=false",
       "scheduler.max_num_seqs=4"]


def _tokens(*extra: str) -> tuple[dict[int, list[int]], Any]:
    setup = build_torch(make_cfg(*RUN, *extra))
    backend = setup.backend
    out: dict[int, list[int]] = {}
    release = backend.release

    def keep(rid: int) -> None:
        out[rid] = list(backend.tokens.get(rid, []))
        release(rid)

    backend.release = keep  # type: ignore[method-assign]
    TorchDriver(setup.engine, backend, setup.workload, setup.t0).run()
    return out, setup


@pytest.mark.parametrize("graphs", ["true", "false"])
def test_warm_up_leaves_no_trace_in_the_run(graphs):
    """The warm-up's requests are gone, every KV slot is free again, the tokens equal those of a run without
    warm-up and the sampling generator is back at its seed; with graphs it ran every bucket."""
    cold, _ = _tokens("backend.warmup=false", f"backend.cuda_graphs={graphs}")
    setup = build_torch(make_cfg(*RUN, "backend.warmup=true", f"backend.cuda_graphs={graphs}"))
    fresh = torch.Generator().manual_seed(setup.backend.seed)
    assert torch.equal(setup.backend.generator.get_state(), fresh.get_state())
    warm, warmed = _tokens("backend.warmup=true", f"backend.cuda_graphs={graphs}")
    backend = warmed.backend
    assert sorted(warm) == list(range(6)) and warm == cold
    info = warmed.warmup
    assert info["prefill_tokens"] == max(int(p) for p in setup.workload.prompts)
    assert info["decode_batches"] == ([1, 2, 4] if graphs == "true" else [4])
    assert not backend.requests and not backend.slots and all(rid >= 0 for rid in warm)
    real_slots = backend.cache.max_slots - int(graphs == "true")
    assert sorted(backend.free_slots) == list(range(real_slots))



def test_warm_up_forwards_are_not_counted_as_the_runs_streaming():
    """With streamed layers the warm-up runs forwards that copy them; the streamer's counters (bytes, copies,
    forwards, copy time: placement.json's stream_*) start after it, with the run's clock."""
    from tests.test_offload import gemma, streaming_budget_gib

    budget = f"backend.gpu_budget_gib={streaming_budget_gib(gemma(), 3):.9f}"
    setup = build_torch(make_cfg(*RUN, budget, "backend.warmup=true"))
    st = setup.backend.streamer
    assert setup.warmup is not None and setup.warmup["decode_batches"] == [4]
    assert (st.forwards, st.bytes_copied, st.copies, st.copy_s) == (0, 0, 0, 0.0)
    assert setup.t0 == setup.backend.t0
    TorchDriver(setup.engine, setup.backend, setup.workload, setup.t0).run()
    cold = build_torch(make_cfg(*RUN, budget, "backend.warmup=false"))
    TorchDriver(cold.engine, cold.backend, cold.workload, cold.t0).run()
    assert st.forwards == cold.backend.streamer.forwards > 0 and st.bytes_copied > 0
