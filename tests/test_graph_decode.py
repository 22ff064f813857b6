"""GraphDecode: bucketed, slot-indirected decode (padded static buffers; CUDA graphs on a GPU).

On CPU the padded static-buffer path runs eagerly, so padding, the scratch slot and slicing are
checked against the plain eager decode here; the GPU test compares graph replay with eager decode.
"""

from __future__ import annotations

import random

import pytest
import torch

from experiments.run_torch import build_torch
from tests.conftest import make_cfg
from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.spec import ModelSpec
from wicore.model.transformer import Transformer, build_model
from wicore.runtime.backend import TorchBackend
from wicore.runtime.driver import TorchDriver
from wicore.runtime.graph_decode import GraphDecode, default_buckets
from wicore.types import Request

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SLOTS, MAX_LEN, PAGE = 9, 64, 8
TINY = ["model=tiny-gemma3", "workload.num_requests=10", "workload.concurrency=5",
        "workload.prompt.kind=uniform", "workload.prompt.low=5", "workload.prompt.high=40",
        "workload.output.kind=uniform", "workload.output.low=3", "workload.output.high=14",
        "report.enabled=false", "progress=false", "backend=torch", "scheduler.max_num_seqs=6"]


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelSpec, Transformer]:
    spec = ModelSpec.from_config(dict(make_cfg("model=tiny-gemma3").model))
    return spec, build_model(spec, "cpu", dtype="fp32", seed=0)


def _caches(spec: ModelSpec) -> tuple[KVCache, KVCache]:
    """An eager cache of SLOTS slots and a graph cache of SLOTS + 1 (the scratch slot), same random K/V."""
    eager, graph = KVCache(spec, SLOTS, MAX_LEN), KVCache(spec, SLOTS + 1, MAX_LEN)
    g = torch.Generator().manual_seed(1)
    for a, b in zip(eager.k + eager.v, graph.k + graph.v):
        a.copy_(torch.randn(a.shape, generator=g))
        b[:SLOTS].copy_(a)
    return eager, graph


def test_buckets_and_config_checks(tiny):
    spec, model = tiny
    assert default_buckets(1) == (1,)
    assert default_buckets(16) == (1, 2, 4, 8, 16)
    assert default_buckets(24) == (1, 2, 4, 8, 16, 24)
    gd = GraphDecode(model, KVCache(spec, 25, MAX_LEN))
    assert gd.buckets == (1, 2, 4, 8, 16, 24) and gd.scratch_slot == 24 and gd.mode == "eager"
    assert [gd.bucket(b) for b in (1, 2, 3, 5, 8, 9, 17, 24)] == [1, 2, 4, 8, 8, 16, 24, 24]
    with pytest.raises(ValueError, match="exceed"):
        gd.bucket(25)
    with pytest.raises(ValueError, match="scratch slot"):
        gd.run([1], [3], [24])
    with pytest.raises(ConfigError, match="buckets"):
        GraphDecode(model, KVCache(spec, 25, MAX_LEN), buckets=(1, 8))
    with pytest.raises(ConfigError, match="real KV slot"):
        GraphDecode(model, KVCache(spec, 1, MAX_LEN))
    with pytest.raises(ConfigError, match="backend.cuda_graphs"):
        build_torch(make_cfg(*TINY, "backend.device=cpu", "backend.cuda_graphs=maybe"))


@pytest.mark.parametrize("measure", [True, False])
def test_padded_path_equals_eager_decode_at_scattered_slots(tiny, measure):
    spec, model = tiny
    eager, graph = _caches(spec)
    gd = GraphDecode(model, graph, measure_attention=measure, page_size=PAGE)
    assert gd.buckets == (1, 2, 4, 8, 9)
    rng = random.Random(0)
    scratch_before = [t[SLOTS].clone() for t in graph.k + graph.v]
    with torch.inference_mode():
        for b in [1, 2, 3, 4, 5, 6, 7, 3, 1]:
            slots = rng.sample(range(SLOTS), b)
            pos = [rng.randrange(1, MAX_LEN) for _ in range(b)]
            ids = [rng.randrange(spec.vocab_size) for _ in range(b)]
            out = model(torch.tensor(ids)[:, None], torch.tensor(pos)[:, None], eager, torch.tensor(slots),
                        return_attention_mass=measure, last_only=True, page_size=PAGE)
            ref_logits, ref_mass = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            logits, mass = gd.run(ids, pos, slots)
            bk = gd.bucket(b)
            assert logits.shape == (bk, spec.vocab_size) and logits.dtype == torch.float32
            torch.testing.assert_close(logits[:b], ref_logits[:, -1], atol=1e-5, rtol=1e-5)
            assert logits[:b].argmax(-1).tolist() == ref_logits[:, -1].argmax(-1).tolist()
            if measure:
                assert mass is not None and ref_mass is not None and mass.shape == (bk, MAX_LEN // PAGE)
                torch.testing.assert_close(mass[:b], ref_mass, atol=1e-6, rtol=1e-5)
            else:
                assert mass is None
            for a, g in zip(eager.k + eager.v, graph.k + graph.v):  # real slots: the same contents
                torch.testing.assert_close(g[:SLOTS], a, atol=1e-5, rtol=1e-4)
    # padding rows wrote position 0 of the scratch slot only
    for before, t in zip(scratch_before, graph.k + graph.v):
        torch.testing.assert_close(t[SLOTS, :, 1:], before[:, 1:], atol=0, rtol=0)
    assert gd.calls == 9 and gd.captures == 0


def test_backend_never_hands_out_the_scratch_slot(tiny):
    spec, model = tiny
    cache = KVCache(spec, 4, MAX_LEN)
    be = TorchBackend(model, cache, 0.0, cuda_graphs=True)
    assert be.graph is not None and be.graph.scratch_slot == 3 and be.describe()["kv_slots"] == 3
    for rid in range(3):
        be.add_request(Request(rid, 0.0, 5, 3))
    assert sorted(be._slot(rid) for rid in range(3)) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="no free KV slot"):
        be._slot(3)
    be.release(1)
    assert be._slot(3) == 1
    assert TorchBackend(model, KVCache(spec, 4, MAX_LEN), 0.0).free_slots == [3, 2, 1, 0]


