"""Weight streaming (wicore.runtime.offload) on the CPU: same numbers as the resident model, counters, run_torch."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

from tests.conftest import make_cfg  # noqa: E402
from wicore.hal import GIB  # noqa: E402
from wicore.memory.formats import FORMATS  # noqa: E402
from wicore.model.checkpoint import load_spec_file  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.quant import dequantize_torch, quantize_torch  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import Transformer, build_model  # noqa: E402
from wicore.runtime.offload import LayerStreamer, offload_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "conf" / "model" / "tiny-gemma3.yaml"
LLAMA = ModelSpec(name="tiny-llama", family="llama", num_layers=4, hidden_size=32, intermediate_size=64,
                  num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=96, max_context=64, rope_theta=500000.0,
                  rope_local_base=500000.0, tie_embeddings=False, rms_norm_eps=1e-5, dtype="fp32")
INT8_REL_TOL = 0.05  # int8 host format: max |logit diff| <= 5% of max |logit| (measured ~2.5% on tiny-gemma3)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def gemma(dtype: str = "fp32") -> ModelSpec:
    spec = load_spec_file(TINY)
    return spec.with_dtype(dtype)


def pair(spec: ModelSpec, streamed: list[int], **kw: object) -> tuple[Transformer, Transformer, LayerStreamer]:
    ref = build_model(spec, "cpu", seed=0)
    with torch.no_grad():  # non-trivial norms, so a wrongly placed norm weight would show
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0 if spec.family == "gemma3" else 1.0, 0.1, generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(ref)
    kw.setdefault("host_format", "auto")  # offload_model's default is bf16
    return ref, model, offload_model(model, streamed, "cpu", **kw)  # type: ignore[arg-type]


def inputs(spec: ModelSpec, b: int = 2, t: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, spec.vocab_size, (b, t), generator=torch.Generator().manual_seed(3))
    return ids, torch.arange(t).expand(b, t)


@pytest.mark.parametrize("spec,streamed,host_format,buffers,lookahead", [
    (gemma(), [1, 3, 5], "auto", 2, 1),
    (gemma(), [0, 1, 2, 3, 4, 5], "fp32", 3, 2),
    (gemma(), [5], "auto", 1, 0),
    (gemma("bf16"), [0, 2, 4, 5], "bf16", 2, 1),
    (LLAMA, [0, 3], "auto", 2, 4),
])
def test_streamed_logits_equal_resident(spec, streamed, host_format, buffers, lookahead):
    ref, model, st = pair(spec, streamed, host_format=host_format, buffers=buffers, lookahead=lookahead)
    assert st.direct and st.order == streamed
    ids, pos = inputs(spec, t=min(40, spec.max_context))
    with torch.inference_mode():
        want = ref(ids, pos)
        for _ in range(3):  # later forwards use the copies prefetched at the end of the previous one
            assert torch.equal(model(ids, pos), want)
    assert st.forwards == 3 and st.resyncs == 0
    # idle streamed parameters are their host views (the full weights, readable by name)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name]), name
        assert p.device.type == "cpu"


@pytest.mark.parametrize("host_format,streamed,buffers", [("auto", [1, 3, 5], 2), ("int8", [0, 2, 3, 5], 2),
                                                         ("auto", [0, 1, 2, 3, 4, 5], 3)])
def test_forward_schedule_equals_the_cycle_schedule_and_counts_replays(host_format, streamed, buffers):
    spec = gemma()
    _, cyc, _ = pair(spec, streamed, host_format=host_format, buffers=buffers, lookahead=buffers - 1)
    _, fwd, st = pair(spec, streamed, host_format=host_format, buffers=buffers, lookahead=buffers - 1,
                      schedule="forward")
    assert st.per_forward and st.stats()["schedule"] == "forward" and fwd.layer_streamer is st  # type: ignore[attr-defined]
    ids, pos = inputs(spec)
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(fwd(ids, pos), cyc(ids, pos))
    # a forward copies its own layers only: nothing is prefetched for the next one
    assert st.forwards == 3 and st.copies == 3 * len(streamed) and st.bytes_copied == 3 * st.bytes_per_forward
    st.replayed()  # what GraphDecode / GraphPrefill call after a replay (no hook runs in one)
    assert st.forwards == 4 and st.bytes_copied == 4 * st.bytes_per_forward and st.copies == 4 * len(streamed)
    st.close()
    assert not hasattr(fwd, "layer_streamer")


def test_forward_schedule_is_refused_for_the_nvme_tier_and_by_graphs_for_the_cycle_schedule(tmp_path):
    from wicore.errors import ConfigError
    from wicore.runtime.graph_capture import replay_counter

    with pytest.raises(ConfigError, match="host memory"):
        pair(gemma(), [1, 3], host_format="int4", source="nvme", schedule="forward")
    with pytest.raises(ConfigError, match="schedule"):
        pair(gemma(), [1, 3], schedule="ahead")
    _, model, st = pair(gemma(), [1, 3])
    with pytest.raises(ConfigError, match="cycle schedule"):
        replay_counter(model, "GraphDecode")
    _, model, st = pair(gemma(), [1, 3], schedule="forward")
    assert replay_counter(model, "GraphDecode") == st.replayed
    assert replay_counter(build_model(gemma(), "cpu", seed=0), "GraphDecode") is None


def test_int8_host_format_is_exactly_the_dequantized_weights_and_close_to_the_original():
    spec = gemma()
    ref, model, st = pair(spec, [0, 2, 3, 5], host_format="int8")
    assert not st.direct
    deq = copy.deepcopy(ref)
    with torch.no_grad():
        for i in st.order:
            for _, p in deq.layers[i].named_parameters():
                if p.dim() >= 2:
                    p.copy_(dequantize_torch(quantize_torch(p, FORMATS["int8"])).to(p.dtype))
    ids, pos = inputs(spec)
    with torch.inference_mode():
        got, want, exact = model(ids, pos), ref(ids, pos), deq(ids, pos)
        assert torch.equal(model(ids, pos), got)
    assert torch.equal(got, exact)
    err = float((got - want).abs().max())
    assert 0 < err <= INT8_REL_TOL * float(want.abs().max())
    # Q8_0: 34 bytes per 32 values for the matrices, the norms as they are (fp32)
    params = list(ref.layers[0].parameters())
    per_layer = sum(FORMATS["int8"].nbytes(p.numel()) if p.dim() >= 2 else 4 * p.numel() for p in params)
    assert st.last_forward_bytes == st.bytes_per_forward == 4 * per_layer


def test_fp16_host_format_on_an_fp32_model_casts_on_the_device():
    spec = gemma()
    ref, model, st = pair(spec, [1, 4], host_format="fp16")
    with torch.no_grad():
        for i in st.order:
            for _, p in ref.layers[i].named_parameters():
                p.copy_(p.half().float())
    ids, pos = inputs(spec)
    with torch.inference_mode():
        assert torch.equal(model(ids, pos), ref(ids, pos))
    assert st.bytes_per_forward == 2 * spec.params_per_layer * 2


@pytest.mark.parametrize("spec", [gemma(), LLAMA], ids=["gemma3", "llama"])
def test_kv_cache_prefill_and_decode_with_streaming(spec):
    ref, model, st = pair(spec, [1, spec.num_layers - 1])
    prompt = torch.randint(0, spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(5))
    runs = []
    for m in (ref, model):
        cache = KVCache(spec, 1, 48)
        with torch.inference_mode():
            logits = m(prompt, torch.arange(12)[None], cache, last_only=True)
            toks, steps = [int(logits[0, -1].argmax())], [logits]
            for p in range(12, 30):
                logits = m(torch.tensor([[toks[-1]]]), torch.tensor([[p]]), cache)
                steps.append(logits)
                toks.append(int(logits[0, -1].argmax()))
        runs.append((toks, steps))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert st.forwards == 19 and st.last_forward_bytes == 2 * spec.layer_bytes


def test_byte_counters_equal_the_streamed_layers_bytes():
    spec = gemma()
    streamed = [0, 2, 4]
    _, model, st = pair(spec, streamed, buffers=2, lookahead=1)
    ids, pos = inputs(spec, t=8)
    with torch.inference_mode():
        for _ in range(4):
            model(ids, pos)
    per = len(streamed) * spec.layer_bytes
    assert st.bytes_per_forward == st.last_forward_bytes == per
    assert sum(p.numel() * p.element_size() for i in streamed for p in model.layers[i].parameters()) == per
    s = st.stats()
    # 4 forwards of 3 layers, plus the first 2 layers of the next forward prefetched at the end of the last
    assert s["copies"] == 4 * 3 + 2 and s["bytes_copied"] == 4 * per + 2 * spec.layer_bytes
    assert s["timed_bytes"] == s["bytes_copied"] and s["copy_s"] > 0 and s["device_buffer_bytes"] == 2 * spec.layer_bytes


@pytest.mark.parametrize("schedule", ["cycle", "forward"])
def test_recovers_from_a_forward_that_raised_half_way_and_from_a_layer_called_alone(schedule):
    spec = gemma()
    ref, model, st = pair(spec, [1, 3, 4], schedule=schedule)
    ids, pos = inputs(spec)
    original = model.layers[3].mlp.forward
    model.layers[3].mlp.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    with torch.inference_mode(), pytest.raises(RuntimeError, match="boom"):
        model(ids, pos)
    model.layers[3].mlp.forward = original  # type: ignore[method-assign]
    with torch.inference_mode():
        assert torch.equal(model(ids, pos), ref(ids, pos))
        assert_lone_layer_equal(model, ref, spec, pos)
        assert torch.equal(model(ids, pos), ref(ids, pos))
    assert st.resyncs >= 2


def test_meta_model_materialised_from_a_fill_function():
    spec = gemma()
    ref = build_model(spec, "cpu", seed=0)
    values = dict(ref.named_parameters())
    with torch.device("meta"):
        model = Transformer(spec)
    calls: list[str] = []

    def fill(name: str, p: torch.Tensor) -> torch.Tensor:
        calls.append(name)
        return values[name].detach().clone()

    st = offload_model(model, [2, 5], "cpu", host_format="auto", fill=fill)
    assert sorted(calls) == sorted(values)
    ids, pos = inputs(spec)
    with torch.inference_mode():
        assert torch.equal(model(ids, pos), ref(ids, pos))
    assert st.stats()["num_streamed"] == 2


def assert_lone_layer_equal(model: Transformer, ref: Transformer, spec: ModelSpec, pos: torch.Tensor,
                            layer: int = 4) -> None:
    """A streamed ``layer`` called on its own (outside a forward) computes what the reference's does."""
    x = torch.randn(2, 40, spec.hidden_size)
    cos = sin = torch.ones(2, 40, spec.head_dim)
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    args = (x, cos, sin, mask, pos, None, None, None, False)
    assert torch.equal(model.layers[layer](*args)[0], ref.layers[layer](*args)[0])


