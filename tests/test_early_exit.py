"""Early exit in ``Transformer.forward`` against a naive token-by-token reference, and the learned
router's weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from wicore.errors import ConfigError
from wicore.model.checkpoint import load_spec_file
from wicore.model.kv_cache import KVCache
from wicore.model.layers import rope_cos_sin
from wicore.model.router_weights import RouterWeights, load_router, save_router
from wicore.model.transformer import DecoderLayer, ModelOutput, Transformer, build_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parent.parent
SPEC = load_spec_file(ROOT / "conf" / "model" / "tiny-gemma3.yaml")  # 6 layers, window 32, layer 5 global
T = 44  # longer than the window: local layers really slide


@pytest.fixture(scope="module")
def model() -> Transformer:
    m = build_model(SPEC, "cpu", torch.float32)
    m.init_weights(std=0.15, generator=torch.Generator().manual_seed(11))  # large logits: non-trivial match
    return m


def _inputs(batch: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, SPEC.vocab_size, (batch, T), generator=g)
    exits = torch.randint(0, SPEC.num_layers + 1, (batch, T), generator=g)  # 0 (embedding only) .. 6 (full)
    return ids, torch.arange(T).expand(batch, T), exits


def naive_reference(model: Transformer, ids: Tensor, exits: Tensor) -> Tensor:
    """One row, token by token, own K/V lists and attention loop. A token that has exited keeps its
    state frozen; at each deeper layer only its K/V are computed (projections of the frozen state)."""
    spec = model.spec
    keys: list[list[Tensor]] = [[] for _ in range(spec.num_layers)]
    vals: list[list[Tensor]] = [[] for _ in range(spec.num_layers)]
    out = []
    with torch.no_grad():
        for p in range(ids.shape[0]):
            x = model.embed_tokens(ids[p:p + 1][None]) * model.embed_scale(torch.float32)  # [1, 1, H]
            pos = torch.tensor([[p]])
            for li, layer in enumerate(model.layers):
                assert isinstance(layer, DecoderLayer)
                attn = layer.self_attn
                inv = model.inv_freq_global if layer.is_global else model.inv_freq_local
                cos, sin = rope_cos_sin(pos, inv, torch.float32)
                q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
                keys[li].append(k[0, :, 0])
                vals[li].append(v[0, :, 0])
                if li >= int(exits[p]):
                    continue  # exited: K/V written from the frozen state, state unchanged
                lo = 0 if layer.is_global else max(0, p - spec.sliding_window + 1)
                ks, vs = torch.stack(keys[li][lo:], 1), torch.stack(vals[li][lo:], 1)  # [Hkv, S, D]
                group = attn.heads // attn.kv_heads
                heads = []
                for h in range(attn.heads):
                    probs = torch.softmax(q[0, h, 0] @ ks[h // group].T * attn.scale, dim=-1)
                    heads.append(probs @ vs[h // group])
                a = attn.o_proj(torch.cat(heads)[None, None])
                assert layer.post_feedforward_layernorm is not None and layer.pre_feedforward_layernorm is not None
                x = x + layer.post_attention_layernorm(a)
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            out.append(F.linear(model.norm(x), model.output_weight)[0, 0])
    return torch.stack(out)


@pytest.fixture(scope="module")
def reference(model: Transformer) -> Tensor:
    ids, _, exits = _inputs()
    return torch.stack([naive_reference(model, ids[b], exits[b]) for b in range(ids.shape[0])])


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_teacher_forced_exit_matches_naive_sequential_reference(model: Transformer, reference: Tensor,
                                                                 impl: str) -> None:
    ids, pos, exits = _inputs()
    model.attn_impl = impl
    try:
        with torch.no_grad():
            got = model(ids, pos, exit_layer=exits)
            plain = model(ids, pos)
    finally:
        model.attn_impl = "auto"
    assert reference.abs().max() > 1.0
    assert (got - reference).abs().max().item() < 1e-5
    # not vacuous: the exits change the logits, also of tokens that ran every layer (they attend to
    # propagated K/V of earlier exited tokens)
    full = exits == SPEC.num_layers
    assert full[:, 10:].any()
    assert (plain - got)[full].abs().max() > 1e-2


def test_decode_with_cache_and_exits_matches_naive_reference(model: Transformer, reference: Tensor) -> None:
    ids, pos, exits = _inputs()
    cache = KVCache(SPEC, max_slots=3, max_len=64)
    slots = torch.tensor([2, 0])
    with torch.no_grad():
        steps = [model(ids[:, :9], pos[:, :9], cache, slots, exit_layer=exits[:, :9])]  # chunked prefill
        for t in range(9, T):
            steps.append(model(ids[:, t:t + 1], pos[:, t:t + 1], cache, slots, exit_layer=exits[:, t:t + 1]))
    assert (torch.cat(steps, dim=1) - reference).abs().max().item() < 1e-5


def test_all_deep_is_bit_identical_to_the_plain_forward(model: Transformer) -> None:
    ids, pos, _ = _inputs()
    full = torch.full_like(ids, SPEC.num_layers)
    with torch.no_grad():
        plain = model(ids, pos)
        assert torch.equal(model(ids, pos, exit_layer=full), plain)
        assert torch.equal(model(ids, pos, exit_layer=full + 3), plain)
        out = model(ids, pos, exit_layer=full, return_hidden=True)
        assert isinstance(out, ModelOutput) and out.mass is None and out.taps == ()
        assert torch.equal(out.logits, plain)
        assert torch.equal(F.linear(out.hidden, model.output_weight).float(), plain)
        cache_a, cache_b = KVCache(SPEC, 2, 64), KVCache(SPEC, 2, 64)
        a = model(ids[:, :20], pos[:, :20], cache_a)
        b = model(ids[:, :20], pos[:, :20], cache_b, exit_layer=full[:, :20])
        assert torch.equal(a, b)
        a2, mass_a = model(ids[:, 20:21], pos[:, 20:21], cache_a, None, True)
        out_b = model(ids[:, 20:21], pos[:, 20:21], cache_b, None, True, exit_layer=full[:, 20:21],
                      return_hidden=True)
        assert torch.equal(a2, out_b.logits) and torch.equal(mass_a, out_b.mass)
        assert all(torch.equal(x, y) for x, y in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v))


def test_taps_are_the_exit_states(model: Transformer) -> None:
    ids, pos, _ = _inputs()
    lengths = torch.tensor([T, 30])
    with torch.no_grad():
        out = model(ids, pos, tap_layers=(0, 2, SPEC.num_layers), return_hidden=True)
        last = model(ids, pos, tap_layers=(2,), lengths=lengths, last_only=True)
        for k, tap in zip((0, 2, SPEC.num_layers), out.taps):
            exited = model(ids, pos, exit_layer=torch.full_like(ids, k), return_hidden=True)
            assert torch.equal(tap, exited.hidden)
        assert torch.equal(out.taps[-1], out.hidden)
    assert last.hidden.shape == (2, 1, SPEC.hidden_size)
    assert torch.equal(last.taps[0][1, 0], out.taps[1][1, 29])
    with pytest.raises(ValueError, match="tap_layers"):
        model(ids, pos, tap_layers=(SPEC.num_layers + 1,))
    with pytest.raises(ValueError, match="exit_layer"):
        model(ids, pos, exit_layer=torch.zeros(2, 3, dtype=torch.int64))


# ----- router weights --------------------------------------------------------------------------------
def test_router_weights_round_trip_and_scores(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, SPEC.hidden_size, generator=g), torch.randn(3, generator=g)
    save_router(tmp_path, [1, 3, 4], w, b, SPEC, {"note": "test"})
    router = load_router(tmp_path, SPEC)
    assert isinstance(router, RouterWeights) and router.depths == (1, 3, 4) and router.config["note"] == "test"
    h = torch.randn(2, 5, SPEC.hidden_size, generator=g)
    assert torch.allclose(router.router_scores(h, 3), torch.sigmoid(h @ w[1] + b[1]))
    assert router.router_scores(h.bfloat16(), 4).dtype == torch.float32
    with pytest.raises(ConfigError, match="cpu_depth=2"):
        router.router_scores(h, 2)


def test_router_weights_are_validated(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="router_config.json is missing"):
        load_router(tmp_path, SPEC)
    save_router(tmp_path, [2], torch.zeros(1, SPEC.hidden_size), torch.zeros(1), SPEC)
    save_file({"router.weight": torch.zeros(1, SPEC.hidden_size + 1), "router.bias": torch.zeros(1)},
              str(tmp_path / "router.safetensors"))
    with pytest.raises(ConfigError, match=r"router\.weight has shape \(1, 65\), expected \(1, 64\)"):
        load_router(tmp_path, SPEC)
    save_file({"router.weight": torch.zeros(1, SPEC.hidden_size)}, str(tmp_path / "router.safetensors"))
    with pytest.raises(ConfigError, match="router.bias is missing"):
        load_router(tmp_path, SPEC)
    with pytest.raises(ConfigError, match="depths"):
        save_router(tmp_path, [SPEC.num_layers + 1], torch.zeros(1, SPEC.hidden_size), torch.zeros(1), SPEC)
