"""KV swapping: the swapper moves a slot's K/V to host memory and back bit for bit; swap preemption on the
real runtime gives the tokens of a run that never preempts; the engine names the swapped sequences and
both backends move (and the simulator charges) only the KV that changes side."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from experiments.run import run_sim
from experiments.run_torch import build_torch
from tests.conftest import make_cfg
from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.spec import ModelSpec
from wicore.runtime.backend import TorchBackend
from wicore.runtime.driver import TorchDriver
from wicore.runtime.kv_swap import KVSwapper, swap_names
from wicore.scheduler.scheduler import SchedulerOutput
from wicore.scheduler.sequence import Sequence
from wicore.types import BlockRef, MemoryOp, Request, StepPlan, StepResult

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# 12 requests of <= 52 tokens, 4 at a time; 6 pages of 8 tokens hold at most one of them at full length
TINY = ["model=tiny-gemma3", "workload.num_requests=12", "workload.concurrency=4",
        "workload.prompt.kind=uniform", "workload.prompt.low=5", "workload.prompt.high=40",
        "workload.output.kind=uniform", "workload.output.low=3", "workload.output.high=12",
        "report.enabled=false", "progress=false", "backend=torch", "backend.device=cpu", "backend.max_len=64"]
SMALL_KV = ["backend.kv_pages=6", "memory.page_tokens=8"]


def _spec() -> ModelSpec:
    return ModelSpec.from_config(dict(make_cfg("model=tiny-gemma3").model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_out_then_in_to_another_slot_restores_the_kv_bit_for_bit(dtype):
    cache = KVCache(_spec(), 3, 32, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    tokens = 20
    before = [t[0, :, :tokens].clone() for t in cache.k + cache.v]
    sw = KVSwapper(cache)
    step = sw.begin(1.0)
    sw.swap_out(step, 7, 0, tokens)
    assert sw.holds(7) and all(not t[0].any() for t in cache.k + cache.v)  # the slot is free (zeroed)
    nbytes = 2 * cache.spec.num_layers * cache.spec.num_kv_heads * tokens * cache.spec.head_dim * before[0].element_size()
    assert step.bytes_out == sw.host_bytes == nbytes
    for t in cache.k + cache.v:  # another sequence writes the freed slot
        t[0].copy_(torch.randn(t[0].shape, generator=g))
    sw.mark_swapped_out(step)
    assert sw.swap_in(step, 7, 2) == tokens
    sw.finish(step)
    assert not sw.holds(7) and sw.host_bytes == 0
    for t, b in zip(cache.k + cache.v, before):
        assert t.dtype == dtype and torch.equal(t[2, :, :tokens], b)
    result = StepResult(1, 1.0, 2.0)
    sw.report(step, result)
    assert result.link_bytes == 2 * nbytes and result.transfer_s == step.out_s + step.in_s > 0
    assert [(o.name, o.resource, o.nbytes) for o in result.ops] == [("swap_out", "pcie0", nbytes),
                                                                     ("swap_in", "pcie0", nbytes)]
    assert result.ops[0].start == 1.0 and result.ops[0].end == result.ops[1].start
    with pytest.raises(RuntimeError, match="no swapped-out KV"):
        sw.swap_in(sw.begin(0.0), 7, 2)


def _moves(*moves: tuple[int, str]) -> SchedulerOutput:
    seqs: dict[int, Sequence] = {}
    out = SchedulerOutput()
    for rid, move in moves:
        seq = seqs.setdefault(rid, Sequence(Request(rid, 0.0, 4, 4)))
        out.kv_moves.append((seq, move))
    return out


def test_net_kv_moves_name_the_sequences_that_change_side():
    out = _moves((1, "swap_out"), (2, "swap_in"), (3, "swap_in"), (4, "swap_out"), (3, "swap_out"),
                 (4, "swap_in"), (5, "swap_in"), (5, "drop"), (6, "drop"))
    to_host, to_gpu, dropped = out.net_kv_moves()
    assert [s.request_id for s in to_host] == [1]
    assert [s.request_id for s in to_gpu] == [2]  # 3 and 4 went there and back in the step
    assert [s.request_id for s in dropped] == [5, 6]
    ops = [MemoryOp("swap_out", f"gpu{g}", "cpu", 10, device=g, blocks=(BlockRef("kv", -1, seq=1, device=g),
                                                                       BlockRef("kv", -1, seq=1, index=1, device=g)))
           for g in (0, 1)] + [MemoryOp("swap_in", "cpu", "gpu0", 5, blocks=(BlockRef("kv", -1, seq=2),)),
                               MemoryOp("fetch", "cpu", "gpu0", 5, blocks=(BlockRef("weight", 0, "layer"),))]
    assert swap_names(ops) == ([1], [2])


def _run(*overrides: str) -> tuple[dict[int, list[int]], object, TorchBackend]:
    setup = build_torch(make_cfg(*TINY, *overrides))
    backend = setup.backend
    finished: dict[int, list[int]] = {}
    release = backend.release

    def keep(rid: int) -> None:
        if rid >= 0:  # not a warm-up request
            finished[rid] = list(backend.tokens[rid])
        release(rid)

    backend.release = keep  # type: ignore[method-assign]
    TorchDriver(setup.engine, backend, setup.workload, setup.t0).run()
    return finished, setup, backend


@pytest.fixture(scope="module")
def reference() -> dict[int, list[int]]:
    """Tokens of the workload with KV for every slot (no preemption), greedy."""
    tokens, setup, _ = _run()
    assert len(tokens) == 12 and setup.engine.scheduler.preemptions == 0
    return tokens


def _streaming_budget() -> str:
    """A GPU budget under which 3 of the 6 layers are streamed from host memory (StreamingTorchBackend)."""
    spec, gib = _spec(), 2**30
    fixed = 0.5 * gib + spec.embedding_bytes + 2 * spec.layer_bytes + 2 * gib  # workspace, emb, buffers, kv_min
    return f"backend.gpu_budget_gib={(fixed + 3.5 * spec.layer_bytes) / 0.92 / gib:.9f}"


@pytest.mark.parametrize("extra", [[], ["scheduler.batching=chunked_prefill", "scheduler.max_batched_tokens=16"],
                                   ["backend.cuda_graphs=true"], ["streaming"]],
                         ids=["continuous", "chunked", "graph_decode", "streaming"])
def test_swap_preemption_gives_the_tokens_of_a_run_without_preemption(reference, extra):
    extra = [_streaming_budget() if e == "streaming" else e for e in extra]
    tokens, setup, backend = _run("scheduler.preemption=swap", *SMALL_KV, *extra)
    assert tokens == reference
    assert (type(backend).__name__ == "StreamingTorchBackend") == any("gpu_budget" in e for e in extra)
    steps = setup.recorder.frames()[1]
    assert steps["preempted"].sum() > 0 and steps["link_bytes"].sum() > 0
    info = backend.describe()
    assert info["kv_swaps_out"] > 0 and info["kv_swaps_in"] == info["kv_swaps_out"]
    swapped = info["kv_swap_out_bytes"] + info["kv_swap_in_bytes"]
    assert info["kv_swap_out_bytes"] == info["kv_swap_in_bytes"] > 0
    ops = setup.recorder.ops  # (step, replica, name, resource, start, end, bytes)
    assert sum(op[6] for op in ops if op[2] in ("swap_out", "swap_in")) == swapped
    assert steps["link_bytes"].sum() == swapped + sum(op[6] for op in ops if op[2] == "fetch")
    assert all(op[3] == "pcie0" and op[5] >= op[4] for op in ops if op[2].startswith("swap"))
    assert info["kv_swapped_now"] == 0 and not backend.slots and not backend.kv_len
    sched = setup.engine.scheduler
    assert sched.swap_pool is not None and sched.swap_pool.used_pages == 0 and sched.pool.used_pages == 0


def test_recompute_preemption_frees_the_slot_and_gives_the_same_tokens(reference):
    tokens, setup, backend = _run("scheduler.preemption=recompute", *SMALL_KV)
    assert tokens == reference
    assert setup.engine.scheduler.preemptions > 0 and backend._swapper is None


def test_swap_preemption_with_mor_routing_gives_the_tokens_without_preemption():
    """Per-request random routing (independent of the batches): the CPU shallow path's KV mirror is
    resynchronised after a swap (its slot may change)."""
    mor = ["routing=mor", "routing.scorer=random", "routing.threshold=0.5", "routing.cpu_depth=2",
           "workload.num_requests=8"]
    plain, s1, b1 = _run(*mor)
    swapped, s2, b2 = _run(*mor, "scheduler.preemption=swap", *SMALL_KV)
    for b in (b1, b2):
        b.mor.close()
    assert len(plain) == 8 and swapped == plain
    assert b2.describe()["kv_swaps_in"] > 0 and b2.mor.tokens_shallow > 0


def test_swap_preemption_config_errors():
    with pytest.raises(ConfigError, match="parallel.pp"):
        build_torch(make_cfg(*TINY, "parallel=pp", "scheduler.preemption=swap"))
    with pytest.raises(ConfigError, match="backend.kv_pages"):
        build_torch(make_cfg(*TINY, "parallel=pp", "backend.kv_pages=6"))
    with pytest.raises(ConfigError, match="backend.kv_pages=0"):
        build_torch(make_cfg(*TINY, "backend.kv_pages=0"))
    with pytest.raises(ConfigError, match="backend.kv_pages=10000"):
        build_torch(make_cfg(*TINY, "backend.kv_pages=10000"))
    from wicore.runtime.pipeline import PipelineBackend

    plan = StepPlan(1, 0, 0.0, [], memory_ops=[MemoryOp("swap_out", "gpu0", "cpu", 1, blocks=(BlockRef("kv", -1, 3),))])
    with pytest.raises(ConfigError, match="preemption=swap"):
        PipelineBackend.execute(types.SimpleNamespace(closed=False, broken=None), plan)  # type: ignore[arg-type]


# The simulator charges the KV that changes side, as the real runtime moves it. Before the swap ops named
# their sequences (git f4f557b) it charged every scheduler swap, also a sequence swapped in and straight back
# out in one step: continuous batching then moved 1,657,798,656 bytes in 12.234842 s here; chunked prefill
# has no such pairs and is unchanged.
SIM_SWAP = ["model=gemma3-4b", "hardware=t10x2", "scheduler.preemption=swap", "workload.num_requests=24",
            "workload.concurrency=24", "scheduler.max_num_seqs=24", "memory.gpu_memory_utilization=0.6",
            "memory.workspace_gib=3.5", "workload.prompt.kind=uniform", "workload.prompt.low=1000",
            "workload.prompt.high=2000", "workload.output.kind=uniform", "workload.output.low=200",
            "workload.output.high=400", "report.enabled=false", "progress=false"]


@pytest.mark.parametrize("batching, expected", [
    ("continuous", (4, 12.228704777951672, 1361444864, 0.05676686933333208)),
    ("chunked_prefill", (3, 12.230014303354965, 1359216640, 0.056684026666665055)),
])
def test_simulated_swaps_charge_the_kv_that_changes_side(tmp_path: Path, batching, expected):
    import pandas as pd

    summary = run_sim(make_cfg(*SIM_SWAP, f"scheduler.batching={batching}"), tmp_path)
    steps = pd.read_parquet(tmp_path / "steps.parquet")
    got = (int(summary["preemptions"]), summary["duration_s"], int(steps["link_bytes"].sum()),
           float(steps["transfer_s"].sum()))
    assert got[0] == expected[0] and got[2] == expected[2]
    assert got[1] == pytest.approx(expected[1], rel=1e-12) and got[3] == pytest.approx(expected[3], rel=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_swap_on_cuda_restores_the_kv_bit_for_bit_without_a_host_sync():
    cache = KVCache(_spec(), 3, 32, device="cuda", dtype=torch.bfloat16)
    for t in cache.k + cache.v:
        t.normal_()
    before = [t[0, :, :20].clone() for t in cache.k + cache.v]
    sw = KVSwapper(cache)
    step = sw.begin(0.0)
    sw.swap_out(step, 1, 0, 20)
    sw.mark_swapped_out(step)
    sw.slot_ready(0)  # the compute stream writes the freed slot once the swap-out is done
    for t in cache.k + cache.v:
        t[0].normal_()
    assert sw.swap_in(step, 1, 2) == 20
    sw.finish(step)  # the compute stream waits for the swap-in
    after = [t[2, :, :20].clone() for t in cache.k + cache.v]
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    result = StepResult(1, 0.0, 1.0)
    sw.report(step, result)
    assert result.transfer_s > 0 and result.link_bytes == 2 * step.bytes_out
