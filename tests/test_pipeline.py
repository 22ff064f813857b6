"""Pipeline parallelism on the real runtime (wicore.runtime.pipeline) on the CPU: 2 processes over gloo.

Same tokens and attention mass as one device, the same result schema, start-up config errors, and a
failure on any rank surfacing on rank 0 without hanging.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.conftest import make_cfg  # noqa: E402
from wicore.errors import ConfigError  # noqa: E402
from wicore.hal import GIB  # noqa: E402
from wicore.model.checkpoint import load_checkpoint, load_spec_file, write_random_checkpoint  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import build_model  # noqa: E402
from wicore.runtime import pipeline  # noqa: E402
from wicore.runtime.backend import TorchBackend  # noqa: E402
from wicore.runtime.pipeline import Fault, PipelineConfig, PipelineError, pipeline_devices  # noqa: E402
from wicore.runtime.stage import build_stage  # noqa: E402
from wicore.runtime.warmup import warm_up  # noqa: E402
from wicore.types import BatchItem, Phase, Request, StepPlan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = load_spec_file(ROOT / "conf" / "model" / "tiny-gemma3.yaml")
LLAMA = ModelSpec(name="tiny-llama", family="llama", num_layers=4, hidden_size=32, intermediate_size=64,
                  num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=96, max_context=64, rope_theta=500000.0,
                  rope_local_base=500000.0, tie_embeddings=False, rms_norm_eps=1e-5, dtype="fp32")
RUN = ["model=tiny-gemma3", "workload.num_requests=8", "workload.concurrency=3",
       "workload.prompt.kind=uniform", "workload.prompt.low=5", "workload.prompt.high=40",
       "workload.output.kind=uniform", "workload.output.low=3", "workload.output.high=10",
       "scheduler.batching=chunked_prefill", "scheduler.max_batched_tokens=16", "backend.max_len=128",
       "report.enabled=false", "progress=false", "backend=torch", "backend.device=cpu"]

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(autouse=True)
def no_leftover_ranks():
    yield
    assert not dist.is_initialized(), "a pipeline left the process group open"
    assert not multiprocessing.active_children(), "a pipeline left worker processes behind"


# ----- stages, in one process ------------------------------------------------------------------------
@pytest.mark.parametrize("spec,pp", [(TINY, 2), (TINY, 3), (LLAMA, 2)])
def test_chained_stages_hold_only_their_tensors_and_compute_the_whole_model(spec, pp):
    full = build_model(spec, "cpu", seed=5)
    stages = [build_stage(spec, r, pp, "cpu", 2, 48, seed=5) for r in range(pp)]
    ref = dict(full.named_parameters())
    seen: set[str] = set()
    for s in stages:
        names = dict(s.model.named_parameters())
        layers = {int(n.split(".")[1]) for n in names if n.startswith("layers.")}
        assert layers == set(s.layers)
        assert ("embed_tokens.weight" in names) == (s.rank == 0 or (s.rank == pp - 1 and spec.tie_embeddings))
        assert ("norm.weight" in names) == (s.rank == pp - 1)
        for n, p in names.items():
            assert torch.equal(p, ref[n]), n  # build_model's seeded init, replayed per stage
        seen |= set(names)
        assert s.cache.nbytes == KVCache(spec, 2, 48).nbytes * len(s.layers) // spec.num_layers
    assert seen == set(ref)
    ids = torch.randint(0, spec.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    cache = KVCache(spec, 2, 48)
    with torch.inference_mode():
        for t0, t1 in ((0, 20), (20, 21), (21, 22)):  # prefill, then two decode steps over the cache
            pos = torch.arange(t0, t1).expand(2, t1 - t0)
            decode = t1 - t0 == 1
            out = full(ids[:, t0:t1], pos, cache, None, decode, last_only=True)
            want, want_mass = out if isinstance(out, tuple) else (out, None)
            x, m = ids[:, t0:t1], None
            for s in stages:
                x, m = s.model(x, pos, s.cache, None, m, attention_mass=decode)
            assert torch.equal(x, want)
            if decode:
                assert m is not None and want_mass is not None and torch.equal(m, want_mass)
            else:
                assert m is None


def test_a_stage_reads_only_its_tensors_from_a_checkpoint(tmp_path):
    write_random_checkpoint(TINY, tmp_path, dtype="fp32", seed=2)
    ref = dict(load_checkpoint(tmp_path, dtype="fp32")[0].named_parameters())
    last = build_stage(TINY, 1, 2, "cpu", 1, 16, checkpoint=str(tmp_path))
    names = dict(last.model.named_parameters())
    assert {n for n in names if n.startswith("layers.")} == {n for n in ref if n.split(".")[:2] in
                                                             (["layers", "3"], ["layers", "4"], ["layers", "5"])}
    for n, p in names.items():
        assert torch.equal(p, ref[n]), n


# ----- start-up errors -----------------------------------------------------------------------------------
def test_configs_that_cannot_be_split_fail_at_start_up():
    with pytest.raises(ConfigError, match="parallel.pp=7"):
        run_setup("parallel=pp", "parallel.pp=7")  # 6 layers, 7 stages
    with pytest.raises(ConfigError, match="parallel.pp=3"):
        run_setup("parallel=pp", "parallel.pp=3", "model.num_layers=2")
    with pytest.raises(ConfigError, match="parallel.tp"):
        run_setup("parallel.tp=2")
    with pytest.raises(ConfigError, match="parallel.replicas"):
        run_setup("parallel=replicas")
    with pytest.raises(ConfigError, match="routing.enabled"):
        run_setup("parallel=pp", "routing=mor", "routing.scorer=confidence", "routing.cpu_depth=2")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        pipeline_devices(torch.device("cuda:0"), 3, 62, visible_gpus=2)
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        pipeline_devices(torch.device("cuda:1"), 2, 62, visible_gpus=2)
    assert pipeline_devices(torch.device("cuda:1"), 2, 62, visible_gpus=3) == ("cuda:1", "cuda:2")
    assert pipeline_devices(torch.device("cpu"), 3, 6, visible_gpus=0) == ("cpu",) * 3
    with pytest.raises(ConfigError, match="outside its stage"):
        pipeline.launch(PipelineConfig(TINY, ("cpu", "cpu"), 1, 16, streamed=((4,), ())))


def run_setup(*overrides: str):
    from experiments.run_torch import build_torch

    return build_torch(make_cfg(*RUN, *overrides))


# ----- two processes ------------------------------------------------------------------------------------
class Twin:
    """The same hand-written plans on a one-device TorchBackend and on a pp=2 pipeline."""

    def __init__(self, pipe: pipeline.PipelineBackend, exact: bool = True) -> None:
        spec = TINY
        self.exact = exact
        self.one = TorchBackend(build_model(spec, "cpu", seed=0), KVCache(spec, 4, 96), 0.0,
                                seed=0, measure_attention=True)
        self.pipe = pipe
        self.ctx: dict[int, int] = {}
        self.step = 0

    def add(self, rid: int, prompt: int, **sampling: float) -> None:
        for b in (self.one, self.pipe):
            b.add_request(Request(rid, 0.0, prompt, 50, sampling=sampling or None))
        self.ctx[rid] = 0

    def run(self, prefill: dict[int, int], decode: list[int], restart: int | None = None) -> None:
        """Prefill ``n`` more tokens of each request in ``prefill`` (emits when it reaches the end of its
        tokens), decode one token of each in ``decode``; ``restart``: recompute that request from 0."""
        items = []
        if restart is not None:
            self.ctx[restart] = 0
            prefill = {**prefill, restart: len(self.one.tokens[restart])}
        for rid, n in prefill.items():
            c = self.ctx[rid]
            items.append(BatchItem(rid, Phase.PREFILL, n, c, c + n == len(self.one.tokens[rid])))
            self.ctx[rid] = c + n
        for rid in decode:
            items.append(BatchItem(rid, Phase.DECODE, 1, self.ctx[rid], True))
            self.ctx[rid] += 1
        self.step += 1
        a = self.one.execute(StepPlan(self.step, 0, 0.0, items))
        b = self.pipe.execute(StepPlan(self.step, 0, 0.0, items))
        assert a.tokens and a.tokens == b.tokens, self.step
        if self.exact:
            assert a.attention_mass == b.attention_mass, self.step  # summed over both stages' layers
        else:  # the stage graphs' buffers: the same sums to float rounding
            assert a.attention_mass.keys() == b.attention_mass.keys(), self.step
            for rid, row in a.attention_mass.items():
                assert b.attention_mass[rid] == pytest.approx(row, rel=1e-5), (self.step, rid)
        assert self.one.tokens == self.pipe.tokens


def small(**kw: object) -> PipelineConfig:
    base = PipelineConfig(TINY, ("cpu", "cpu"), slots=4, max_len=96, seed=0, measure_attention=True,
                          threads=1, step_timeout_s=20.0)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "stage-graphs"])
def test_pp2_gives_the_tokens_and_attention_mass_of_one_device(graphs, monkeypatch):
    """With ``cuda_graphs`` each stage decodes through GraphStage's padded static buffers (eagerly on the CPU:
    3 decode rows run as a bucket of 4 whose padding row writes the stages' scratch slot). Closing leaves the
    process group before waiting for the stopped ranks (NCCL's destroy is collective: they wait in theirs)."""
    calls: list[str] = []
    leave, stop = pipeline.leave_group_within, pipeline.stop_processes
    monkeypatch.setattr(pipeline, "leave_group_within", lambda t: calls.append("leave") or leave(t))
    monkeypatch.setattr(pipeline, "stop_processes", lambda p, g: calls.append(f"stop {g:g}") or stop(p, g))
    with pipeline.launch(small(cuda_graphs=graphs)) as pipe:
        assert [s["layers"] for s in pipe.stage_stats()] == ["0-2", "3-5"]
        # the run's warm-up (greedy throw-away requests) leaves the last rank's sampling generator as it was
        assert warm_up(pipe, 16, [3])["decode_batches"] == [3] and not pipe.slots
        t = Twin(pipe, exact=not graphs)
        t.add(0, 20)
        t.add(1, 7, temperature=0.8, top_k=20, top_p=0.9)  # sampled: the last rank's seeded generator
        t.add(2, 12)
        t.run({0: 12, 1: 7}, [])  # a chunk that emits nothing + a whole prompt
        t.run({0: 8}, [1])
        t.run({2: 12}, [0, 1])
        t.run({}, [0, 1, 2])
        t.run({}, [0, 2], restart=1)  # recompute preemption: slot freed on every rank, prompt + output again
        t.run({}, [0, 1, 2])
        stats = pipe.stage_stats()
        assert stats[0]["activation_bytes_sent"] > 0 and stats[1]["activation_bytes_sent"] == 0
        pipe.reset_counters()
        assert pipe.stage_stats()[0]["activation_bytes_sent"] == 0
        d = pipe.describe()
        assert d["pp"] == 2 and d["device"] == "cpu,cpu" and d["kv_slots"] == 4
        assert d["kv_cache_bytes"] == KVCache(TINY, 4 + graphs, 96).nbytes  # + the graphs' scratch slot
        assert d["cuda_graphs"] == ("eager" if graphs else "off")
        if graphs:
            assert all(s["graph_buckets"] == [1, 2, 4] for s in d["stages"])
    assert calls == ["leave", "stop 30"] and not dist.is_initialized()
    with pytest.raises(PipelineError, match="closed"):
        pipe.execute(StepPlan(99, 0, 0.0, [BatchItem(0, Phase.DECODE, 1, 0, True)]))


def test_leaving_the_group_is_waited_for_a_bounded_time(monkeypatch):
    """A destroy that does not return (NCCL waiting for a rank that never calls its own) is left to its thread
    after the timeout; the caller then stops the ranks instead of hanging."""
    from wicore.runtime import pipeline_worker

    release = threading.Event()
    monkeypatch.setattr(pipeline_worker.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pipeline_worker, "destroy_group", lambda abort: release.wait(10.0))
    t0 = time.monotonic()
    assert pipeline_worker.leave_group_within(0.2) is False
    assert time.monotonic() - t0 < 5.0
    release.set()
    monkeypatch.setattr(pipeline_worker, "destroy_group", lambda abort: None)
    assert pipeline_worker.leave_group_within(5.0) is True


def budget_per_gpu(spec: ModelSpec, resident: int, buffers: int) -> float:
    """A GPU budget (default MemoryConfig but ``buffers`` stream buffers) under which ``resident`` layers
    of a stage stay on its GPU when some must be streamed."""
    fixed = 0.5 * GIB + spec.embedding_bytes + buffers * spec.layer_bytes + 2 * GIB  # workspace, emb, kv_min
    return (fixed + (resident + 0.5) * spec.layer_bytes) / 0.92 / GIB


def run_keeping_tokens(monkeypatch, out: Path, *overrides: str) -> tuple[dict[int, list[int]], dict]:
    from experiments.run_torch import run_torch

    kept: dict[int, list[int]] = {}
    release = TorchBackend.release

    def keep(self, rid: int) -> None:
        if rid >= 0:  # negative ids: the warm-up's throw-away requests
            kept[rid] = list(self.tokens[rid])
        release(self, rid)

    monkeypatch.setattr(TorchBackend, "release", keep)
    summary = run_torch(make_cfg(*RUN, *overrides), out)
    return kept, summary


def test_run_torch_pp2_streams_per_gpu_with_the_tokens_and_schema_of_one_device(tmp_path, monkeypatch):
    one, s1 = run_keeping_tokens(monkeypatch, tmp_path / "pp1")
    budget = f"backend.gpu_budget_gib={budget_per_gpu(TINY, 1, 1):.9f}"  # each stage: 1 resident, 2 streamed
    two, s2 = run_keeping_tokens(monkeypatch, tmp_path / "pp2", "parallel=pp", budget, "memory.stream_buffer_layers=1")
    assert len(one) == 8 and two == one
    assert s1["run"]["parallel"] == "1x(tp1,pp1)" and s2["run"]["parallel"] == "1x(tp1,pp2)"
    assert set(s1) == set(s2) and set(s1["run"]) == set(s2["run"])
    for table in ("requests", "steps", "tiers"):
        a = pd.read_parquet(tmp_path / "pp1" / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "pp2" / f"{table}.parquet")
        assert list(a.columns) == list(b.columns), table
        assert dict(a.dtypes) == dict(b.dtypes) or table == "tiers", table
    assert {"gpu0", "gpu1"} <= set(pd.read_parquet(tmp_path / "pp2" / "tiers.parquet")["tier"])
    placement = json.loads((tmp_path / "pp2" / "placement.json").read_text())
    assert placement["pp"] == 2 and placement["streamed_layers"] == 4
    assert [s["streamed_layers"] for s in placement["stages"]] == [2, 2]
    per_forward = placement["stream_bytes_per_forward"]
    assert per_forward == round(placement["offloaded_gib"] * GIB)  # both GPUs' streamed layers
    steps = pd.read_parquet(tmp_path / "pp2" / "steps.parquet")
    assert (steps["link_bytes"] > 0).all() and (steps["link_bytes"] % per_forward == 0).all()


def test_run_torch_pp2_with_stage_graphs_gives_the_tokens_of_one_device(tmp_path, monkeypatch, caplog):
    """backend.cuda_graphs=true with parallel=pp: every stage decodes through its GraphStage (the padded path,
    eagerly on the CPU) and the run's tokens are those of one device; backend.prefill_graphs=true, not implemented
    for a pipeline, is said in a warning (the stages prefill eagerly), not dropped silently."""
    one, _ = run_keeping_tokens(monkeypatch, tmp_path / "pp1")
    caplog.set_level("WARNING", logger="wicore")
    two, s2 = run_keeping_tokens(monkeypatch, tmp_path / "pp2", "parallel=pp", "backend.cuda_graphs=true",
                                 "backend.prefill_graphs=true")
    assert len(one) == 8 and two == one
    placement = json.loads((tmp_path / "pp2" / "placement.json").read_text())
    assert placement["cuda_graphs"] == "eager" and all(s["graphs_captured"] == 0 for s in placement["stages"])
    # with layers streamed on every stage: the streamers run the graph-safe schedule a capture can hold
    budget = f"backend.gpu_budget_gib={budget_per_gpu(TINY, 1, 1):.9f}"
    three, _ = run_keeping_tokens(monkeypatch, tmp_path / "pp2s", "parallel=pp", "backend.cuda_graphs=true", budget,
                                  "memory.stream_buffer_layers=1")
    assert three == one
    streamed = json.loads((tmp_path / "pp2s" / "placement.json").read_text())
    assert streamed["streamed_layers"] == 4 and streamed["cuda_graphs"] == "eager"
    assert s2["run"]["parallel"] == "1x(tp1,pp2)"
    assert "prefill graphs are not implemented with parallel.pp > 1" in caplog.text


# ----- failures ------------------------------------------------------------------------------------------
def failing(monkeypatch, fault: Fault, step_timeout_s: float = 30.0) -> dict[str, float]:
    """Launch pipelines with ``fault``; returns when the last launch finished (``ready``)."""
    launch = pipeline.launch
    when: dict[str, float] = {}

    def launch_failing(cfg: PipelineConfig) -> pipeline.PipelineBackend:
        backend = launch(replace(cfg, fault=fault, step_timeout_s=step_timeout_s, start_timeout_s=60.0))
        when["ready"] = time.perf_counter()
        return backend

    monkeypatch.setattr(pipeline, "launch", launch_failing)
    return when


@pytest.mark.parametrize("fault,match", [
    (Fault(1, 3, "raise"), r"rank 1 failed at step \d+:(.|\n)*injected fault on rank 1 at step 3"),
    pytest.param(Fault(1, 3, "exit"), "rank 1 exited with code 17", marks=pytest.mark.slow),
    pytest.param(Fault(0, 2, "raise"), "rank 0: RuntimeError: injected fault on rank 0 at step 2",
                 marks=pytest.mark.slow),
    pytest.param(Fault(1, 2, "hang"), "rank 1 did not answer step .* within 3 s", marks=pytest.mark.slow),
])
def test_a_failing_rank_is_an_error_on_rank_0_not_a_hang(monkeypatch, tmp_path, fault, match):
    timeout = 3.0 if fault.mode == "hang" else 30.0
    when = failing(monkeypatch, fault, step_timeout_s=timeout)
    with pytest.raises(PipelineError, match=match):  # the fault's step counts the run's steps: no warm-up
        run_keeping_tokens(monkeypatch, tmp_path, "parallel=pp", "backend.warmup=false")
    took = time.perf_counter() - when["ready"]
    assert took < timeout / 2 if fault.mode != "hang" else timeout <= took < 3 * timeout  # the failure, not a timeout


def test_a_rank_failing_in_the_warm_up_fails_the_start_up_and_stops_the_ranks(monkeypatch, tmp_path):
    """The warm-up's steps (negative ids) go through the ranks before the clock: a rank failing there is reported
    and the pipeline is closed (the autouse check: no process group, no worker left)."""
    failing(monkeypatch, Fault(1, 2, "raise"))
    with pytest.raises(PipelineError, match=r"rank 1 failed at step -\d+:(.|\n)*injected fault on rank 1 at step 2"):
        run_keeping_tokens(monkeypatch, tmp_path, "parallel=pp")


@pytest.mark.slow
def test_a_rank_failing_to_build_its_stage_fails_the_start_up(monkeypatch):
    failing(monkeypatch, Fault(1, 0, "raise"))
    t0 = time.perf_counter()
    with pytest.raises(PipelineError, match="rank 1(.|\n)*injected fault on rank 1 at step 0"):
        run_setup("parallel=pp")
    assert time.perf_counter() - t0 < 30.0  # reported over the start-up pipe, not the 60 s start timeout


# ----- benchmarks/gpu_pipeline.py on the CPU ---------------------------------------------------------------
@pytest.mark.slow
def test_gpu_pipeline_benchmark_smoke(tmp_path):
    path = ROOT / "benchmarks" / "gpu_pipeline.py"
    mod_spec = importlib.util.spec_from_file_location("gpu_pipeline_bench", path)
    assert mod_spec is not None and mod_spec.loader is not None
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for name in ("large_pp1", "large_pp2", "small_pp1", "small_pp2"):
        assert "error" not in res[name], res[name].get("error")
    large = res["large_pp2"]
    assert all(r["decode_tok_s"] > 0 for r in large["batches"].values())
    assert [g["streamed_layers"] for g in large["gpus"]] == [2, 2]
    assert large["tokens_vs_pp1"]["matching"] == large["tokens_vs_pp1"]["compared"] > 0
    assert res["small_pp2"]["tokens_vs_pp1"]["matching"] == res["small_pp2"]["tokens_vs_pp1"]["compared"] > 0
    assert (tmp_path / "table.md").read_text().startswith("| metric |")
    assert (tmp_path / "log.txt").read_text()