def streaming_budget_gib(spec: ModelSpec, resident: int) -> float:
    """A GPU budget (default MemoryConfig) under which exactly ``resident`` layers stay on the device."""
    fixed = 0.5 * GIB + spec.embedding_bytes + 2 * spec.layer_bytes + 2 * GIB  # workspace, emb, buffers, kv_min
    return (fixed + (resident + 0.5) * spec.layer_bytes) / 0.92 / GIB


def run_tokens(*overrides: str) -> tuple[dict[int, list[int]], object]:
    from experiments.run_torch import build_torch
    from wicore.runtime.driver import TorchDriver

    setup = build_torch(make_cfg(*TINY_RUN, "backend=torch", "backend.device=cpu", *overrides))
    finished: dict[int, list[int]] = {}
    backend, release = setup.backend, setup.backend.release

    def keep(rid: int) -> None:
        finished[rid] = list(backend.tokens[rid])
        release(rid)

    backend.release = keep
    TorchDriver(setup.engine, backend, setup.workload, setup.t0).run()
    return finished, setup


TINY_RUN = ["model=tiny-gemma3", "workload.num_requests=6", "workload.concurrency=3",
            "workload.prompt.kind=uniform", "workload.prompt.low=5", "workload.prompt.high=30",
            "workload.output.kind=uniform", "workload.output.low=3", "workload.output.high=8",
            "report.enabled=false", "progress=false"]


