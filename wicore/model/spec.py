"""ModelSpec: the architecture numbers the cost model, the memory manager and
the torch runtime share. Built from ``conf/model/*.yaml`` or from a Hugging Face
``config.json`` (Gemma-3 text / multimodal configs and Llama configs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wicore.errors import ConfigError

DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "gemma3" | "llama"
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int  # tokens (max_position_embeddings)
    sliding_window: int = 0  # tokens seen by local layers; 0 = no local layers
    sliding_window_pattern: int = 0  # every Nth layer is global (Gemma-3: 6 -> 5 local : 1 global)
    rope_theta: float = 10000.0  # RoPE base of global layers
    rope_local_base: float = 10000.0  # RoPE base of local (sliding-window) layers
    tie_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 0.0  # Gemma-3 attention scale 1/sqrt(q); 0 = head_dim
    dtype: str = "bf16"  # storage / compute dtype of the weights
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                     "num_kv_heads", "head_dim", "vocab_size", "max_context"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads: {self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.sliding_window < 0:
            raise ConfigError(f"model.sliding_window: must be >= 0, got {self.sliding_window}")
        if self.sliding_window > self.max_context:
            raise ConfigError(
                f"model.sliding_window: {self.sliding_window} is larger than the context "
                f"max_context={self.max_context}; lower the window or raise the context")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"model.dtype: unknown '{self.dtype}', use one of {sorted(DTYPE_BYTES)}")
        if self.family not in ("gemma3", "llama"):
            raise ConfigError(f"model.family: unknown '{self.family}', use 'gemma3' or 'llama'")

    # ----- layer structure -------------------------------------------------
    def is_global(self, layer: int) -> bool:
        """Gemma-3: layer i is global when (i + 1) % pattern == 0; Llama: all global."""
        if self.sliding_window <= 0 or self.sliding_window_pattern <= 0:
            return True
        return (layer + 1) % self.sliding_window_pattern == 0

    @property
    def num_global_layers(self) -> int:
        return sum(1 for i in range(self.num_layers) if self.is_global(i))

    @property
    def num_local_layers(self) -> int:
        return self.num_layers - self.num_global_layers

    # ----- sizes -------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_params_per_layer(self) -> int:
        h = self.hidden_size
        params = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.family == "gemma3":
            params += 2 * self.head_dim  # q_norm, k_norm
        return params

    @property
    def mlp_params_per_layer(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def norm_params_per_layer(self) -> int:
        return (4 if self.family == "gemma3" else 2) * self.hidden_size

    @property
    def params_per_layer(self) -> int:
        return self.attn_params_per_layer + self.mlp_params_per_layer + self.norm_params_per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        return (self.num_layers * self.params_per_layer + self.embedding_params
                + self.lm_head_params + self.hidden_size)

    @property
    def bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def layer_bytes(self) -> int:
        return int(self.params_per_layer * self.bytes_per_param)

    @property
    def embedding_bytes(self) -> int:
        """Embedding table + untied LM head + final norm, in the weight dtype."""
        return int((self.embedding_params + self.lm_head_params + self.hidden_size) * self.bytes_per_param)

    @property
    def weight_bytes(self) -> int:
        return self.num_layers * self.layer_bytes + self.embedding_bytes

    def kv_bytes_per_token_layer(self, kv_dtype_bytes: float | None = None) -> float:
        b = self.bytes_per_param if kv_dtype_bytes is None else kv_dtype_bytes
        return 2 * self.kv_dim * b

    def kv_bytes_per_token(self, kv_dtype_bytes: float | None = None) -> float:
        """K and V of one token in every layer (local layers included: the
        page pool allocates full pages for them, as a paged allocator does)."""
        return self.num_layers * self.kv_bytes_per_token_layer(kv_dtype_bytes)

    def attended(self, layer_is_global: bool, position: int) -> int:
        """How many keys a query at 0-based ``position`` attends to."""
        n = position + 1
        if layer_is_global or self.sliding_window <= 0:
            return n
        return min(n, self.sliding_window)

    def with_dtype(self, dtype: str) -> ModelSpec:
        from dataclasses import replace
        return replace(self, dtype=dtype)

    # ----- construction ----------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        known = set(cls.__dataclass_fields__)
        data = {k: v for k, v in cfg.items() if k != "_target_"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, name: str | None = None,
                       dtype: str | None = None) -> ModelSpec:
        """Build from a Hugging Face ``config.json`` (dict or path to file/dir)."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.exists():
                raise ConfigError(f"checkpoint: no config.json at {path}")
            config = json.loads(path.read_text())
        assert isinstance(config, dict)
        text = config.get("text_config", config)  # Gemma3ForConditionalGeneration nests it
        model_type = str(text.get("model_type", config.get("model_type", "")))
        if model_type.startswith("gemma3"):
            family = "gemma3"
        elif model_type == "llama":
            family = "llama"
        else:
            raise ConfigError(f"config.json: model_type '{model_type}' is not supported "
                              "(supported: gemma3, gemma3_text, llama)")
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or hidden // heads)
        torch_dtype = str(text.get("torch_dtype", config.get("torch_dtype", "bfloat16")))
        dt = dtype or {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(torch_dtype, "bf16")
        if family == "gemma3":
            pattern = int(text.get("sliding_window_pattern") or 0)
            if not pattern and "layer_types" in text:
                types = text["layer_types"]
                pattern = types.index("full_attention") + 1 if "full_attention" in types else 0
            pattern = pattern or 6
            window = int(text.get("sliding_window") or 0)
            rope_local = float(text.get("rope_local_base_freq", 10000.0))
            qpas = float(text.get("query_pre_attn_scalar", head_dim))
            tie = bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", True)))
        else:
            pattern, window, qpas = 0, 0, 0.0
            rope_local = float(text.get("rope_theta", 10000.0))
            tie = bool(text.get("tie_word_embeddings", False))
        return cls(
            name=name or str(text.get("_name_or_path") or model_type),
            family=family,
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(text["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=head_dim,
            vocab_size=int(text["vocab_size"]),
            max_context=int(text.get("max_position_embeddings", 8192)),
            sliding_window=window,
            sliding_window_pattern=pattern,
            rope_theta=float(text.get("rope_theta", 10000.0)),
            rope_local_base=rope_local,
            tie_embeddings=tie,
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=qpas,
            dtype=dt,
            extra={"rope_scaling": text.get("rope_scaling")} if text.get("rope_scaling") else {},
        )
