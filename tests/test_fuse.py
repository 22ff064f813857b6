"""Fused q/k/v and gate/up projections (wicore/model/fuse.py)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_cfg
from tests.test_warmup import RUN, _tokens
from wicore.model.fuse import fuse_projections, unfuse_projections
from wicore.model.spec import ModelSpec
from wicore.model.transformer import build_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _spec() -> ModelSpec:
    from experiments.run_torch import build_torch

    return build_torch(make_cfg(*RUN)).spec


def test_fusing_keeps_parameters_and_logits_and_skips_layers():
    spec = _spec()
    model = build_model(spec, "cpu", "fp32", seed=0)
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(9)[None].expand(2, 9)
    with torch.inference_mode():
        ref = model(ids, pos)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = fuse_projections(model, skip_layers={1})
    assert n == 2 * (spec.num_layers - 1)
    assert model.layers[1].self_attn.qkv is None and model.layers[1].mlp.gate_up is None
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    # the parameters are views of the fused weights: same names, shapes and values, no copy
    assert attn.k_proj.weight.data_ptr() == attn.qkv[attn.q_proj.weight.shape[0]:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up[mlp.gate_proj.weight.shape[0]:].data_ptr()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    with torch.inference_mode():
        fused = model(ids, pos)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 2  # only the skipped layer was left
    unfuse_projections(model)
    w = attn.q_proj.weight
    assert attn.qkv is None and w.untyped_storage().nbytes() == w.numel() * w.element_size()  # own storage
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, pos), ref, rtol=1e-5, atol=1e-5)


def test_fused_projections_in_the_engine_give_the_tokens_of_the_unfused_model():
    plain, _ = _tokens("backend.warmup=false")
    fused, setup = _tokens("backend.warmup=false", "backend.fuse_projections=true")
    assert fused == plain
    attn = setup.backend.model.layers[0].self_attn
    assert attn.qkv is not None and attn.q_proj.weight.data_ptr() == attn.qkv.data_ptr()
