"""Warm-up of the real backend before the clock starts (wicore/runtime/warmup.py)."""

from __future__ import annotations

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


def _tokens(*extra: str) -> tuple[dict[int, list[int]], object]:
    setup = build_torch(make_cfg(*RUN, *extra))
    backend = setup.backend
    out: dict[int, list[int]] = {}
    release = backend.release

    def keep(rid: int) -> None:
        out[rid] = list(backend.tokens.get(rid, []))
        release(rid)

    backend.release = keep  # type: ignore[method-assign]
    TorchDriver(setup.engine, backend, setup.workload, setup.t0).run()
    return out, backend


@pytest.mark.parametrize("graphs", ["true", "false"])
def test_warm_up_leaves_no_trace_in_the_run(graphs):
    """The warm-up's requests are gone, every KV slot is free again, the tokens equal those of a run without
    warm-up and the sampling generator is back at its seed; with graphs it ran every bucket."""
    cold, _ = _tokens("backend.warmup=false", f"backend.cuda_graphs={graphs}")
    setup = build_torch(make_cfg(*RUN, "backend.warmup=true", f"backend.cuda_graphs={graphs}"))
    fresh = torch.Generator().manual_seed(setup.backend.seed)
    assert torch.equal(setup.backend.generator.get_state(), fresh.get_state())
    warm, backend = _tokens("backend.warmup=true", f"backend.cuda_graphs={graphs}")
    assert sorted(warm) == list(range(6)) and warm == cold
    info = backend.warmup_info  # type: ignore[attr-defined]
    assert info["prefill_tokens"] == max(int(p) for p in setup.workload.prompts)
    assert info["decode_batches"] == ([1, 2, 4] if graphs == "true" else [4])
    assert not backend.requests and not backend.slots and all(rid >= 0 for rid in warm)
    real_slots = backend.cache.max_slots - int(graphs == "true")
    assert sorted(backend.free_slots) == list(range(real_slots))

