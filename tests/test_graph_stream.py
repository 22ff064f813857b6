"""CUDA graphs over streamed layers (the streamer's graph-safe schedule, ``wicore.runtime.offload``).

The CPU side (the schedule's numbers, counters, recovery and run_torch wiring) is in ``test_offload``; here a
GPU captures the streamed forward: its copies, events and device dequant inside the graph.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_offload import gemma, run_tokens, streaming_budget_gib
from wicore.model.kv_cache import KVCache
from wicore.model.transformer import build_model
from wicore.runtime.graph_decode import GraphDecode
from wicore.runtime.graph_prefill import GraphPrefill
from wicore.runtime.offload import offload_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("torch_one_thread")]


@pytest.mark.parametrize("host_format", ["auto", "int8"])
def test_graphs_replay_the_streamed_forward(host_format):
    spec = gemma()
    dev = torch.device("cuda")
    base = build_model(spec, "cpu", seed=0)
    streamed_model, eager_model = copy.deepcopy(base), copy.deepcopy(base)
    st = offload_model(streamed_model, [1, 3, 5], dev, host_format=host_format, schedule="forward")
    ref_st = offload_model(eager_model, [1, 3, 5], dev, host_format=host_format, schedule="forward")
    slots, max_len = 3, 64
    gcache, ecache = KVCache(spec, slots + 1, max_len, dev), KVCache(spec, slots + 1, max_len, dev)
    gp, gd = GraphPrefill(streamed_model, gcache), GraphDecode(streamed_model, gcache, scratch_slot=slots)
    assert gp.mode == gd.mode == "graph" and gd.on_replay == st.replayed
    assert st.pinned_with == "pin_memory"  # a capture refuses copies from cudaHostRegister'ed blocks
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 30)]
    with torch.inference_mode():
        toks = []
        for slot, ids in enumerate(prompts):
            out = gp.run(ids, 0, slot)
            ref = eager_model(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None, :], ecache,
                              torch.tensor([slot], device=dev), last_only=True)[:, -1]
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            toks.append(int(ref.argmax()))
        lens = [len(p) for p in prompts]
        for _ in range(6):  # decode steps: the first captures, the rest replay
            logits, _ = gd.run(toks, lens, list(range(slots)))
            ref = eager_model(torch.tensor([[t] for t in toks], device=dev), torch.tensor([[n] for n in lens],
                              device=dev), ecache, torch.arange(slots, device=dev), last_only=True)[:, -1]
            torch.testing.assert_close(logits[:slots], ref, atol=1e-4, rtol=1e-4)
            toks = [int(x) for x in ref.argmax(-1).tolist()]
            lens = [n + 1 for n in lens]
    torch.cuda.synchronize()
    # every forward counted once: eager ones (each capture's 2 warm-up forwards) by the hooks, replays by
    # replayed(); a capture itself moves nothing and counts nothing
    extra = 2 * (gp.captures + gd.captures)
    assert gp.captures == 2 and gd.captures == 1
    assert st.forwards == ref_st.forwards + extra
    assert st.bytes_copied == ref_st.bytes_copied + extra * st.bytes_per_forward
    assert st.resyncs == 0


def test_engine_with_graphs_over_streamed_layers_gives_the_eager_streamed_tokens():
    """The same streamed layers (weights read from the same slot offsets) with and without the graphs."""
    budget = f"backend.gpu_budget_gib={streaming_budget_gib(gemma(), 3):.9f}"
    cuda = ("backend.device=cuda", "model.dtype=fp32", budget)
    plain, eager = run_tokens(*cuda)
    graphed, setup = run_tokens(*cuda, "backend.cuda_graphs=true", "backend.prefill_graphs=true")
    be = setup.backend  # type: ignore[attr-defined]
    assert not eager.backend.streamer.per_forward  # type: ignore[attr-defined]
    assert be.streamer.per_forward and be.graph.mode == "graph" and be.graph.captures > 0
    assert be.prefill_graph.captures > 0
    same = sum(graphed[r] == plain[r] for r in plain)
    print(f"requests with equal tokens, streamed graphs vs streamed eager: {same} of {len(plain)}")
    assert graphed == plain
