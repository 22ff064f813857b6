"""Routing signals measured on the tokens a step emits (``StepResult.signals``).

For every row that emits a token the real runtime measures, on the device and without a host sync:

* ``confidence``: the largest probability of the row's next-token distribution (softmax of the logits);
* ``entropy``: that distribution's entropy divided by ``ln(vocab)``, in [0, 1];
* ``router``: ``sigmoid(w . h + b)``, the learned linear router over the row's final-normed hidden state
  (the state that predicted the emitted token), when the checkpoint ships router weights for the
  configured shallow depth;
* ``attention_peak``: the largest per-page attention mass of the row's last query (when measured).

The MoR router (``wicore.routing``) reads them to route the request's next token. Missing signals are
NaN on the device and left out of the dict on the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SIGNAL_NAMES = ("confidence", "entropy", "router", "attention_peak")


def measure(logits: Tensor, hidden: Tensor | None = None, router: tuple[Tensor, Tensor] | None = None,
            mass: Tensor | None = None) -> Tensor:
    """Signals [N, 4] (float32, columns in ``SIGNAL_NAMES`` order) for ``logits`` [N, V].

    ``hidden`` [N, H]: final-normed hidden states; ``router``: (weight [H], bias []) of the learned router;
    ``mass`` [N, P]: attention mass per KV page. Columns without their input are NaN.
    """
    n, v = logits.shape
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    out = torch.full((n, len(SIGNAL_NAMES)), float("nan"), device=logits.device, dtype=torch.float32)
    out[:, 0] = p.max(dim=-1).values
    out[:, 1] = (-(p * logp).sum(-1) / math.log(v)).clamp(0.0, 1.0)
    if hidden is not None and router is not None:
        w, b = router
        out[:, 2] = torch.sigmoid(hidden.float() @ w.float().to(hidden.device) + b.float().to(hidden.device))
    if mass is not None and mass.numel():
        out[:, 3] = mass.float().max(dim=-1).values.clamp(0.0, 1.0)
    return out


def to_dicts(rows: list[list[float]]) -> list[dict[str, float]]:
    """Host rows (from ``measure(...).tolist()``) -> one dict per row, NaN columns dropped."""
    return [{k: x for k, x in zip(SIGNAL_NAMES, row) if x == x} for row in rows]
