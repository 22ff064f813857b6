"""Token routing (MoR): deep accelerator path vs shallow path with early exit. Pure policy code.

Semantics (the simulator and the real runtime implement the same ones):

* Routing applies to decode tokens only. Prefill chunks always take the deep path
  and get no ``RouteDecision``.
* Each decode token of request ``r`` gets a score ``s`` in ``[0, 1)`` from a scorer
  (``wicore.routing.scorers``; scores are clamped to ``[0, 1 - 2**-24]``). The token
  takes the deep path iff ``s >= threshold``: threshold 0 sends every token deep,
  threshold 1 every token shallow.
* Deep path: ``gpu_depth`` layers on the GPU (``gpu_depth`` defaults to the model's
  ``num_layers``; when smaller, the deep path also exits early at ``gpu_depth``).
* Shallow path: the first ``cpu_depth`` layers on ``shallow_device`` (``cpu``, the
  default, or ``gpu`` = early exit on the GPU), then exit. The KV entries of the
  layers a token skipped are filled by state propagation: the exit hidden state is
  projected with each skipped layer's K/V weights, so later tokens can attend to
  them. The final norm + LM head of shallow tokens run on the GPU; with
  ``shallow_device=cpu`` the exit hidden state crosses PCIe
  (``hidden_size * 2`` bytes per token).
* With ``shallow_device=cpu`` the CPU also needs the K/V of layers ``< cpu_depth`` of
  every previous token: deep tokens' K/V of those layers are copied GPU->CPU,
  shallow tokens' K/V of those layers CPU->GPU (per token
  ``cpu_depth * kv_bytes_per_token_layer`` each).
* Signals come from the backend in ``StepResult.signals``: per request id, the
  signals measured on the token that request emitted in the step, used to route
  its next token. Keys (floats in [0, 1]): ``confidence`` (max softmax
  probability), ``entropy`` (entropy / ln(vocab)), ``router`` (sigmoid of the
  learned linear router over the final hidden state, when the model has one),
  ``attention_peak`` (largest per-page attention mass of the request's last query).
* Scorers (high score -> deep): ``learned``: ``router``; ``confidence``:
  ``1 - confidence``; ``entropy``: ``entropy``; ``attention``: ``1 - attention_peak``;
  ``random``: a seeded uniform (ablation). A request with no signal yet (or whose
  signals lack the scorer's key) is scored ``cold_score`` (default ``1 - 2**-24``:
  deep).
* In a step where routing is on and no token is deep, the engine drops the weight
  fetches the GPU does not need (see ``wicore.engine``).
"""

from wicore.routing.router import MoRRouter, RoutingConfig
from wicore.routing.scorers import (
    COLD_SCORE,
    MAX_SCORE,
    AttentionScorer,
    ConfidenceScorer,
    EntropyScorer,
    LearnedScorer,
    RandomScorer,
    Scorer,
)

__all__ = ["COLD_SCORE", "MAX_SCORE", "AttentionScorer", "ConfidenceScorer", "EntropyScorer", "LearnedScorer",
           "MoRRouter", "RandomScorer", "RoutingConfig", "Scorer"]
