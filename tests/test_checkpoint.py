"""HF-layout checkpoints: writer, validating loader, multimodal names, verify report, CLI."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from wicore.errors import ConfigError  # noqa: E402
from wicore.model import checkpoint as ckpt  # noqa: E402
from wicore.model.checkpoint import (  # noqa: E402
    CheckpointError,
    expected_tensors,
    load_checkpoint,
    load_spec_file,
    spec_from_checkpoint,
    write_random_checkpoint,
)
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.verify import main as verify_main  # noqa: E402
from wicore.model.verify import verify_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "conf" / "model" / "tiny-gemma3.yaml"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_spec_file(TINY)


def _logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.arange(40).remainder(vocab)[None]
    with torch.no_grad():
        return model(ids, torch.arange(40)[None])


def test_single_file_and_sharded_round_trip(spec: ModelSpec, tmp_path: Path) -> None:
    single = write_random_checkpoint(spec, tmp_path / "single", dtype="fp32", seed=3)
    sharded = write_random_checkpoint(spec, tmp_path / "sharded", dtype="fp32", seed=3, max_shard_bytes=60_000)
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected_tensors(spec))
    assert json.loads((single / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    assert (single / "generation_config.json").is_file()

    stored = load_file(single / "model.safetensors")
    m1, s1 = load_checkpoint(single)
    m2, s2 = load_checkpoint(sharded)
    assert s1.num_layers == spec.num_layers and s1.family == "gemma3" and s1.dtype == "fp32"
    params = dict(m1.named_parameters())
    for name, tensor in stored.items():
        assert torch.equal(params[ckpt.param_name(name)], tensor), name
    assert stored["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.2)
    assert torch.equal(_logits(m1, spec.vocab_size), _logits(m2, spec.vocab_size))  # same values either way


def test_bf16_checkpoint_and_dtype_override(spec: ModelSpec, tmp_path: Path) -> None:
    path = write_random_checkpoint(spec, tmp_path / "bf16", dtype="bf16")
    model, loaded = load_checkpoint(path)
    assert loaded.dtype == "bf16" and model.embed_tokens.weight.dtype == torch.bfloat16
    model32, loaded32 = load_checkpoint(path, dtype=torch.float32)
    assert loaded32.dtype == "fp32" and model32.norm.weight.dtype == torch.float32
    assert torch.isfinite(_logits(model32, spec.vocab_size)).all()


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_extra_misshaped_reported_together(spec: ModelSpec, tmp_path: Path) -> None:
    path = write_random_checkpoint(spec, tmp_path / "bad", dtype="fp32")

    def edit(t: dict[str, torch.Tensor]) -> None:
        del t["model.layers.2.self_attn.k_norm.weight"]
        t["model.layers.3.mlp.up_proj.weight"] = torch.zeros(64, 64)
        t["model.layers.9.mlp.up_proj.weight"] = torch.zeros(128, 64)

    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert isinstance(err.value, ConfigError)
    assert "3 problem(s)" in msg
    assert "model.layers.2.self_attn.k_norm.weight: missing (expected shape (16,))" in msg
    assert "model.layers.3.mlp.up_proj.weight: expected shape (128, 64), found (64, 64)" in msg
    assert "model.layers.9.mlp.up_proj.weight: unexpected tensor" in msg


def test_integer_dtype_and_pickle_only_rejected(spec: ModelSpec, tmp_path: Path) -> None:
    path = write_random_checkpoint(spec, tmp_path / "int", dtype="fp32")
    _rewrite(path, lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight: dtype I32 is not a floating type"):
        load_checkpoint(path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_layout_accepted(spec: ModelSpec, tmp_path: Path, prefix: str) -> None:
    src = write_random_checkpoint(spec, tmp_path / "text", dtype="fp32")
    ref, _ = load_checkpoint(src)
    mm = tmp_path / "mm"
    mm.mkdir()
    tensors = {prefix + k[len("model."):]: v for k, v in load_file(src / "model.safetensors").items()}
    tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2)
    tensors["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, 64)
    save_file(tensors, mm / "model.safetensors")
    text_cfg = json.loads((src / "config.json").read_text())
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text_cfg, "vision_config": {"model_type": "siglip_vision_model"}}
    (mm / "config.json").write_text(json.dumps(config))
    model, loaded = load_checkpoint(mm)
    assert loaded.num_layers == spec.num_layers
    assert torch.equal(_logits(model, spec.vocab_size), _logits(ref, spec.vocab_size))
    assert verify_checkpoint(mm).ok


def test_published_multimodal_config_gets_gemma_defaults(tmp_path: Path) -> None:
    # text_config of google/gemma-3-4b-it omits the fields equal to Gemma3TextConfig's defaults.
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "torch_dtype": "bfloat16",
              "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                              "num_hidden_layers": 34, "sliding_window": 1024,
                              "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = spec_from_checkpoint(tmp_path)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (8, 4, 256, 262208)
    assert spec.sliding_window_pattern == 6 and spec.is_global(5) and not spec.is_global(4)
    assert spec.extra["rope_scaling"]["factor"] == 8.0 and spec.dtype == "bf16"
    assert abs(spec.total_params / 1e9 - 3.88) < 0.05


def test_verify_passes_then_fails_on_missing_shard_and_tensor(spec: ModelSpec, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from wicore.model.checkpoint import main as ckpt_main

    out = tmp_path / "ok"
    assert ckpt_main(["create", "--spec", str(TINY), "--out", str(out), "--shard-mb", "0.06"]) == 0
    (out / "tokenizer.json").write_text("{}")
    report = verify_checkpoint(out, sha256=True)
    assert report.ok, report.render()
    text = report.render()
    assert "PASS" in text and "parameter count" in text and "tokenizer.json" in text and "Summary: OK" in text
    assert verify_main([str(out)]) == 0

    broken = tmp_path / "no-shard"
    shutil.copytree(out, broken)
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[1].unlink()
    report = verify_checkpoint(broken)
    assert not report.ok
    assert f"{shards[1].name}: missing (named in model.safetensors.index.json)" in report.render()
    assert verify_main([str(broken)]) == 1
    with pytest.raises(CheckpointError, match=shards[1].name):
        load_checkpoint(broken)

    holey = tmp_path / "no-tensor"
    shutil.copytree(out, holey)
    shard = sorted(holey.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    victim = sorted(tensors)[0]
    del tensors[victim]
    save_file(tensors, shard)
    report = verify_checkpoint(holey)
    assert not report.ok
    assert f"{victim}: listed under {shard.name} but not stored in it" in report.render()
    assert f"{victim}: missing" in report.render()

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    shard = sorted(truncated.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    report = verify_checkpoint(truncated)
    assert not report.ok and "truncated" in report.render()
    capsys.readouterr()
