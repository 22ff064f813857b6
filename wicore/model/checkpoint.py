"""Hugging Face-layout safetensors checkpoints: random writer, validating loader, CLI.

Layout: ``config.json`` (Gemma3ForCausalLM / ``gemma3_text`` or LlamaForCausalLM),
``generation_config.json`` and ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` shards
with ``model.safetensors.index.json``. Tensor names are HF's (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ..., ``lm_head.weight`` when untied). The loader also
accepts the Gemma3ForConditionalGeneration names (``language_model.model.*`` /
``model.language_model.*``) and skips vision tensors. Pickle files are never read.

    python -m wicore.model.checkpoint create --spec conf/model/tiny-gemma3.yaml --out DIR \
        [--dtype bf16] [--shard-mb N] [--seed 0] [--std 0.02]
"""

from __future__ import annotations

import argparse
import copy
import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wicore.errors import ConfigError
from wicore.model.spec import ModelSpec
from wicore.model.transformer import DTYPES, Transformer, build_model, to_torch_dtype

SAFETENSORS_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
ALL_DTYPE_BYTES = {**FLOAT_DTYPES, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SKIP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                 "model.multi_modal_projector.")
RENAMES = (("language_model.model.", "model."), ("model.language_model.", "model."),
           ("language_model.lm_head.", "lm_head."))
# Gemma3TextConfig defaults: published multimodal configs omit them from text_config.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
}


class CheckpointError(ConfigError):
    """A checkpoint is incomplete or does not match its config; the message names every problem."""


@dataclass(frozen=True)
class TensorEntry:
    name: str  # name as stored in the file
    file: Path
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


# ----- names and shapes ------------------------------------------------------------
def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for ``spec``, in checkpoint order."""
    h, d, q, kv, i = spec.hidden_size, spec.head_dim, spec.q_dim, spec.kv_dim, spec.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h)}
    gemma = spec.family == "gemma3"
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        if gemma:
            out[p + "self_attn.q_norm.weight"] = (d,)
            out[p + "self_attn.k_norm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if gemma:
            out[p + "pre_feedforward_layernorm.weight"] = (h,)
            out[p + "post_feedforward_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
    out["model.norm.weight"] = (h,)
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, h)
    return out


def canonical_name(name: str) -> str | None:
    """Map a stored name to the Gemma3ForCausalLM / LlamaForCausalLM name; None for vision tensors."""
    if name.startswith(SKIP_PREFIXES):
        return None
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def param_name(hf_name: str) -> str:
    """HF name -> ``Transformer`` parameter name (drop the leading ``model.``)."""
    return hf_name[len("model."):] if hf_name.startswith("model.") else hf_name


# ----- config ----------------------------------------------------------------------
def hf_config(spec: ModelSpec, dtype: str | None = None) -> dict[str, Any]:
    """A ``config.json`` that transformers loads as Gemma3ForCausalLM or LlamaForCausalLM."""
    dt = TORCH_DTYPE_NAMES[dtype or spec.dtype]
    common: dict[str, Any] = {
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim, "max_position_embeddings": spec.max_context,
        "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": dt, "use_cache": True, "_name_or_path": spec.name,
    }
    if spec.extra.get("rope_scaling"):
        common["rope_scaling"] = dict(spec.extra["rope_scaling"])
    if spec.family == "gemma3":
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
                "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar":
                    spec.query_pre_attn_scalar or spec.head_dim,
                "sliding_window": spec.sliding_window or None,
                "sliding_window_pattern": spec.sliding_window_pattern,
                "layer_types": ["full_attention" if spec.is_global(i) else "sliding_attention"
                                for i in range(spec.num_layers)],
                "rope_local_base_freq": spec.rope_local_base, "final_logit_softcapping": None,
                "attn_logit_softcapping": None, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    bos, eos = (128000, 128009) if spec.vocab_size >= 128256 else (1, 2)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "hidden_act": "silu",
            "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos}


def normalize_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill what ``ModelSpec.from_hf_config`` needs: Gemma3TextConfig defaults, the transformers-5
    ``rope_parameters`` / ``dtype`` keys mapped back to ``rope_theta`` / ``rope_scaling`` / ``torch_dtype``."""
    cfg = copy.deepcopy(config)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    assert isinstance(text, dict)
    model_type = str(text.get("model_type") or cfg.get("model_type", ""))
    if model_type.startswith("gemma3"):
        text.setdefault("model_type", "gemma3_text")
        for key, value in GEMMA3_TEXT_DEFAULTS.items():
            if text.get(key) is None and not (key == "sliding_window_pattern" and "layer_types" in text):
                text[key] = value
    rope = text.get("rope_parameters")
    if isinstance(rope, dict):
        glob = rope.get("full_attention", rope) if model_type.startswith("gemma3") else rope
        if isinstance(glob, dict) and "rope_theta" in glob:
            text["rope_theta"] = glob["rope_theta"]
            if glob.get("rope_type", "default") != "default":
                text["rope_scaling"] = {k: v for k, v in glob.items() if k != "rope_theta"}
        loc = rope.get("sliding_attention")
        if isinstance(loc, dict) and "rope_theta" in loc:
            text["rope_local_base_freq"] = loc["rope_theta"]
    for d in (cfg, text):
        if "torch_dtype" not in d and isinstance(d.get("dtype"), str):
            d["torch_dtype"] = d["dtype"]
    return cfg


