"""The NVMe weight tier on the real runtime (wicore.runtime.nvme_store + LayerStreamer source="nvme"), on the CPU."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from tests.conftest import make_cfg  # noqa: E402
from tests.test_offload import TINY_RUN, assert_lone_layer_equal, gemma, inputs, streaming_budget_gib  # noqa: E402
from wicore.errors import ConfigError  # noqa: E402
from wicore.memory.formats import FORMATS  # noqa: E402
from wicore.model.checkpoint import checkpoint_fill, load_checkpoint, write_random_checkpoint  # noqa: E402
from wicore.model.quant import dequantize_into, dequantize_torch, quantize_torch  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import Transformer, build_model  # noqa: E402
from wicore.runtime.nvme_store import IO_ALIGN, NvmeStore, _probe_direct  # noqa: E402
from wicore.runtime.offload import LayerStreamer, offload_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def reference(spec: ModelSpec) -> Transformer:
    ref = build_model(spec, "cpu", seed=0)
    with torch.no_grad():  # non-trivial norms, so a wrongly placed norm weight would show
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    return ref


def dequantized(ref: Transformer, layers: list[int], fmt: str = "int4") -> Transformer:
    """``ref`` with the matrices of ``layers`` replaced by dequantize(quantize(w)) (fully resident)."""
    deq = copy.deepcopy(ref)
    with torch.no_grad():
        for i in layers:
            for _, p in deq.layers[i].named_parameters():
                if p.dim() >= 2:
                    p.copy_(dequantize_torch(quantize_torch(p, FORMATS[fmt])).to(p.dtype))
    return deq


def nvme(ref: Transformer, streamed: list[int], store_dir: Path | None = None, **kw: object) -> tuple[
        Transformer, LayerStreamer]:
    model = copy.deepcopy(ref)
    store = NvmeStore(store_dir, direct_io=kw.pop("direct_io", None))  # type: ignore[arg-type]
    kw.setdefault("host_format", "auto")
    return model, offload_model(model, streamed, "cpu", source="nvme", store=store, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("direct_io", [None, False], ids=["probe", "buffered"])
def test_store_round_trip_is_a_safetensors_file_of_the_quantized_layer(tmp_path, direct_io):
    spec = gemma()
    ref = reference(spec)
    model, st = nvme(ref, [1, 4], tmp_path, direct_io=direct_io)
    store = st.store
    assert store is not None and st.host_format == "int4" and st.host == [] and st.stats()["host_bytes"] == 0
    assert store.dir.parent == tmp_path and store.io_mode == ("O_DIRECT" if store.direct else
                                                              "buffered+POSIX_FADV_DONTNEED")
    if direct_io is False:
        assert not store.direct
    lf = store.files[1]
    with safe_open(str(lf.path), framework="pt", device="cpu") as f:
        meta = f.metadata()
        assert meta["format"] == "wicore-nvme-layer" and meta["layer"] == "1" and meta["host_format"] == "int4"
        names = set(f.keys())
        shapes = json.loads(meta["shapes"])
        for name, p in ref.layers[1].named_parameters():
            full = f"layers.1.{name}"
            assert shapes[name] == list(p.shape)
            if p.dim() < 2:  # norms: as they are, in the model dtype
                assert torch.equal(f.get_tensor(full), p.detach())
                names.remove(full)
                continue
            q = quantize_torch(p, FORMATS["int4"])
            g = p.numel() // 32
            data, scale, low = f.get_tensor(full + ".q4"), f.get_tensor(full + ".scale"), f.get_tensor(full + ".min")
            assert (data.dtype, data.shape, scale.dtype, scale.shape) == (torch.uint8, (g, 16), torch.float16, (g,))
            assert torch.equal(data.reshape(-1), q.data) and torch.equal(scale, q.scales)
            assert q.zeros is not None and torch.equal(low, q.zeros)
            names -= {full + ".q4", full + ".scale", full + ".min"}
        assert names == set()
    # the block a read brings back is the file's data section (the store's offsets are the header's)
    raw = lf.path.read_bytes()
    buf = torch.empty(store.read_span(1) + IO_ALIGN, dtype=torch.uint8)
    off = (-buf.data_ptr()) % IO_ALIGN
    nread, inner = store.read_into(1, buf[off:].numpy().data)
    assert nread >= lf.nbytes and bytes(buf[off + inner:off + inner + lf.nbytes].numpy()) == raw[lf.data_start:]
    assert lf.data_start + lf.nbytes == len(raw) and store.file_bytes == sum(f.stat().st_size for f in
                                                                               store.dir.glob("*.safetensors"))
    st.close()
    assert not store.dir.exists()  # the store's directory is removed at close


@pytest.mark.parametrize("dtype,streamed,host_format,buffers,lookahead,staging", [
    ("fp32", [1, 3, 4], "auto", 2, 1, None),
    ("fp32", [0, 1, 2, 3, 4, 5], "int4", 3, 2, 1),
    ("fp32", [5], "int8", 1, 0, 3),
    ("bf16", [0, 2, 5], "int4", 2, 1, 2),
])
def test_nvme_forward_equals_the_dequantized_resident_model(dtype, streamed, host_format, buffers, lookahead,
                                                             staging):
    spec = gemma(dtype)
    ref = reference(spec)
    fmt = "int4" if host_format == "auto" else host_format
    model, st = nvme(ref, streamed, host_format=host_format, buffers=buffers, lookahead=lookahead, staging=staging)
    want = dequantized(ref, streamed, fmt)
    ids, pos = inputs(spec)
    with torch.inference_mode():
        exact, orig = want(ids, pos), ref(ids, pos)
        for _ in range(3):  # later forwards use the reads and copies queued at the end of the previous one
            assert torch.equal(model(ids, pos), exact)
    assert not torch.equal(exact, orig)  # the streamed layers really are quantized
    # the streamed parameters point into the compute buffer: the tensors they were written from are gone
    lo, hi = st.compute.data_ptr(), st.compute.data_ptr() + st.compute.numel()
    for i in streamed:
        for p in model.layers[i].parameters():
            assert lo <= p.data_ptr() < hi
    s = st.stats()
    assert s["source"] == "nvme" and s["mode"] == "convert" and s["host_bytes"] == 0 and s["resyncs"] == 0
    # 3 forwards, plus the first layers of the next one prefetched at the end of the last; one read a copy
    assert s["disk_reads"] == s["copies"] == 3 * len(streamed) + min(lookahead + 1, len(streamed))
    assert s["disk_bytes"] >= s["bytes_copied"] > 0 and s["disk_read_s"] > 0 and s["disk_GBps"] > 0
    assert s["staging_buffers"] == (staging or max(2, buffers))
    st.close()


def test_several_forwards_a_forward_that_raised_a_failed_read_and_a_layer_called_alone():
    spec = gemma()
    ref = reference(spec)
    streamed = [1, 3, 4]
    model, st = nvme(ref, streamed)
    want = dequantized(ref, streamed)
    ids, pos = inputs(spec)
    mlp: Any = model.layers[3].mlp
    original = mlp.forward
    with torch.inference_mode():
        assert torch.equal(model(ids, pos), want(ids, pos))
        mlp.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))  # raises inside layer 3 (streamed)
        with pytest.raises(RuntimeError, match="boom"):
            model(ids, pos)
        mlp.forward = original
        for _ in range(2):
            assert torch.equal(model(ids, pos), want(ids, pos))
        # a read that fails (drive error): the forward raises it, the next one reads again
        store = st.store
        assert store is not None
        real, calls = store.read_into, []

        def flaky(key: int, buf: memoryview) -> tuple[int, int]:
            calls.append(key)
            if len(calls) == 2:
                raise OSError("EIO: simulated drive error")
            return real(key, buf)

        store.read_into = flaky  # type: ignore[method-assign]
        with pytest.raises(OSError, match="EIO"):
            for _ in range(3):
                model(ids, pos)
        assert torch.equal(model(ids, pos), want(ids, pos))
        # a streamed layer called on its own, then whole forwards again
        assert_lone_layer_equal(model, want, spec, pos)
        assert torch.equal(model(ids, pos), want(ids, pos))
    assert st.resyncs >= 3 and st.stats()["forwards"] >= 5
    st.close()


def test_checkpoint_read_tensor_by_tensor_into_the_store(tmp_path):
    spec = gemma()
    ckpt = write_random_checkpoint(spec, tmp_path / "ckpt", dtype="fp32", seed=3, std=0.05)
    full, _ = load_checkpoint(ckpt)
    spec2, fill = checkpoint_fill(ckpt, "fp32")
    calls: list[str] = []

    def counting(name: str, p: torch.Tensor) -> torch.Tensor:
        calls.append(name)
        return fill(name, p)  # type: ignore[no-any-return]

    with torch.device("meta"):
        model = Transformer(spec2).eval()
    st = offload_model(model, [0, 5], "cpu", host_format="auto", fill=counting, source="nvme")
    assert sorted(calls) == sorted(name for name, _ in full.named_parameters())
    ids, pos = inputs(spec)
    with torch.inference_mode():
        assert torch.equal(model(ids, pos), dequantized(full, [0, 5])(ids, pos))
    st.close()


def test_dequantize_into_is_bit_identical_to_dequantize_torch_in_chunks():
    x = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 3
    for fmt in ("int4", "int8"):
        q = quantize_torch(x, FORMATS[fmt])
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.empty(96, 64, dtype=dtype)
            dequantize_into(q.data, q.scales, q.zeros, out, FORMATS[fmt], chunk=96)  # 3 groups per chunk
            assert torch.equal(out, dequantize_torch(q).to(dtype)), (fmt, dtype)


def test_direct_io_is_what_the_filesystem_supports(tmp_path):
    store = NvmeStore(tmp_path)
    assert store.direct == _probe_direct(tmp_path)
    if not store.direct:  # requiring O_DIRECT where it does not work fails at start-up
        with pytest.raises(ConfigError, match="backend.nvme_dir"):
            NvmeStore(tmp_path, direct_io=True)
    store.close()


# ----- experiments.run_torch -------------------------------------------------------------------------
BUDGET = f"backend.gpu_budget_gib={streaming_budget_gib(gemma(), 3):.9f}"  # 3 of the 6 layers streamed


def nvme_cfg(*overrides: str, budget: str = BUDGET):  # type: ignore[no-untyped-def]
    return make_cfg(*TINY_RUN, "backend=torch", "backend.device=cpu", budget, "memory.offload_to=nvme", *overrides)


def test_run_torch_on_the_nvme_tier_finishes_with_disk_reads_and_the_host_tier_tokens(tmp_path):
    from experiments.run_torch import build_torch, run_torch
    from tests.test_offload import run_tokens

    host, _ = run_tokens(BUDGET, "backend.host_format=int4")
    disk, setup = run_tokens(BUDGET, "memory.offload_to=nvme", f"backend.nvme_dir={tmp_path / 'store'}")
    assert setup.placement.offload_tier == "nvme"  # type: ignore[attr-defined]
    st = setup.backend.streamer  # type: ignore[attr-defined]
    assert st.source == "nvme" and st.host_format == "int4" and len(st.order) == 3
    assert disk == host and len(disk) == 6  # the same int4 weights from host memory or from the drive
    ops = {(name, res) for _, _, name, res, *_ in setup.recorder.ops}  # type: ignore[attr-defined]
    assert ("fetch", "nvme") in ops and ("fetch", "pcie0") in ops
    st.close()
    store = tmp_path / "store2"
    out = run_torch(nvme_cfg(f"backend.nvme_dir={store}"), tmp_path / "run")
    assert out["finished"] == 6
    assert store.is_dir() and not list(store.iterdir())  # the run closed its streamer: the store is gone
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    assert placement["stream_source"] == "nvme" and placement["stream_host_format"] == "int4"
    assert placement["stream_disk_bytes"] > 0 and placement["stream_disk_read_s"] > 0
    assert placement["stream_disk_io"] in ("O_DIRECT", "buffered+POSIX_FADV_DONTNEED")
    with pytest.raises(ConfigError, match="backend.host_format"):
        build_torch(nvme_cfg("backend.host_format=bf16"))


def test_run_torch_from_a_checkpoint_on_the_nvme_tier_gives_the_host_tier_tokens(tmp_path):
    from tests.test_offload import run_tokens

    ckpt = write_random_checkpoint(gemma(), tmp_path / "ckpt", dtype="fp32", seed=5, std=0.05)
    host, _ = run_tokens(BUDGET, f"checkpoint={ckpt}", "backend.host_format=int4")
    disk, setup = run_tokens(BUDGET, f"checkpoint={ckpt}", "memory.offload_to=nvme")
    st = setup.backend.streamer  # type: ignore[attr-defined]
    assert st.source == "nvme" and st.stats()["host_bytes"] == 0 and st.disk_bytes > 0
    assert disk == host and len(disk) == 6
    st.close()


def test_an_nvme_dir_that_cannot_be_written_fails_at_start_up(tmp_path):
    from experiments.run_torch import build_torch

    (tmp_path / "file").write_text("not a directory")
    bad = tmp_path / "file" / "store"  # under a regular file: no one can create it (root neither)
    with pytest.raises(ConfigError, match="backend.nvme_dir"):
        build_torch(nvme_cfg(f"backend.nvme_dir={bad}"))
    with pytest.raises(ConfigError, match="backend.nvme_dir"):
        NvmeStore(bad)
    with pytest.raises(ConfigError, match="parallel.pp=1"):  # the tier is implemented for one GPU only
        # two stages of 3 layers, each streaming all 3
        build_torch(nvme_cfg("parallel=pp", budget=f"backend.gpu_budget_gib={streaming_budget_gib(gemma(), 0):.9f}"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvme_forward_on_cuda_equals_the_dequantized_resident_model_there():
    """The CUDA path: pinned staging buffers, the copy stream, the reader waiting on copy events."""
    spec = gemma("bf16")
    ref = reference(spec)
    streamed = list(range(1, spec.num_layers))
    want = dequantized(ref, streamed).to("cuda")
    model = copy.deepcopy(ref)
    st = offload_model(model, streamed, "cuda", source="nvme", store=NvmeStore(None), host_format="auto",
                       buffers=2, lookahead=1)
    ids, pos = inputs(spec)
    ids, pos = ids.cuda(), pos.cuda()
    with torch.inference_mode():
        exact = want(ids, pos)
        for _ in range(3):
            torch.testing.assert_close(model(ids, pos), exact, rtol=0, atol=0)
    s = st.stats()
    assert s["source"] == "nvme" and s["disk_bytes"] > 0 and s["bytes_copied"] > 0 and s["resyncs"] == 0
    st.close()