def test_run_torch_streams_under_a_small_budget_with_the_same_tokens_and_schema(tmp_path):
    from experiments.run_torch import run_torch

    spec = gemma()
    budget = f"backend.gpu_budget_gib={streaming_budget_gib(spec, 3):.9f}"
    resident, _ = run_tokens()
    streamed, setup = run_tokens(budget)
    assert setup.placement.offloading  # type: ignore[attr-defined]
    st = setup.backend.streamer  # type: ignore[attr-defined]
    assert st.order == [layer for layer, _ in setup.placement.placements[0].streamed]  # type: ignore[attr-defined]
    assert len(st.order) == 3 and st.bytes_per_forward == setup.placement.placements[0].streamed_bytes  # type: ignore[attr-defined]
    assert streamed == resident and len(streamed) == 6
    run_torch(make_cfg(*TINY_RUN, "backend=torch", "backend.device=cpu"), tmp_path / "resident")
    out = run_torch(make_cfg(*TINY_RUN, "backend=torch", "backend.device=cpu", budget, "backend.host_format=int8"),
                    tmp_path / "streamed")
    assert out["finished"] == 6
    for table in ("requests", "steps", "tiers"):
        a = pd.read_parquet(tmp_path / "resident" / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "streamed" / f"{table}.parquet")
        assert list(a.columns) == list(b.columns), table
    placement = json.loads((tmp_path / "streamed" / "placement.json").read_text())
    assert placement["streamed_layers"] == 3 and placement["stream_mode"] == "convert"
    per_forward = placement["stream_bytes_per_forward"]
    assert per_forward < st.bytes_per_forward / 3  # int8 matrices instead of fp32
    steps = pd.read_parquet(tmp_path / "streamed" / "steps.parquet")
    assert (steps["link_bytes"] > 0).all() and (steps["link_bytes"] % per_forward == 0).all()