def _run_tokens(*overrides: str) -> tuple[dict[int, list[int]], TorchBackend]:
    setup = build_torch(make_cfg(*TINY, *overrides))
    backend = setup.backend
    finished: dict[int, list[int]] = {}
    release = backend.release

    def keep(rid: int) -> None:
        finished[rid] = list(backend.tokens[rid])
        release(rid)

    backend.release = keep  # type: ignore[method-assign]
    TorchDriver(setup.engine, backend, setup.workload, setup.t0).run()
    return finished, backend


def test_engine_workload_gives_identical_tokens_with_and_without_graph_decode():
    plain, be_plain = _run_tokens("backend.device=cpu", "backend.cuda_graphs=false")
    graphed, be_graph = _run_tokens("backend.device=cpu", "backend.cuda_graphs=true")
    assert be_plain.graph is None and be_plain.cache.max_slots == 6
    assert be_graph.graph is not None and be_graph.cache.max_slots == 7  # + the scratch slot
    assert be_graph.graph.calls > 0 and be_graph.describe()["cuda_graphs"] == "eager"
    assert len(plain) == 10 and graphed == plain
    # auto is off on CPU; routing keeps the eager decode (and no scratch slot)
    _, be_auto = _run_tokens("backend.device=cpu", "backend.cuda_graphs=auto", "workload.num_requests=1")
    assert be_auto.graph is None and be_auto.cache.max_slots == 6
    s = build_torch(make_cfg(*TINY, "backend.device=cpu", "backend.cuda_graphs=true", "routing=mor",
                             "routing.scorer=confidence", "routing.cpu_depth=2"))
    assert s.backend.graph is None and s.backend.cache.max_slots == 6
    s.backend.mor.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_gives_the_eager_tokens_on_gpu(tiny):
    spec, _ = tiny
    model = build_model(spec, "cuda", dtype="fp32", seed=0)
    eager, graph = KVCache(spec, SLOTS, MAX_LEN, "cuda"), KVCache(spec, SLOTS + 1, MAX_LEN, "cuda")
    gd = GraphDecode(model, graph, measure_attention=True, page_size=PAGE)
    assert gd.mode == "graph"
    rng = random.Random(0)
    with torch.inference_mode():
        for b in [1, 3, 7, 2, 7, 9]:
            slots = rng.sample(range(SLOTS), b)
            pos = [rng.randrange(1, MAX_LEN) for _ in range(b)]
            ids = [rng.randrange(spec.vocab_size) for _ in range(b)]
            dev = torch.device("cuda")
            ref, ref_mass = model(torch.tensor(ids, device=dev)[:, None], torch.tensor(pos, device=dev)[:, None],
                                  eager, torch.tensor(slots, device=dev), return_attention_mass=True,
                                  last_only=True, page_size=PAGE)
            logits, mass = gd.run(ids, pos, slots)
            torch.testing.assert_close(logits[:b], ref[:, -1], atol=1e-4, rtol=1e-4)
            assert logits[:b].argmax(-1).tolist() == ref[:, -1].argmax(-1).tolist()
            assert mass is not None
            torch.testing.assert_close(mass[:b], ref_mass, atol=1e-5, rtol=1e-4)
    assert gd.captures == len({gd.bucket(b) for b in [1, 3, 7, 2, 7, 9]})
    plain, _ = _run_tokens("backend.device=cuda", "backend.cuda_graphs=false", "model.dtype=fp32")
    graphed, be = _run_tokens("backend.device=cuda", "backend.cuda_graphs=true", "model.dtype=fp32")
    assert be.graph is not None and be.graph.mode == "graph" and be.graph.captures > 0
    assert graphed == plain
