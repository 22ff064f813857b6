"""GraphedDecoder (CPU fallback exact; CUDA graph replay on a GPU) and benchmarks/gpu_decode.py helpers."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

from wicore.errors import ConfigError  # noqa: E402
from wicore.model.checkpoint import load_spec_file  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import Transformer, build_model  # noqa: E402
from wicore.runtime.cuda_graph import GraphedDecoder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_decode.py"
TINY = ROOT / "conf" / "model" / "tiny-gemma3.yaml"
TINY_LLAMA_YAML = """\
name: tiny-llama
family: llama
num_layers: 2
hidden_size: 32
intermediate_size: 64
num_heads: 4
num_kv_heads: 2
head_dim: 8
vocab_size: 96
max_context: 64
rope_theta: 500000.0
rope_local_base: 500000.0
tie_embeddings: false
rms_norm_eps: 1.0e-5
dtype: fp32
"""


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def gd() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_decode_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelSpec, Transformer]:
    spec = load_spec_file(TINY)
    return spec, _randomize(build_model(spec, "cpu", "fp32", init=False))


def _randomize(model: Transformer) -> Transformer:
    """Larger-than-default random weights so greedy tokens vary (std 0.02 gives near-uniform logits)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.device) * (0.3 if p.dim() == 1 else 0.15))
    return model


