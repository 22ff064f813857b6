"""GraphPrefill: one prefill chunk right-padded to a length bucket (CUDA graphs on a GPU).

On CPU the padded static-buffer path runs eagerly, so the padding, the length-bucket choice and the
last-real-token selection are checked against the plain eager prefill here; the GPU test compares
graph replay with the eager forward.
"""

from __future__ import annotations

import pytest
import torch

from experiments.run_torch import build_torch
from tests.conftest import make_cfg
from tests.test_graph_decode import TINY, _run_tokens
from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.spec import ModelSpec
from wicore.model.transformer import Transformer, build_model
from wicore.runtime.buckets import bucket_of, prefill_buckets
from wicore.runtime.graph_prefill import GraphPrefill

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SLOTS, MAX_LEN = 3, 96


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelSpec, Transformer]:
    spec = ModelSpec.from_config(dict(make_cfg("model=tiny-gemma3").model))
    return spec, build_model(spec, "cpu", dtype="fp32", seed=0)


def test_prefill_buckets():
    assert prefill_buckets(2048) == (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
    assert prefill_buckets(100) == (16, 32, 48, 64, 96, 100)
    assert prefill_buckets(16) == (16,) and prefill_buckets(5) == (5,)
    with pytest.raises(ConfigError, match=">= 1 token"):
        prefill_buckets(0)
    b = prefill_buckets(2048)
    assert [bucket_of(t, b) for t in (1, 16, 17, 33, 49, 100, 1025, 2048, 2049)] == \
        [16, 16, 32, 48, 64, 128, 1536, 2048, None]
    # a chunk pads by at most half its size above 32 tokens
    assert all(bucket_of(t, b) <= 1.5 * t for t in range(33, 2049))


def test_fits_and_argument_checks(tiny):
    spec, model = tiny
    gp = GraphPrefill(model, KVCache(spec, SLOTS, MAX_LEN))
    assert gp.buckets == (16, 32, 48, 64, 96) and gp.mode == "eager"
    assert gp.fits(10, 0) and gp.fits(40, 48) and not gp.fits(40, 49) and not gp.fits(0, 0)
    assert not gp.fits(97, 0)
    with pytest.raises(ValueError, match="does not fit"):
        gp.run([1] * 40, 49, 0)
    with pytest.raises(ValueError, match="outside the cache's slots"):
        gp.run([1] * 4, 0, SLOTS)
    with pytest.raises(ConfigError, match="at most the KV slot length"):
        GraphPrefill(model, KVCache(spec, SLOTS, MAX_LEN), buckets=(16, 128))
    with pytest.raises(ConfigError, match="backend.prefill_graphs"):
        build_torch(make_cfg(*TINY, "backend.device=cpu", "backend.prefill_graphs=sometimes"))


def _chunks() -> list[tuple[int, int, int]]:
    """(slot, context, tokens) of consecutive chunks: a request prefilled in pieces while others start."""
    return [(0, 0, 5), (1, 0, 33), (0, 5, 16), (2, 0, 1), (1, 33, 40), (0, 21, 60), (2, 1, 47)]


def test_padded_chunks_equal_the_eager_prefill(tiny):
    """Logits of each chunk's last token and the K/V of every real position match the unpadded forward;
    padding wrote only positions past the chunk (later overwritten or masked)."""
    spec, model = tiny
    eager, padded = KVCache(spec, SLOTS, MAX_LEN), KVCache(spec, SLOTS, MAX_LEN)
    gp = GraphPrefill(model, padded)
    g = torch.Generator().manual_seed(3)
    ids = {s: torch.randint(0, spec.vocab_size, (MAX_LEN,), generator=g).tolist() for s in range(SLOTS)}
    written = dict.fromkeys(range(SLOTS), 0)
    with torch.inference_mode():
        for slot, ctx, t in _chunks():
            chunk = ids[slot][ctx:ctx + t]
            ref = model(torch.tensor([chunk]), torch.arange(ctx, ctx + t)[None, :], eager, torch.tensor([slot]),
                        last_only=True)[:, -1]
            assert gp.fits(t, ctx)
            out = gp.run(chunk, ctx, slot)
            assert out.shape == (1, spec.vocab_size) and out.dtype == torch.float32
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            assert out.argmax(-1).item() == ref.argmax(-1).item()
            written[slot] = ctx + t
            for a, b in zip(eager.k + eager.v, padded.k + padded.v):
                for s, n in written.items():
                    torch.testing.assert_close(b[s, :, :n], a[s, :, :n], atol=1e-4, rtol=1e-4)
    assert gp.calls == len(_chunks()) and gp.captures == 0


def test_engine_gives_the_eager_tokens_with_prefill_graphs():
    plain, _ = _run_tokens("backend.device=cpu")
    padded, be = _run_tokens("backend.device=cpu", "backend.prefill_graphs=true", "backend.cuda_graphs=true")
    assert be.prefill_graph is not None and be.prefill_graph.calls > 0
    assert be.describe()["prefill_graphs"] == "eager" and be.graph is not None
    assert padded == plain and len(plain) == 10
    # chunked prefill: chunks at a context > 0 run padded too
    chunked = ("scheduler.batching=chunked_prefill", "scheduler.max_batched_tokens=16")
    plain, _ = _run_tokens("backend.device=cpu", *chunked)
    padded, be = _run_tokens("backend.device=cpu", "backend.prefill_graphs=true", *chunked)
    assert padded == plain and be.prefill_graph is not None and be.graph is None
    # routing keeps the eager prefill
    s = build_torch(make_cfg(*TINY, "backend.device=cpu", "backend.prefill_graphs=true", "routing=mor",
                             "routing.scorer=confidence", "routing.cpu_depth=2"))
    assert s.backend.prefill_graph is None
    s.backend.mor.close()


def test_warm_up_runs_every_reachable_prefill_bucket():
    setup = build_torch(make_cfg(*TINY, "backend.device=cpu", "backend.prefill_graphs=true", "backend.warmup=true"))
    longest = int(setup.workload.prompts.max())
    gp = setup.backend.prefill_graph
    assert gp is not None
    top = gp.bucket(longest)
    assert setup.warmup is not None and setup.warmup["prefill_sizes"] == [b for b in gp.buckets if b <= top]
    assert not setup.backend.requests and not setup.backend.slots


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_prefill_gives_the_eager_logits_on_gpu(tiny):
    spec, _ = tiny
    dev = torch.device("cuda")
    model = build_model(spec, dev, dtype="fp32", seed=0)
    eager, padded = KVCache(spec, SLOTS, MAX_LEN, dev), KVCache(spec, SLOTS, MAX_LEN, dev)
    gp = GraphPrefill(model, padded)
    assert gp.mode == "graph"
    g = torch.Generator().manual_seed(3)
    ids = {s: torch.randint(0, spec.vocab_size, (MAX_LEN,), generator=g).tolist() for s in range(SLOTS)}
    with torch.inference_mode():
        for slot, ctx, t in _chunks() + [(1, 0, 33), (1, 33, 40)]:  # the last two replay captured buckets
            chunk = ids[slot][ctx:ctx + t]
            ref = model(torch.tensor([chunk], device=dev), torch.arange(ctx, ctx + t, device=dev)[None, :], eager,
                        torch.tensor([slot], device=dev), last_only=True)[:, -1]
            out = gp.run(chunk, ctx, slot)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert gp.captures == len({gp.bucket(t) for _, _, t in _chunks()})
    plain, _ = _run_tokens("backend.device=cuda", "model.dtype=fp32")
    graphed, be = _run_tokens("backend.device=cuda", "model.dtype=fp32", "backend.prefill_graphs=true",
                              "backend.cuda_graphs=true")
    assert be.prefill_graph is not None and be.prefill_graph.mode == "graph" and be.prefill_graph.captures > 0
    assert graphed == plain
