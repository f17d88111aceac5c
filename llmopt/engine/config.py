"""Model configuration: one small dataclass, built from a Hugging Face config.

Covers the Llama / Qwen2 / Mistral family: RMSNorm, RoPE (default, linear, dynamic-NTK, llama3, yarn
scaling), grouped-query attention, SwiGLU MLP, optional q/k/v bias (Qwen2), tied embeddings and Mistral's
sliding-window attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # Mistral: each query sees only the last `sliding_window` keys

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, f, kv = self.hidden_size, self.intermediate_size, self.num_kv_heads * self.head_dim
        attn = d * self.num_heads * self.head_dim * 2 + d * kv * 2
        if self.qkv_bias:
            attn += self.num_heads * self.head_dim + 2 * kv
        per_layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        """Build from a `transformers.PretrainedConfig` (transformers 4 or 5 layout)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r}: llmopt's decoder implements "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama / Qwen2 / Mistral family)"
            )
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        # transformers 5 keeps the RoPE base and scaling in `rope_parameters`; 4.x in rope_theta/rope_scaling.
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        legacy = getattr(hf_config, "rope_scaling", None) or {}
        rope = {**legacy, **rope}
        theta = rope.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        rope["rope_type"] = rope_type
        rope.pop("type", None)
        if model_type == "qwen2" and getattr(hf_config, "use_sliding_window", False):
            raise UnsupportedModelError("Qwen2 with use_sliding_window=True (a window on some layers only) is not "
                                        "implemented; llmopt runs Qwen2 checkpoints with full attention")
        window = getattr(hf_config, "sliding_window", None) if model_type == "mistral" else None
        eos = getattr(hf_config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf_config.max_position_embeddings,
            rms_norm_eps=hf_config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=rope,
            qkv_bias=bool(getattr(hf_config, "attention_bias", False)) or model_type == "qwen2",
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            model_type=model_type,
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            eos_token_ids=eos_ids,
            sliding_window=int(window) if window else None,
        )


def truncated_hf_config(hf_config, num_layers: int):
    """A copy of a transformers config for the model's first `num_layers` blocks, its per-layer lists
    (`layer_types`, Qwen2's `max_window_layers`) cut to match, as transformers 5's validation requires."""
    import copy

    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:num_layers]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, num_layers)
    return config