def _prefill(model: Transformer, cache: KVCache, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill row i into slot i (one call per row); return first tokens [B] and their positions [B]."""
    firsts = []
    dev = cache.device
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = torch.tensor([p], device=dev)
            logits = model(ids, torch.arange(len(p), device=dev)[None], cache, torch.tensor([i], device=dev))
            assert isinstance(logits, torch.Tensor)
            firsts.append(int(logits[0, -1].argmax()))
    return torch.tensor(firsts), torch.tensor([len(p) for p in prompts])


def _eager_reference(model: Transformer, cache: KVCache, tok: torch.Tensor, pos: torch.Tensor,
                     steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain step-by-step greedy decode: model(tokens [B, 1], positions [B, 1], cache) + argmax."""
    out, logits_all = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(tok[:, None], pos[:, None], cache)
            assert isinstance(logits, torch.Tensor)
            logits_all.append(logits[:, -1])
            tok, pos = logits[:, -1].argmax(-1), pos + 1
            out.append(tok)
    return torch.stack(out, dim=1), logits_all


def _prompts(lengths: list[int], vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("lengths", [[7], [5, 11, 18]], ids=["B1", "B3-different-positions"])
def test_fallback_gives_the_eager_tokens_exactly(tiny: tuple[ModelSpec, Transformer], lengths: list[int]) -> None:
    spec, model = tiny
    b, steps = len(lengths), 12
    cache_a = KVCache(spec, max_slots=4, max_len=48)
    prompts = _prompts(lengths, spec.vocab_size)
    tok, pos = _prefill(model, cache_a, prompts)
    cache_b = copy.deepcopy(cache_a)
    dec = GraphedDecoder(model, cache_a, b, use_graph=True, use_compile=True)  # no CUDA: eager fallback
    assert dec.mode == "eager"
    ref, ref_logits = _eager_reference(model, cache_b, tok, pos, steps)
    got, t, p = [], tok, pos
    for i in range(steps):
        nxt = dec.step(t, p)
        assert torch.equal(dec.logits, ref_logits[i])
        got.append(nxt.clone())
        t, p = nxt, p + 1
    assert torch.equal(torch.stack(got, dim=1), ref)
    assert ref_logits[0].std() > 0.1  # non-trivial logits
    for ka, kb in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v):
        assert torch.equal(ka, kb)
    # generate() is the same loop; rerunning from the same start rewrites the same K/V
    assert torch.equal(dec.generate(tok, pos, steps), ref)


def test_rows_match_separate_runs_and_scratch_writes_are_invisible(tiny: tuple[ModelSpec, Transformer]) -> None:
    """A batch of rows at different positions decodes like each row alone, also when the capture warm-up's
    scratch write (token 0 at max_len - 1) is in the cache and rows run up to position max_len - 1."""
    spec, model = tiny
    max_len, lengths = 24, [4, 9, 15]
    prompts = _prompts(lengths, spec.vocab_size)
    cache = KVCache(spec, max_slots=3, max_len=max_len)
    tok, pos = _prefill(model, cache, prompts)
    dec = GraphedDecoder(model, cache, 3)
    with torch.no_grad():  # what the CUDA-graph warm-up does before capture
        dec._forward(dec.input_ids, dec.positions)
    assert int(dec.positions[0, 0]) == max_len - 1
    steps = max_len - max(lengths)  # the longest row ends at position max_len - 1
    got = dec.generate(tok, pos, steps)
    for i, prompt in enumerate(prompts):
        alone = KVCache(spec, max_slots=1, max_len=max_len)
        t1, p1 = _prefill(model, alone, [prompt])
        ref, _ = _eager_reference(model, alone, t1, p1, steps)
        assert got[i].tolist() == ref[0].tolist(), i


def test_rejects_a_batch_larger_than_the_cache(tiny: tuple[ModelSpec, Transformer]) -> None:
    spec, model = tiny
    with pytest.raises(ConfigError, match="batch_size"):
        GraphedDecoder(model, KVCache(spec, max_slots=2, max_len=16), 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager() -> None:
    spec = load_spec_file(TINY)
    model = _randomize(build_model(spec, "cuda", "fp32", init=False))
    lengths, max_len = [5, 11, 18], 32
    prompts = _prompts(lengths, spec.vocab_size)
    cache_g = KVCache(spec, max_slots=4, max_len=max_len, device="cuda")
    tok, pos = _prefill(model, cache_g, prompts)
    tok, pos = tok.cuda(), pos.cuda()
    cache_e = copy.deepcopy(cache_g)
    graph = GraphedDecoder(model, cache_g, 3)
    eager = GraphedDecoder(model, cache_e, 3, use_graph=False)
    assert graph.mode == "graph" and eager.mode == "eager"
    steps = max_len - max(lengths)
    tg, te, p = tok, tok, pos
    for _ in range(steps):
        tg = graph.step(tg, p).clone()
        te = eager.step(te, p).clone()
        torch.testing.assert_close(graph.logits, eager.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(tg, te)
        p = p + 1
    ref, _ = _eager_reference(model, copy.deepcopy(cache_e), tok, pos, steps)  # rerun: same K/V rewritten
    assert torch.equal(graph.generate(tok, pos, steps), ref)


# ----- benchmarks/gpu_decode.py --------------------------------------------------------------------
def test_byte_accounting(gd: ModuleType) -> None:
    assert gd.copy_bytes(1 << 31, 2) == 1 << 33  # a 4 GiB bf16 copy moves 8 GiB (read + write)
    for path in (TINY, ROOT / "conf" / "model" / "llama3.1-8b.yaml"):
        spec = load_spec_file(path)
        with torch.device("meta"):
            model = Transformer(spec)
        params = sum(p.numel() for p in model.parameters())
        h = spec.hidden_size
        # everything is read except the embedding table, of which only B rows are gathered; a tied
        # embedding is read whole as the LM head
        read = params - (0 if spec.tie_embeddings else spec.vocab_size * h)
        for batch in (1, 3):
            got = gd.decode_bytes_per_step(spec, batch, 40, weight_bytes=2, kv_bytes=2)
            assert got["weights"] == 2 * (read + batch * h)
            cache = KVCache(spec, max_slots=4, max_len=40, device="meta", dtype=torch.bfloat16)
            assert got["kv"] == cache.nbytes * batch // 4
            assert got["total"] == got["weights"] + got["kv"]
    llama = load_spec_file(ROOT / "conf" / "model" / "llama3.1-8b.yaml")
    b1 = gd.decode_bytes_per_step(llama, 1, 1024)
    assert b1["kv"] == 128 << 20  # 32 layers x K,V x 8 heads x 1024 x 128 x 2 B
    assert abs(b1["weights"] / 1e9 - 15.01) < 0.01  # 16.06 GB of weights minus the 1.05 GB embedding


def test_report_helpers(gd: ModuleType) -> None:
    assert gd.match_stats([1, 2, 3, 4], [1, 2, 9, 4, 5], 10) == {"compared": 4, "matching": 3, "prefix": 2}
    assert gd.match_stats([1, 2, 3], [1, 2, 3], 2) == {"compared": 2, "matching": 2, "prefix": 2}
    assert gd.tokens_per_s(512, 2.0) == 256.0
    results = {"meta": {"device": "X", "args": {"batch": 8, "prompt_len": 16}},
               "copy": {"bandwidth_GBps": 2500.0}, "batch32": {"error": "RuntimeError: boom"}}
    rows = dict(gd.table_rows(results))
    assert rows["copy bandwidth, GB/s (read+write)"] == "2,500.000"
    assert rows["B=8 graph: output tokens/s (decode)"].startswith("error: RuntimeError: boom")
    assert "HF B=8 generate (s)" not in rows  # absent sections are left out


def test_script_without_cuda_exits_0(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "skipped"


def test_script_cpu_smoke_matches_transformers(gd: ModuleType, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Every section on the CPU with a tiny fp32 Llama: our greedy tokens equal HF's (weights mapped)."""
    pytest.importorskip("transformers")
    (tmp_path / "tiny-llama.yaml").write_text(TINY_LLAMA_YAML)
    rc = gd.main(["--cpu-smoke", "--spec", str(tmp_path / "tiny-llama.yaml"), "--dtype", "fp32",
                  "--out", str(tmp_path / "out"), "--steps", "10", "--prompt-len", "6", "--batch", "3",
                  "--max-slots", "4", "--max-len", "32", "--copy-mib", "1", "--repeats", "1",
                  "--hf-repeats", "1", "--check-tokens", "8"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["meta"]["failed_sections"] == []
    assert res["build"]["rope_scaling"]["rope_type"] == "llama3"
    check = res["hf"]["check"]
    for key in ("free_running_b1", "teacher_forced"):
        assert check[key]["matching"] == check[key]["compared"] == 8, key
    # the timed HF generate uses min_new_tokens (EOS masked): equal up to our first EOS (id 2 here)
    first_eos = min([*check["ours_b1_eos_positions"], 8])
    assert check["vs_hf_b32_row0"]["prefix"] >= first_eos
    assert check["prompt_logits_max_abs_diff"] < 1e-4
    assert res["batch1"]["graph_eq_eager"]["matching"] == 10
    assert res["hf"]["e2e_tok_s"] > 0 and res["batch32"]["decode_tok_s"] > 0
    assert "| metric | value |" in printed and (tmp_path / "out" / "table.md").is_file()
