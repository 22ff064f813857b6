"""The small-model pipeline at micro scale on the CPU: stdlib corpus split, tokenizer, a few training
steps, checkpoint + router + signals, verification, and the MoR quality benchmark on the result."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from benchmarks import mor_quality
from experiments import stdlib_corpus, train_small
from wicore.cli import main as wicore_main
from wicore.model.checkpoint import load_checkpoint
from wicore.model.router_weights import load_router
from wicore.server.tokenizer import HFTokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("torch_one_thread")
STEPS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("train_small") / "micro"
    rc = train_small.main(["--out", str(out), "--preset", "micro", "--steps", str(STEPS), "--device", "cpu",
                           "--eval-windows", "4", "--router-windows", "16", "--signal-rows", "1500",
                           "--log-every", "1"])
    assert rc == 0
    return out


def test_corpus_split_is_deterministic_and_excludes_tests() -> None:
    files = stdlib_corpus.list_files()
    again = stdlib_corpus.list_files()
    assert files == again
    assert not set(files.train) & set(files.heldout)
    share = len(files.heldout) / (len(files.train) + len(files.heldout))
    assert 0.005 < share < 0.05
    for name in files.train + files.heldout:
        parts = name.split("/")[:-1]
        assert not any(p in ("test", "tests", "site-packages") or p.endswith("_test") for p in parts), name
    assert "os.py" in files.train + files.heldout
    assert all(stdlib_corpus.is_heldout(n) for n in files.heldout)


def test_checkpoint_loads_verifies_and_has_the_project_tokenizer(ckpt: Path) -> None:
    model, spec = load_checkpoint(ckpt)
    assert spec.family == "gemma3" and spec.num_layers == 6 and spec.vocab_size == 512
    assert spec.sliding_window == 32 and spec.sliding_window_pattern == 6 and spec.tie_embeddings
    assert wicore_main(["verify", str(ckpt)]) == 0
    tok = load_tokenizer(spec.vocab_size, checkpoint=ckpt)
    assert isinstance(tok, HFTokenizer)
    assert [tok.special_id(s) for s in ("<pad>", "<eos>", "<bos>")] == [0, 1, 2]
    assert tok.bos_id == 2 and 1 in tok.stop_ids
    text = "import os\n\nclass A:\n    def f(self):\n        return 'x'\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text)  # merges were learned
    assert max(ids) < spec.vocab_size
    with torch.no_grad():  # the trained weights are the ones stored
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None])
    assert torch.isfinite(logits).all()


def test_training_log_shows_learning(ckpt: Path) -> None:
    log = json.loads((ckpt / "training_log.json").read_text())
    assert log["steps"] == STEPS and log["tokens_seen"] == STEPS * 8 * 128
    curve = log["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.3  # from ~ln(512) = 6.2 down
    for key in ("final_train_loss", "final_heldout_loss", "train_wall_s", "device", "python"):
        assert log[key] is not None, key
    assert log["corpus"]["heldout"] and log["checks"] == {**log["checks"], "verify_ok": True, "tokenizer_ok": True}
    assert set(log["final_exit_losses"]["heldout"]) == {"loss", "exit_d1", "exit_d2", "exit_d3", "exit_d4"}


def test_router_and_signals(ckpt: Path) -> None:
    _, spec = load_checkpoint(ckpt)
    cfg = json.loads((ckpt / "router_config.json").read_text())
    assert cfg["depths"] == [1, 2, 3, 4] and cfg["input"] == "final_norm_hidden_of_previous_position"
    with safe_open(str(ckpt / "router.safetensors"), framework="pt") as f:
        assert tuple(f.get_tensor("router.weight").shape) == (4, spec.hidden_size)
        assert tuple(f.get_tensor("router.bias").shape) == (4,)
        assert f.get_tensor("router.weight").dtype == torch.float32
    router = load_router(ckpt, spec)
    assert router.depths == (1, 2, 3, 4)
    df = pd.read_parquet(ckpt / "signals.parquet")
    expected = {"confidence", "entropy", "router", "attention_peak", *(f"router_d{k}" for k in (1, 2, 3, 4)),
                *(f"agree_d{k}" for k in (1, 2, 3, 4))}
    assert expected <= set(df.columns)
    assert len(df) == 1500
    for col in ("confidence", "entropy", "router", "attention_peak"):
        assert df[col].between(0, 1).all(), col
    assert set(df["agree_d1"].unique()) <= {0.0, 1.0} and (df["position"] >= 1).all()
    assert (df["router"] == df["router_d3"]).all()
    assert (df.loc[df["position"] <= 16, "attention_peak"] > 0.999).all()  # one page of 16 tokens holds all
    assert df["attention_peak"].min() < 0.9


def test_mor_quality_quick_on_the_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "mq"
    assert mor_quality.main(["--checkpoint", str(ckpt), "--out", str(out), "--quick", "--device", "cpu"]) == 0
    for name in ("results.csv", "results.json", "table.md", "quality_vs_deep_fraction.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    rows = pd.DataFrame(res["rows"])
    assert set(rows["scorer"]) == {"learned", "confidence", "entropy", "random"}
    assert set(rows["cpu_depth"]) == {1, 2, 3, 4} and set(rows["threshold"]) == {0.0, 0.5, 1.0}
    assert "CPU" in res["meta"]["device"]
    zero, one = rows[rows["threshold"] == 0.0], rows[rows["threshold"] == 1.0]
    assert (zero["agreement"] == 1.0).all() and (zero["ppl_change_pct"] == 0.0).all()
    assert (zero["deep_fraction"] == 1.0).all() and (zero["compute_fraction"] == 1.0).all()
    assert (one["deep_fraction"] == 0.0).all()
    assert ((one["compute_fraction"] - one["cpu_depth"] / 6).abs() < 1e-12).all()
    assert (one["agreement"] < 1.0).any()  # shallow exits of a barely trained model do disagree
