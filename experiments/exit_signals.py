"""Early-exit labels, the learned router fit and the per-token routing-signal table of a trained model.

Conventions (shared with ``benchmarks/mor_quality.py`` and ``wicore.model.router_weights``): the
token being routed sits at position ``t``; every signal that decides its path comes from the
forward pass of position ``t - 1`` (the full-depth step that predicted it): final-normed hidden
state (learned router input), max softmax probability ("confidence"), entropy / ln(vocab)
("entropy"), largest per-page attention mass of that query ("attention_peak"). The outcome is at
position ``t``: ``agree_d<k>`` = the shallow exit after ``k`` layers (state after ``k`` layers,
final norm, LM head) predicts the same argmax next token as full depth. Because a token's state
after ``k`` layers does not depend on later layers, the exit state equals the tap after ``k`` layers
of a full-depth pass, so one pass gives every depth's label.

Router: for each depth ``k`` a logistic regression ``P(label = 1 | h)`` with label = "shallow
exit at ``k`` disagrees with full depth" (so a high score asks for the deep path), fitted on
held-in (training) windows with full-batch Adam on standardised features; the standardisation is
folded into the saved weight and bias.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wicore.model.kv_cache import KVCache
from wicore.model.router_weights import RouterWeights
from wicore.model.transformer import ModelOutput, Transformer


def default_depths(num_layers: int) -> list[int]:
    """L/6, L/3, L/2, 2L/3 rounded, unique, in 1..L-1 (12 layers: 2, 4, 6, 8)."""
    raw = [round(num_layers * f) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3)]
    return sorted({min(max(d, 1), num_layers - 1) for d in raw}) if num_layers > 1 else [1]


def _run(model: Transformer, ids: Tensor, depths: list[int]) -> ModelOutput:
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    out = model(ids, pos, return_hidden=True, tap_layers=tuple(depths))
    assert isinstance(out, ModelOutput)
    return out


@torch.no_grad()
def router_features(model: Transformer, windows: Tensor, depths: list[int],
                    batch: int = 16) -> tuple[Tensor, Tensor]:
    """Features [N, H] fp32 (final-normed hidden of positions 0..T-2) and labels [N, len(depths)]
    (1.0 where the shallow exit at depth k disagrees with full depth at positions 1..T-1)."""
    feats, labels = [], []
    w = model.output_weight
    for i in range(0, windows.shape[0], batch):
        out = _run(model, windows[i:i + batch], depths)
        full = out.logits[:, 1:].argmax(-1)
        lab = [(F.linear(tap[:, 1:], w).argmax(-1) != full) for tap in out.taps]
        feats.append(out.hidden[:, :-1].float().reshape(-1, out.hidden.shape[-1]))
        labels.append(torch.stack(lab, dim=-1).reshape(-1, len(depths)).float())
    return torch.cat(feats), torch.cat(labels)


def fit_logistic(x: Tensor, y: Tensor, steps: int = 300, lr: float = 0.05,
                 l2: float = 1e-4) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """One logistic regression per label column: weight [D, H], bias [D] on the raw features."""
    with torch.no_grad():
        mu, sd = x.mean(0), x.std(0) + 1e-6
        z = (x - mu) / sd
    wz = torch.zeros(y.shape[1], x.shape[1], device=x.device, requires_grad=True)
    bz = torch.zeros(y.shape[1], device=x.device, requires_grad=True)
    opt = torch.optim.Adam([wz, bz], lr=lr)
    loss = torch.zeros((), device=x.device)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(z @ wz.T + bz, y) + l2 * wz.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        weight = wz / sd
        bias = bz - (wz * mu / sd).sum(-1)
        scores = torch.sigmoid(x @ weight.T + bias)
        info = {"train_rows": int(x.shape[0]), "steps": steps, "lr": lr, "l2": l2,
                "final_loss": float(loss), "positive_rate": [float(v) for v in y.mean(0)],
                "train_auc": [auc(scores[:, j], y[:, j]) for j in range(y.shape[1])]}
    return weight.detach(), bias.detach(), info


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (rank statistic, ties averaged); NaN when one class is absent."""
    s, lab = scores.double().flatten().cpu(), labels.flatten().cpu() > 0.5
    pos, neg = int(lab.sum()), int((~lab).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    sorted_s = s[order]
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    if len(uniq) < len(s):  # average ranks of ties
        ends = torch.cumsum(counts, 0).double()
        avg = ends - (counts.double() - 1) / 2
        ranks[order] = avg[inverse]
    return float((ranks[lab].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def signal_table(model: Transformer, router: RouterWeights, windows: Tensor, depths: list[int],
                 page_size: int = 16, batch: int = 64) -> dict[str, Tensor]:
    """Per routed token (positions 1..T-1 of every window) the signals of the previous position and
    the agreement of each shallow exit, measured by decoding every window token by token through a
    KV cache (the runtime's decode path; attention mass per ``page_size``-token cache page).
    Returns CPU columns: seq, position, confidence, entropy, attention_peak, router_d<k>, agree_d<k>."""
    spec = model.spec
    n, t = windows.shape
    dev = windows.device
    dtype = model.embed_tokens.weight.dtype
    log_v = math.log(spec.vocab_size)
    cols: dict[str, list[Tensor]] = {}
    for i in range(0, n, batch):
        ids = windows[i:i + batch]
        b = ids.shape[0]
        cache = KVCache(spec, b, t, dev, dtype)
        steps: dict[str, list[Tensor]] = {}
        for p in range(t):
            pos = torch.full((b, 1), p, device=dev, dtype=torch.int64)
            out = model(ids[:, p:p + 1], pos, cache, None, True, return_hidden=True,
                        tap_layers=tuple(depths), page_size=page_size)
            assert isinstance(out, ModelOutput) and out.mass is not None
            logp = torch.log_softmax(out.logits[:, 0], dim=-1)
            full = logp.argmax(-1)
            rec = {"confidence": logp.max(-1).values.exp(),
                   "entropy": (-(logp.exp() * logp).sum(-1) / log_v).clamp(0.0, 1.0),
                   "attention_peak": out.mass.max(-1).values.clamp(0.0, 1.0)}  # fp32 sums may reach 1 + 1e-7
            for k, tap in zip(depths, out.taps):
                rec[f"router_d{k}"] = router.router_scores(out.hidden[:, 0], k)
                rec[f"agree_d{k}"] = (F.linear(tap[:, 0], model.output_weight).argmax(-1) == full).float()
            for key, v in rec.items():
                steps.setdefault(key, []).append(v.float())
        per = {k: torch.stack(v, dim=1) for k, v in steps.items()}  # [b, t]
        for key, v in per.items():
            shifted = v[:, 1:] if key.startswith("agree_") else v[:, :-1]  # outcome at t, signals at t - 1
            cols.setdefault(key, []).append(shifted.reshape(-1))
        cols.setdefault("seq", []).append(torch.arange(i, i + b, device=dev).repeat_interleave(t - 1).float())
        cols.setdefault("position", []).append(torch.arange(1, t, device=dev).repeat(b).float())
    out_cols = {k: torch.cat(v).cpu() for k, v in cols.items()}
    out_cols["seq"] = out_cols["seq"].long()
    out_cols["position"] = out_cols["position"].long()
    return out_cols


def router_eval(table: dict[str, Tensor], depths: list[int]) -> dict[str, Any]:
    """Held-out AUC of each scorer at predicting "shallow exit disagrees" per depth."""
    res: dict[str, Any] = {}
    for k in depths:
        dis = 1.0 - table[f"agree_d{k}"]
        res[f"d{k}"] = {"disagree_rate": float(dis.mean()),
                        "auc_router": auc(table[f"router_d{k}"], dis),
                        "auc_confidence": auc(1.0 - table["confidence"], dis),
                        "auc_entropy": auc(table["entropy"], dis),
                        "auc_attention": auc(1.0 - table["attention_peak"], dis)}
    return res