def spec_from_checkpoint(path: str | Path, dtype: str | None = None) -> ModelSpec:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint {path}: config.json is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {cfg_path}: not valid JSON ({exc})") from exc
    try:
        return ModelSpec.from_hf_config(normalize_hf_config(config), name=path.name, dtype=dtype)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {cfg_path}: required field {exc} is missing") from exc


# ----- safetensors files -------------------------------------------------------------
def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header (no tensor data read); checks offsets against the file size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path.name}: header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({exc})") from exc
    out: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry = TensorEntry(name, path, str(info["dtype"]), tuple(int(s) for s in info["shape"]))
        start, end = (int(o) for o in info["data_offsets"])
        if end - start != entry.numel * ALL_DTYPE_BYTES.get(entry.dtype, 0) and entry.dtype in ALL_DTYPE_BYTES:
            raise CheckpointError(f"{path.name}: {name}: data size {end - start} B does not match its "
                                  f"shape {entry.shape} and dtype {entry.dtype}")
        data_end = max(data_end, end)
        out[name] = entry
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path.name}: truncated: header promises {8 + n + data_end} B, file has {size} B")
    return out


def weight_files(path: Path) -> tuple[dict[str, str] | None, list[Path]]:
    """(index weight_map or None, weight files). Raises when no safetensors weights exist."""
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({exc})") from exc
        return weight_map, [path / f for f in sorted(set(weight_map.values()))]
    if (path / "model.safetensors").is_file():
        return None, [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return None, files
    hint = " (pickle .bin weights are not loaded; convert them to safetensors)" if any(
        path.glob("*.bin")) else ""
    raise CheckpointError(f"checkpoint {path}: no safetensors weights found{hint}")


def scan_checkpoint(path: str | Path, dtype: str | None = None) -> tuple[ModelSpec, dict[str, TensorEntry]]:
    """Validate config and every header against the spec; all problems in one ``CheckpointError``.
    Returns the spec and canonical HF name -> stored entry."""
    path = Path(path)
    spec = spec_from_checkpoint(path, dtype)
    weight_map, files = weight_files(path)
    problems: list[str] = []
    headers: dict[Path, dict[str, TensorEntry]] = {}
    for f in files:
        if not f.is_file():
            problems.append(f"{f.name}: shard named in model.safetensors.index.json is missing")
            continue
        try:
            headers[f] = read_header(f)
        except CheckpointError as exc:
            problems.append(str(exc))
    not_stored: set[str] = set()
    if weight_map is not None:
        for name, fname in weight_map.items():
            h = headers.get(path / fname)
            if h is None or name not in h:
                not_stored.add(canonical_name(name) or name)
            if h is not None and name not in h:
                problems.append(f"{name}: listed in the index under {fname} but not stored there")
    found: dict[str, TensorEntry] = {}
    for header in headers.values():
        for entry in header.values():
            canon = canonical_name(entry.name)
            if canon is None:
                continue
            if canon in found:
                problems.append(f"{canon}: stored twice ({found[canon].file.name} and {entry.file.name})")
            found[canon] = entry
    expected = expected_tensors(spec)
    for name, shape in expected.items():
        got = found.get(name)
        if got is None:
            if name not in not_stored:
                problems.append(f"{name}: missing (expected shape {shape})")
        elif got.shape != shape:
            problems.append(f"{name}: expected shape {shape}, found {got.shape}")
        elif got.dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: dtype {got.dtype} is not a floating type")
    for name, entry in found.items():
        tied_head = name == "lm_head.weight" and spec.tie_embeddings and entry.shape == (spec.vocab_size,
                                                                                          spec.hidden_size)
        if name not in expected and not tied_head:
            problems.append(f"{name}: unexpected tensor (shape {entry.shape}) for a {spec.family} model "
                            f"with {spec.num_layers} layers")
    if problems:
        raise CheckpointError(f"checkpoint {path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return spec, {n: found[n] for n in expected}


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                    dtype: str | torch.dtype | None = None) -> tuple[Transformer, ModelSpec]:
    """Validate every header first, then allocate the model on ``device`` and copy tensor by tensor."""
    from safetensors import safe_open

    dt = dtype if dtype is None or isinstance(dtype, str) else {v: k for k, v in DTYPES.items()}.get(dtype)
    if dtype is not None and dt is None:
        raise ConfigError(f"load_checkpoint: unsupported dtype {dtype}")
    spec, entries = scan_checkpoint(path, dt)
    model = build_model(spec, device, to_torch_dtype(spec.dtype), init=False)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name, entry in entries.items():
        by_file.setdefault(entry.file, []).append((name, entry))
    with torch.no_grad():
        for file, items in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name, entry in items:
                    params[param_name(name)].copy_(f.get_tensor(entry.name))
    return model, spec


def checkpoint_fill(path: str | Path, dtype: str | None = None) -> tuple[ModelSpec, Any]:
    """(spec, fill) for a model built on the meta device: ``fill(param_name, meta_param)`` reads that one
    tensor from the checkpoint (validated like ``load_checkpoint``) in the parameter's dtype, so a
    streamer can materialise the model tensor by tensor (``wicore.runtime.offload``'s ``Fill``) without
    the whole model ever being in host memory."""
    from safetensors import safe_open

    spec, entries = scan_checkpoint(path, dtype)
    by_param = {param_name(name): entry for name, entry in entries.items()}

    def fill(name: str, p: torch.Tensor) -> torch.Tensor:
        entry = by_param.get(name)
        if entry is None:
            raise CheckpointError(f"checkpoint {path}: no tensor for parameter {name}")
        with safe_open(str(entry.file), framework="pt", device="cpu") as f:
            return f.get_tensor(entry.name).to(p.dtype)

    return spec, fill


# ----- random checkpoint writer -------------------------------------------------------
def _random_chunks(shape: tuple[int, ...], dtype: torch.dtype, std: float, base: float,
                   gen: torch.Generator, chunk_elems: int = 1 << 24) -> Iterator[bytes | memoryview]:
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    step = max(1, chunk_elems // max(cols, 1))
    for r in range(0, rows, step):
        n = min(step, rows - r)
        t = (torch.randn((n, cols), generator=gen) * std + base).to(dtype)
        yield t.contiguous().view(torch.uint8).numpy().data


def _write_file(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str,
                make: Any) -> None:
    item = FLOAT_DTYPES[SAFETENSORS_DTYPES[dtype]]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = item
        for s in shape:
            nbytes *= s
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            for chunk in make(name, shape):
                f.write(chunk)


def write_random_checkpoint(spec: ModelSpec, out_dir: str | Path, dtype: str = "bf16", seed: int = 0,
                            max_shard_bytes: int | None = None, std: float = 0.02) -> Path:
    """Write a random checkpoint in HF layout, streaming tensor by tensor (memory ~64 MB chunks).

    Matrices ~ N(0, std); norm weights ~ N(0, std) around their identity (Gemma 0, Llama 1).
    Values depend only on (seed, tensor name), not on sharding.
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ConfigError(f"write_random_checkpoint: dtype '{dtype}' unknown, use one of {sorted(SAFETENSORS_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tdt = to_torch_dtype(dtype)
    order = list(expected_tensors(spec).items())
    names = [n for n, _ in order]
    item = FLOAT_DTYPES[SAFETENSORS_DTYPES[dtype]]

    def make(name: str, shape: tuple[int, ...]) -> Iterator[bytes | memoryview]:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + names.index(name)) % (1 << 62))
        base = 1.0 if spec.family != "gemma3" and name.endswith("norm.weight") else 0.0
        return _random_chunks(shape, tdt, std, base, gen)

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in order:
        nbytes = item * int(torch.Size(shape).numel())
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if max_shard_bytes is None:
        _write_file(out / "model.safetensors", shards[0], dtype, make)
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_file(out / fname, shard, dtype, make)
            for name, shape in shard:
                weight_map[name] = fname
                total += item * int(torch.Size(shape).numel())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_configs(spec, out, dtype)
    return out


def _write_configs(spec: ModelSpec, out: Path, dtype: str) -> None:
    config = hf_config(spec, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen_cfg = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
               "pad_token_id": config.get("pad_token_id", config["eos_token_id"]), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")


def write_model_checkpoint(model: Transformer, out_dir: str | Path, dtype: str = "bf16") -> Path:
    """Write a model's weights (cast to ``dtype``) in HF layout: ``config.json`` (from ``model.spec``
    with ``torch_dtype`` = dtype), ``generation_config.json`` and one ``model.safetensors``."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ConfigError(f"write_model_checkpoint: dtype '{dtype}' unknown, use one of {sorted(SAFETENSORS_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tdt = to_torch_dtype(dtype)
    params = dict(model.named_parameters())

    def make(name: str, shape: tuple[int, ...]) -> Iterator[bytes | memoryview]:
        t = params[param_name(name)].detach()
        if tuple(t.shape) != shape:
            raise CheckpointError(f"write_model_checkpoint: {name} has shape {tuple(t.shape)}, spec says {shape}")
        yield t.to(device="cpu", dtype=tdt).contiguous().view(torch.uint8).numpy().data

    for old in out.glob("model*.safetensors*"):
        old.unlink()
    _write_file(out / "model.safetensors", list(expected_tensors(model.spec).items()), dtype, make)
    _write_configs(model.spec, out, dtype)
    return out


# ----- CLI -------------------------------------------------------------------------------
def load_spec_file(path: str | Path) -> ModelSpec:
    """A ``conf/model/*.yaml`` file or a checkpoint directory / config.json. ``dtype: auto`` in a
    yaml file (resolved per GPU elsewhere) becomes bf16, the published checkpoints' dtype."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        return spec_from_checkpoint(p if p.is_dir() else p.parent)
    import yaml

    data = dict(yaml.safe_load(p.read_text()))
    if data.get("dtype") == "auto":
        data["dtype"] = "bf16"
    return ModelSpec.from_config(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wicore.model.checkpoint")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="write a random checkpoint in Hugging Face layout")
    c.add_argument("--spec", required=True, help="conf/model/*.yaml (or a checkpoint dir)")
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", default="bf16", choices=sorted(SAFETENSORS_DTYPES))
    c.add_argument("--shard-mb", type=float, default=None, help="max shard size in MB (1e6 B)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--std", type=float, default=0.02)
    args = parser.parse_args(argv)
    try:
        spec = load_spec_file(args.spec)
        shard = int(args.shard_mb * 1e6) if args.shard_mb else None
        out = write_random_checkpoint(spec, args.out, args.dtype, args.seed, shard, args.std)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {spec.name} ({spec.total_params / 1e6:.1f} M params, {args.dtype}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