def test_run_torch_graphs_capture_streamed_layers_on_the_forward_schedule():
    """With CUDA graphs on, the streamer runs its graph-safe schedule (on the CPU the graphs' padded path runs
    eagerly): the same tokens as the resident eager run; the NVMe tier stays on the cycle schedule."""
    spec = gemma()
    budget = f"backend.gpu_budget_gib={streaming_budget_gib(spec, 3):.9f}"
    graphs = ("backend.cuda_graphs=true", "backend.prefill_graphs=true")
    resident, _ = run_tokens()
    streamed, setup = run_tokens(budget, *graphs)
    backend = setup.backend  # type: ignore[attr-defined]
    assert streamed == resident
    assert backend.streamer.per_forward and backend.graph is not None and backend.prefill_graph is not None
    assert backend.graph.calls > 0 and backend.prefill_graph.calls > 0
    assert backend.streamer.resyncs == 0
    assert run_tokens(budget)[1].backend.streamer.per_forward is False  # type: ignore[attr-defined]
    nvme, setup = run_tokens(budget, "memory.offload_to=nvme", "backend.host_format=int8", *graphs)
    backend = setup.backend  # type: ignore[attr-defined]
    assert backend.streamer.source == "nvme" and not backend.streamer.per_forward  # the NVMe tier stays eager
    assert backend.graph is None and backend.prefill_graph is None and len(nvme) == 6


# ----- benchmarks/gpu_offload.py on the CPU ---------------------------------------------------------
@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "gpu_offload.py"
    mod_spec = importlib.util.spec_from_file_location("gpu_offload_bench", path)
    assert mod_spec is not None and mod_spec.loader is not None
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_gpu_offload_helpers(bench):
    spec = gemma("bf16")
    for resident in (0, 1, 3):  # (with 2 stream buffers, 4+ resident of 6 means all fit)
        placement = bench.plan(spec, bench.budget_for(spec, resident))
        assert len(placement.placements[0].streamed) == spec.num_layers - resident
    big = load_spec_file(ROOT / "conf" / "model" / "gemma3-27b.yaml")
    assert len(bench.plan(big, 16.0).placements[0].streamed) == 52  # of 62: 10 stay on a 16 GiB card
    fill = bench.make_fill(spec, torch.device("cpu"), seed=3)
    meta = torch.empty(4, 64, device="meta")
    assert torch.equal(fill("layers.1.mlp.up_proj.weight", meta), fill("layers.1.mlp.up_proj.weight", meta))
    assert not torch.equal(fill("layers.1.mlp.up_proj.weight", meta), fill("layers.2.mlp.up_proj.weight", meta))
    dmap = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": 0}
    assert [bench.module_device(dmap, f"model.layers.{i}") for i in range(3)] == ["0", "cpu", "unmapped"]
    assert bench.module_device({"": "cpu"}, "model.layers.7") == "cpu"
    assert bench.match_stats([1, 2, 3], [1, 5, 3, 4]) == {"compared": 3, "matching": 2, "prefix": 1}


def test_gpu_offload_script_cpu_smoke(bench, tmp_path):
    mod = bench
    assert mod.main(["--cpu-smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for name in ("ours_large_bf16", "ours_large_int8", "ours_small_bf16"):
        sec = res[name]
        assert "error" not in sec, sec.get("error")
        assert sec["num_streamed"] > 0 and sec["decode_tok_s"] > 0 and sec["stream"]["resyncs"] == 0
        if name.endswith("bf16"):
            assert sec["bytes_per_token"] == sec["streamed_bytes"]  # = the placement's streamed bytes
        else:
            assert sec["bytes_per_token"] < 0.6 * sec["streamed_bytes"]
    base = res["accelerate_small"]  # HF with the same tensors by name (no dispatch on the CPU)
    assert "error" not in base, base.get("error")
    assert base["tokens_vs_ours"]["compared"] == 5
    assert base["prefill_logit_max_diff"] <= 0.02 * base["prefill_logit_absmax"]  # bf16, two implementations
    assert (tmp_path / "table.md").read_text().startswith("| metric | value |")
