"""Per-row batched sampling: greedy, top-k, top-p, seeding."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

from wicore.model.sampling import sample  # noqa: E402


def _logits(batch: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits()
    assert torch.equal(sample(logits, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=torch.zeros(4)), logits.argmax(-1))


def test_top_k_one_is_greedy() -> None:
    logits = _logits(batch=64)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, temperature=1.5, top_k=1, generator=gen), logits.argmax(-1))


def test_tiny_top_p_is_argmax() -> None:
    logits = _logits(batch=64)
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = _logits(batch=32)
    a = sample(logits, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample(logits, 1.0, generator=torch.Generator().manual_seed(5))
    c = sample(logits, 1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.dtype == torch.int64 and a.shape == (32,)


def test_mixed_batch_per_row_parameters() -> None:
    logits = _logits(batch=4).repeat(50, 1)  # 200 rows, 4 distinct distributions
    temp = torch.tensor([0.0, 1.0, 1.0, 1.0]).repeat(50)
    top_k = torch.tensor([0, 3, 0, 0]).repeat(50)
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5]).repeat(50)
    out = sample(logits, temp, top_k, top_p, torch.Generator().manual_seed(7)).view(50, 4)
    assert (out[:, 0] == logits[0].argmax()).all()  # greedy row
    top3 = logits[1].topk(3).indices
    assert torch.isin(out[:, 1], top3).all()  # top-k row stays in the top 3
    probs = torch.softmax(logits[3], -1)
    order = probs.argsort(descending=True)
    keep = order[: int((probs[order].cumsum(0) - probs[order] < 0.5).sum())]
    assert torch.isin(out[:, 3], keep).all()  # nucleus row stays in the 50 % nucleus
    assert out[:, 2].unique().numel() > 3  # plain sampled row varies


def test_sampling_matches_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    out = sample(logits, 1.0, generator=torch.Generator().manual_seed(8))
    freq = torch.bincount(out, minlength=4).float() / out.numel()
    assert (freq - probs).abs().max() < 0.015
    hot = sample(logits, 0.5, generator=torch.Generator().manual_seed(9))
    assert (hot == 0).float().mean() > 0.6  # lower temperature sharpens
