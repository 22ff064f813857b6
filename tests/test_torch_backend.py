"""The real runtime behind the same engine: same configs, same schema, correct tokens."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from experiments.run import run_sim
from experiments.run_torch import build_torch, run_torch
from tests.conftest import make_cfg
from wicore.runtime.driver import TorchDriver
from wicore.types import Phase, kv_pages

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = ["model=tiny-gemma3", "workload.num_requests=12", "workload.concurrency=4",
        "workload.prompt.kind=uniform", "workload.prompt.low=5", "workload.prompt.high=40",
        "workload.output.kind=uniform", "workload.output.low=3", "workload.output.high=12",
        "report.enabled=false", "progress=false"]


def test_same_config_runs_on_both_backends_with_the_same_schema(tmp_path):
    sim = run_sim(make_cfg(*TINY, "hardware=h100"), tmp_path / "sim")
    real = run_torch(make_cfg(*TINY, "backend=torch", "backend.device=cpu"), tmp_path / "torch")
    assert sim["finished"] == real["finished"] == 12
    for table in ("requests", "steps", "tiers"):
        a = pd.read_parquet(tmp_path / "sim" / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "torch" / f"{table}.parquet")
        assert list(a.columns) == list(b.columns), table
        assert dict(a.dtypes) == dict(b.dtypes) or table == "tiers", table
    a = pd.read_parquet(tmp_path / "sim" / "requests.parquet")
    b = pd.read_parquet(tmp_path / "torch" / "requests.parquet")
    # the same workload: the same requests with the same lengths, joinable by id
    joined = a.merge(b, on="request_id", suffixes=("_sim", "_torch"))
    assert len(joined) == 12
    assert (joined["prompt_tokens_sim"] == joined["prompt_tokens_torch"]).all()
    assert (joined["output_tokens_sim"] == joined["output_tokens_torch"]).all()


def test_continuous_batching_gives_the_tokens_of_running_each_request_alone():
    """Greedy decoding through the engine (mixed prefill/decode, rows at different
    positions in one batch) must equal a plain full-recompute greedy loop."""
    setup = build_torch(make_cfg(*TINY, "backend=torch", "backend.device=cpu"))
    finished = {}
    backend = setup.backend
    original_release = backend.release

    def keep(rid: int) -> None:
        finished[rid] = list(backend.tokens[rid])
        original_release(rid)

    backend.release = keep  # type: ignore[method-assign]
    TorchDriver(setup.engine, backend, setup.workload, setup.t0).run()
    assert len(finished) == 12
    model = backend.model
    for rid, tokens in finished.items():
        prompt_len = int(setup.workload.prompts[rid])
        ids = tokens[:prompt_len]
        with torch.inference_mode():
            for _ in range(len(tokens) - prompt_len):
                x = torch.tensor([ids])
                logits = model(x, torch.arange(len(ids))[None, :])
                ids.append(int(logits[0, -1].argmax()))
        assert ids == tokens, rid


@pytest.mark.parametrize("graphs", [False, True])
def test_attention_mass_feedback_is_measured(graphs):
    """Every decoding request gets one mass value per KV page it holds (rows read from a batch padded to its
    longest context, or from a graph bucket's buffers, are cut to the request's own pages)."""
    setup = build_torch(make_cfg(*TINY, "backend=torch", "backend.device=cpu", "workload.num_requests=3",
                                 "workload.concurrency=3", f"backend.cuda_graphs={str(graphs).lower()}"))
    masses = []
    engine, backend = setup.engine, setup.backend
    original = backend.execute

    def spy(plan):
        res = original(plan)
        dec = {it.request_id: it.context_len for it in plan.items if it.phase is Phase.DECODE}
        assert res.attention_mass.keys() == dec.keys()
        for rid, row in res.attention_mass.items():
            assert len(row) == kv_pages(dec[rid] + 1, backend.page_tokens), (rid, dec[rid])
        if res.attention_mass:
            masses.append(res.attention_mass)
        return res

    backend.execute = spy  # type: ignore[method-assign]
    TorchDriver(engine, backend, setup.workload, setup.t0).run()
    assert masses
    assert any(len({len(r) for r in m.values()}) > 1 for m in masses)  # rows of different lengths in one step
    for m in masses:
        for row in m.values():  # a query's attention probabilities sum to 1
            assert min(row) >= 0
            assert abs(sum(row) - 1.0) < 1e-4
