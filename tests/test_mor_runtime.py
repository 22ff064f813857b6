"""MoR routing on the real runtime: the routed executor equals the reference early-exit semantics of
``Transformer.forward(exit_layer=...)``, threshold 0 reproduces routing off, and both shallow devices
produce the same tokens."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from experiments.run_torch import build_torch, run_torch
from tests.conftest import make_cfg
from wicore.errors import ConfigError
from wicore.model.kv_cache import KVCache
from wicore.model.transformer import build_model
from wicore.runtime.driver import TorchDriver
from wicore.runtime.mor import MoRRuntime

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = ["model=tiny-gemma3", "workload.num_requests=8", "workload.concurrency=4",
        "workload.prompt.kind=uniform", "workload.prompt.low=5", "workload.prompt.high=30",
        "workload.output.kind=fixed", "workload.output.value=10",
        "report.enabled=false", "progress=false", "backend=torch", "backend.device=cpu"]


@pytest.mark.parametrize("shallow_device", ["cpu", "gpu"])
def test_routed_decode_matches_the_reference_exit_semantics(shallow_device):
    spec = make_cfg("model=tiny-gemma3").model
    from wicore.model.spec import ModelSpec

    spec = ModelSpec.from_config(dict(spec))
    model = build_model(spec, "cpu", "fp32", seed=3)
    n_layers, prompt, steps = spec.num_layers, 20, 6
    ids = torch.randint(3, spec.vocab_size, (3, prompt + steps), generator=torch.Generator().manual_seed(0))
    # per row and step: the depth the decode token runs (cpu: shallow = 2, deep = all layers)
    pattern = [[n_layers, 2, 2, n_layers, 2, 3], [2] * 6, [n_layers, n_layers, 4, n_layers, 2, n_layers]]
    if shallow_device == "cpu":
        pattern = [[d if d == 2 else n_layers for d in row] for row in pattern]
    cache = KVCache(spec, 4, 64)
    mor = MoRRuntime(model, cache, 2, n_layers, shallow_device)
    slots = [2, 0, 1]
    out = []
    with torch.inference_mode():
        for b in range(3):
            model(ids[b:b + 1, :prompt], torch.arange(prompt)[None], cache, torch.tensor([slots[b]]))
        for step in range(steps):
            logits, hidden, _ = mor.decode([10, 11, 12], ids[:, prompt + step].tolist(), [prompt + step] * 3, slots,
                                           [pattern[b][step] for b in range(3)], True, 16)
            assert hidden.shape == (3, spec.hidden_size)
            out.append(logits)
        exits = torch.full((3, prompt + steps), n_layers)
        exits[:, prompt:] = torch.tensor(pattern)
        ref = model(ids, torch.arange(prompt + steps)[None].expand(3, -1), exit_layer=exits)
    mor.close()
    assert isinstance(ref, torch.Tensor)
    torch.testing.assert_close(torch.stack(out, 1), ref[:, prompt:], atol=1e-5, rtol=1e-5)
    assert mor.tokens_shallow == sum(d <= 2 for row in pattern for d in row)


def _run(overrides: list[str]) -> tuple[dict[int, list[int]], list[dict[int, dict[str, float]]], pd.DataFrame]:
    """Run the tiny workload; return the tokens of every request, the signals of every step, the steps."""
    s = build_torch(make_cfg(*TINY, *overrides))
    tokens: dict[int, list[int]] = {}
    signals: list[dict[int, dict[str, float]]] = []
    execute = s.backend.execute

    def spy(plan):  # type: ignore[no-untyped-def]
        result = execute(plan)
        for rid, toks in result.tokens.items():
            tokens.setdefault(rid, []).extend(toks)
        signals.append(result.signals)
        return result

    s.backend.execute = spy
    TorchDriver(s.engine, s.backend, s.workload, s.t0).run()
    return tokens, signals, s.recorder.frames()[1]


def test_threshold_zero_reproduces_routing_off_and_both_shallow_devices_agree():
    scorer = ["routing=mor", "routing.scorer=confidence", "routing.cpu_depth=2"]
    off, _, _ = _run([])
    deep, _, _ = _run([*scorer, "routing.threshold=0"])
    cpu, sig_cpu, _ = _run([*scorer, "routing.threshold=1"])
    gpu, _, _ = _run([*scorer, "routing.threshold=1", "routing.shallow_device=gpu"])
    assert len(off) == 8 and off == deep  # threshold 0: every token deep = no routing
    assert cpu == gpu  # the CPU path computes what early exit on the accelerator computes (fp32)
    assert cpu != off  # and shallow tokens are really different tokens


def test_step_table_counts_deep_and_shallow_tokens(tmp_path):
    run_torch(make_cfg(*TINY, "routing=mor", "routing.scorer=confidence", "routing.cpu_depth=2",
                       "routing.threshold=1"), tmp_path / "shallow")
    st = pd.read_parquet(tmp_path / "shallow" / "steps.parquet")
    assert st["deep_tokens"].sum() == 0 and st["shallow_tokens"].sum() == st["decode_tokens"].sum() > 0


def test_learned_scorer_without_a_router_fails_at_start_up():
    with pytest.raises(ConfigError, match="routing.scorer=learned"):
        build_torch(make_cfg(*TINY, "routing=mor", "routing.scorer=learned", "routing.cpu_depth=2"))


def test_signals_are_returned_for_every_emitted_token():
    tokens, signals, _ = _run(["routing=mor", "routing.scorer=entropy", "routing.cpu_depth=2",
                               "routing.threshold=0.5"])
    rows = [sig for step in signals for sig in step.values()]
    assert len(rows) == sum(len(t) for t in tokens.values())
    assert all(0.0 <= r["confidence"] <= 1.0 and 0.0 <= r["entropy"] <= 1.0 for r in rows)
    assert any("attention_peak" in r for r in rows)
