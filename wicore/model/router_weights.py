"""The learned MoR router of a checkpoint: ``router.safetensors`` + ``router_config.json``.

One logistic regression per shallow depth ``k`` (``depths``, each the ``cpu_depth`` it was fitted
for): ``score = sigmoid(router.weight[i] . h + router.bias[i])``, where ``h`` is the final-normed
hidden state [hidden_size] of the PREVIOUS position (the full-depth state that predicted the token
now being routed) and the score estimates the probability that the shallow exit after ``k`` layers
predicts a different next token than the full model. High score -> deep path.

Files (written by ``experiments/train_small.py``, read here):

* ``router.safetensors``: ``router.weight`` [n_depths, hidden_size] fp32, ``router.bias`` [n_depths] fp32.
* ``router_config.json``: ``{"depths": [...], "input": "final_norm_hidden_of_previous_position", ...}``
  (further keys describe how it was fitted; they are kept in ``RouterWeights.config``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wicore.errors import ConfigError
from wicore.model.spec import ModelSpec

ROUTER_FILE = "router.safetensors"
ROUTER_CONFIG = "router_config.json"
ROUTER_INPUT = "final_norm_hidden_of_previous_position"


@dataclass(frozen=True)
class RouterWeights:
    depths: tuple[int, ...]
    weight: Tensor  # [n_depths, hidden] fp32
    bias: Tensor  # [n_depths] fp32
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    def index(self, depth: int) -> int:
        """Row of ``depth`` in ``weight``; ConfigError when no router was fitted for it."""
        if depth not in self.depths:
            raise ConfigError(f"routing.cpu_depth={depth}: the checkpoint's learned router has no entry for "
                              f"this depth (router_config.json depths: {list(self.depths)}); use one of them "
                              "or another scorer")
        return self.depths.index(depth)

    def router_scores(self, hidden: Tensor, depth: int) -> Tensor:
        """Scores in [0, 1] for ``hidden`` [..., H] (any float dtype/device of the weights): shape [...].
        Computed in fp32; no host synchronisation."""
        i = self.index(depth)
        return torch.sigmoid(hidden.float() @ self.weight[i] + self.bias[i])

    def to(self, device: torch.device | str) -> RouterWeights:
        return RouterWeights(self.depths, self.weight.to(device), self.bias.to(device), self.config)


def _validate(depths: list[Any], weight: Tensor, bias: Tensor, spec: ModelSpec, where: str) -> tuple[int, ...]:
    if not depths or not all(isinstance(d, int) and 1 <= d <= spec.num_layers for d in depths):
        raise ConfigError(f"{where}/{ROUTER_CONFIG}: depths must be a non-empty list of layer counts in "
                          f"1..{spec.num_layers} (the model's num_layers), got {depths!r}")
    if len(set(depths)) != len(depths):
        raise ConfigError(f"{where}/{ROUTER_CONFIG}: depths {depths} has duplicates")
    want_w, want_b = (len(depths), spec.hidden_size), (len(depths),)
    if tuple(weight.shape) != want_w:
        raise ConfigError(f"{where}/{ROUTER_FILE}: router.weight has shape {tuple(weight.shape)}, expected "
                          f"{want_w} ([len(depths), hidden_size]); refit the router for this checkpoint")
    if tuple(bias.shape) != want_b:
        raise ConfigError(f"{where}/{ROUTER_FILE}: router.bias has shape {tuple(bias.shape)}, expected "
                          f"{want_b} ([len(depths)]); refit the router for this checkpoint")
    return tuple(int(d) for d in depths)


def has_router(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / ROUTER_FILE).is_file()


def load_router(checkpoint: str | Path, spec: ModelSpec, device: torch.device | str = "cpu") -> RouterWeights:
    """Read and validate a checkpoint's router against ``spec``; every problem is a ConfigError that
    names the file and tensor."""
    from safetensors import SafetensorError, safe_open

    root = Path(checkpoint)
    cfg_path, w_path = root / ROUTER_CONFIG, root / ROUTER_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ConfigError(f"{root}: {p.name} is missing; the learned scorer needs a fitted router "
                              "(python -m experiments.train_small writes one) or pick another scorer")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_path}: must hold a JSON object with a 'depths' list")
    if config.get("input", ROUTER_INPUT) != ROUTER_INPUT:
        raise ConfigError(f"{cfg_path}: input '{config.get('input')}' is not supported (only {ROUTER_INPUT})")
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            for name in ("router.weight", "router.bias"):
                if name not in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    raise ConfigError(f"{w_path}: tensor {name} is missing (found {sorted(f.keys())})")
                tensors[name] = f.get_tensor(name).float()
    except SafetensorError as exc:
        raise ConfigError(f"{w_path}: not a readable safetensors file ({exc})") from exc
    depths = _validate(list(config.get("depths") or []), tensors["router.weight"], tensors["router.bias"],
                       spec, str(root))
    return RouterWeights(depths, tensors["router.weight"].to(device), tensors["router.bias"].to(device), config)


def save_router(out_dir: str | Path, depths: list[int], weight: Tensor, bias: Tensor, spec: ModelSpec,
                info: dict[str, Any] | None = None) -> Path:
    """Write ``router.safetensors`` and ``router_config.json`` (``info`` adds descriptive keys)."""
    from safetensors.torch import save_file

    _validate(list(depths), weight, bias, spec, str(out_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"router.weight": weight.detach().float().cpu().contiguous(),
               "router.bias": bias.detach().float().cpu().contiguous()}, str(out / ROUTER_FILE))
    config = {"depths": [int(d) for d in depths], "input": ROUTER_INPUT,
              "score": "sigmoid(weight[i] . h + bias[i]) = P(shallow exit after depths[i] layers predicts a "
                       "different next token than full depth); deep path when score >= threshold",
              "num_layers": spec.num_layers, "hidden_size": spec.hidden_size, **(info or {})}
    (out / ROUTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out / ROUTER_FILE
