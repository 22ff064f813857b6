"""Our Gemma-3 / Llama decoders against transformers' eager implementations, plus KV-cache decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

pytest.importorskip("transformers")
import transformers  # noqa: E402

from wicore.model import layers as layers_mod  # noqa: E402
from wicore.model import transformer as transformer_mod  # noqa: E402
from wicore.model.checkpoint import load_checkpoint, write_random_checkpoint  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import DecoderLayer, Transformer, build_model  # noqa: E402

SEQ = 24
BASE: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16,
            vocab_size=128, max_context=64)
SPECS = {
    # 7 layers, pattern 6: layers 0-4 and 6 local (window 8), layer 5 global; linear rope scaling.
    "gemma_p6": ModelSpec(name="gemma_p6", family="gemma3", num_layers=7, sliding_window=8,
                          sliding_window_pattern=6, rope_theta=1e6, rope_local_base=1e4,
                          query_pre_attn_scalar=24, dtype="fp32",
                          extra={"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, **BASE),
    # MQA, head_dim * heads != hidden, pattern 2, window 5.
    "gemma_mqa": ModelSpec(name="gemma_mqa", family="gemma3", num_layers=4, hidden_size=48,
                           intermediate_size=80, num_heads=2, num_kv_heads=1, head_dim=32, vocab_size=96,
                           max_context=64, sliding_window=5, sliding_window_pattern=2, rope_theta=1e4,
                           rope_local_base=1e3, query_pre_attn_scalar=32, dtype="fp32"),
    "llama31": ModelSpec(name="llama31", family="llama", num_layers=3, rope_theta=5e5, rope_local_base=5e5,
                         tie_embeddings=False, rms_norm_eps=1e-5, dtype="fp32",
                         extra={"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16}}, **BASE),
    "llama_mha": ModelSpec(name="llama_mha", family="llama", num_layers=2, hidden_size=32,
                           intermediate_size=64, num_heads=2, num_kv_heads=2, head_dim=16, vocab_size=80,
                           max_context=64, rope_theta=1e4, rope_local_base=1e4, tie_embeddings=False,
                           dtype="fp32"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, spec in SPECS.items():
        for dt in ("fp32", "bf16"):
            out[(name, dt)] = write_random_checkpoint(spec, root / f"{name}-{dt}", dtype=dt, std=0.15, seed=1)
    return out


def _inputs(spec: ModelSpec, batch: int = 2, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(7))
    return ids, torch.arange(seq).expand(batch, seq)


def _hf(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model.eval()


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_logits_match_transformers(ckpts: dict[tuple[str, str], Path], name: str, dt: str) -> None:
    spec, dtype = SPECS[name], DTYPES[dt]
    hf = _hf(ckpts[(name, dt)], dtype)
    expected_cls = "Gemma3ForCausalLM" if spec.family == "gemma3" else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_cls
    model, loaded = load_checkpoint(ckpts[(name, dt)])
    assert loaded.dtype == dt and model.embed_tokens.weight.dtype == dtype
    ids, pos = _inputs(spec)
    with torch.no_grad():
        ref = hf(ids).logits.float()
        assert ref.abs().max() > 1.0  # non-trivial logits
        model.attn_impl = "eager"
        eager = model(ids, pos)
        model.attn_impl = "sdpa"
        sdpa = model(ids, pos)
    # eager follows HF's op order (bit-identical on CPU); SDPA differs by rounding only.
    tol_eager, tol_sdpa = (1e-4, 1e-4) if dt == "fp32" else (3e-2, 0.3)
    assert (eager - ref).abs().max().item() <= tol_eager
    assert (sdpa - ref).abs().max().item() <= tol_sdpa


def test_parity_is_sensitive_to_window_and_rope(ckpts: dict[tuple[str, str], Path]) -> None:
    """Guard against a vacuous parity test: wrong window / rope scaling must change the logits."""
    from dataclasses import replace

    spec = SPECS["gemma_p6"]
    model, _ = load_checkpoint(ckpts[("gemma_p6", "fp32")])
    ids, pos = _inputs(spec)
    with torch.no_grad():
        ref = model(ids, pos)
        for other in (replace(spec, sliding_window=12), replace(spec, extra={})):
            m2 = Transformer(other)
            m2.load_state_dict(model.state_dict())
            assert (m2(ids, pos) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["gemma_p6", "llama31"])
def test_incremental_decode_matches_full_sequence(name: str) -> None:
    spec = SPECS[name]
    model = build_model(spec, "cpu", torch.float32, seed=3)
    ids, pos = _inputs(spec, batch=1)
    cache = KVCache(spec, max_slots=3, max_len=32)
    slot = torch.tensor([2])
    with torch.no_grad():
        full = model(ids, pos)
        steps = [model(ids[:, :10], pos[:, :10], cache, slot)]
        steps += [model(ids[:, t:t + 1], pos[:, t:t + 1], cache, slot) for t in range(10, SEQ)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_batched_decode_at_different_positions_matches_separate_runs() -> None:
    spec = SPECS["gemma_p6"]
    model = build_model(spec, "cpu", torch.float32, seed=4)
    ids, pos = _inputs(spec, batch=2)
    lens = (17, 9)  # prompt lengths; row 1's second half crosses the window after row 0's
    cache = KVCache(spec, max_slots=4, max_len=40)
    slots = torch.tensor([3, 1])
    with torch.no_grad():
        for row, (slot, n) in enumerate(zip(slots.tolist(), lens)):  # one prefill per sequence
            model(ids[row:row + 1, :n], pos[row:row + 1, :n], cache, torch.tensor([slot]))
        batched = []
        for step in range(5):
            p = torch.tensor([[lens[0] + step], [lens[1] + step]])
            batched.append(model(ids.gather(1, p), p, cache, slots))
        cache.free(3)
        cache.free(1)
        assert cache.k[0][3].abs().sum() == 0
        for row, n in enumerate(lens):
            ref = model(ids[row:row + 1, :n + 5], pos[row:row + 1, :n + 5])[0, n:]
            got = torch.cat([b[row] for b in batched])
            assert (got - ref).abs().max().item() < 1e-4


def test_right_padded_prefill_and_attention_mass() -> None:
    spec = SPECS["llama31"]
    model = build_model(spec, "cpu", torch.float32, seed=5)
    model.attn_impl = "eager"
    ids, pos = _inputs(spec, batch=2, seq=20)
    lengths = torch.tensor([20, 13])
    cache = KVCache(spec, max_slots=2, max_len=32)
    with torch.no_grad():
        last, mass = model(ids, pos, cache, None, True, lengths=lengths, last_only=True, page_size=8)
        ref = model(ids[1:, :13], pos[1:, :13])[0, -1]
        nxt = model(ids[1:, 13:14], pos[1:, 13:14], cache, torch.tensor([1]))[0, -1]
        ref_next = model(ids[1:, :14], pos[1:, :14])[0, -1]
    assert last.shape == (2, 1, spec.vocab_size)
    assert (last[1, 0] - ref).abs().max() < 1e-4
    assert (nxt - ref_next).abs().max() < 1e-4  # pad K/V written at 13.. were masked / overwritten
    assert mass.shape == (2, 4)  # 32 cache positions / 8
    assert torch.allclose(mass.sum(-1), torch.ones(2), atol=1e-5)
    assert mass[1, 2:].sum() < 1e-6  # row 1's last query is at 12: no mass on pages 2, 3


def test_attention_mass_matches_transformers_attentions(ckpts: dict[tuple[str, str], Path]) -> None:
    spec = SPECS["gemma_p6"]
    hf = _hf(ckpts[("gemma_p6", "fp32")], torch.float32)
    model, _ = load_checkpoint(ckpts[("gemma_p6", "fp32")])
    ids, pos = _inputs(spec)
    with torch.no_grad():
        attn = hf(ids, output_attentions=True).attentions  # per layer [B, H, T, T]
        _, mass = model(ids, pos, return_attention_mass=True, page_size=5)
    per_token = torch.stack([a[:, :, -1, :] for a in attn]).mean(dim=(0, 2))  # [B, T]
    ref = torch.nn.functional.pad(per_token, (0, 1)).view(2, 5, 5).sum(-1)
    assert (mass - ref).abs().max() < 1e-5


def test_fp16_clamping_keeps_gemma_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SPECS["gemma_p6"]
    model = build_model(spec, "cpu", torch.float16, seed=6)
    with torch.no_grad():
        for layer in model.layers:  # large post-norm gains, as in real Gemma-3 checkpoints
            assert isinstance(layer, DecoderLayer) and layer.post_feedforward_layernorm is not None
            layer.post_attention_layernorm.weight.fill_(2e4)
            layer.post_feedforward_layernorm.weight.fill_(2e4)
    ids, pos = _inputs(spec, batch=1)
    with torch.no_grad():
        assert torch.isfinite(model(ids, pos)).all()
        monkeypatch.setattr(layers_mod, "clamp_fp16", lambda x: x)
        monkeypatch.setattr(transformer_mod, "clamp_fp16", lambda x: x)
        assert not torch.isfinite(model(ids, pos)).all()  # the scenario really overflows
