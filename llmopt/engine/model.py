"""The decoder: a plain PyTorch Llama / Qwen2 / Mistral transformer (after gpt-fast's and nanoGPT's model.py).

The model's math lives here and nowhere else. Three things plug in without editing this file:
- the KV cache: any object with `update(layer_idx, k, v) -> (k_all, v_all)` passed to `forward`;
- the attention backend: `model.set_attention(name)` (see `llmopt.engine.attention`);
- the linear layers: `nn.Linear` modules that `llmopt.engine.quantization` swaps for quantized ones.

Module names follow Hugging Face's checkpoint keys (minus the leading `model.`), so a transformers state dict
loads as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError, UnsupportedModelError
from . import attention
from .config import ModelConfig

ROPE_TABLE_MAX = 65536  # positions; beyond this cos/sin are computed per call instead of tabulated


def rope_inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies and the cos/sin scale, for the scaling variants these checkpoints use."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn_inverse_frequencies(cfg, inv_freq, scaling)
    raise UnsupportedModelError(f"unsupported RoPE scaling {rope_type!r} (supported: default, linear, llama3, yarn)")


def _yarn_inverse_frequencies(cfg: ModelConfig, inv_freq: torch.Tensor, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, scale attention."""
    factor = scaling["factor"]
    dim, base = cfg.head_dim, cfg.rope_theta
    old_len = scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)
    extrapolation_weight = 1 - ramp.clamp(0, 1)
    interpolated = inv_freq / factor
    return interpolated * (1 - extrapolation_weight) + inv_freq * extrapolation_weight, attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers writes it, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] for the
    halves x1, x2, but with the minus sign moved into the table (signed_sin = [-sin, sin] by halves): the rotation
    is then one roll instead of two slices, a negation and a concatenation, and the result is bit-identical (a
    sign flip is exact in either factor)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op, the same numbers
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=False)

    def forward(self, x, cos, sin, cache, mask, attend):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.sliding_window and k.shape[2] > self.sliding_window:
            if mask is not None:  # padded or packed batches: their keys are not at positions 0 .. S-1
                raise InvalidParameterError(
                    f"sequences beyond the sliding window ({self.sliding_window} tokens) run only through the "
                    "plain decoder (batch 1); use shorter sequences or a model without a sliding window")
            mask = attention.sliding_window_mask(length, k.shape[2], self.sliding_window, x.device)[None, None]
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, mask, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        table_length = cfg.max_position_embeddings if cfg.max_position_embeddings <= ROPE_TABLE_MAX else 0
        self.register_buffer("rope_cos", torch.empty(table_length, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(table_length, cfg.head_dim), persistent=False)  # signed sin
        self.init_rope()
        self.attention_backend = "sdpa"
        self._attend = attention.get_backend(self.attention_backend)

    def init_rope(self) -> None:
        """(Re)compute RoPE frequencies and the cos/sin table (fp32, cast with the model like transformers'
        cos.to(x.dtype)). Buffers are not in checkpoints, so this runs after loading too."""
        _, self.rope_scale = rope_inverse_frequencies(self.config)
        device = self.rope_cos.device
        if self.rope_cos.shape[0]:
            cos, sin = self._rope_fp32(torch.arange(self.rope_cos.shape[0], device=device))
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.dtype), sin.to(self.rope_sin.dtype)

    def _rope_fp32(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_inverse_frequencies(self.config)[0].to(positions.device)  # fp32, as transformers does
        freqs = positions.to(torch.float32)[..., None] * inv_freq
        cos, sin = freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # sin signed for `apply_rope`

    def set_attention(self, name: str) -> "Transformer":
        """Switch the attention backend (naive | tiled | sdpa | flash_attn) for prefill and decode."""
        self._attend = attention.get_backend(name)
        self.attention_backend = name
        return self

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see `apply_rope`) for `positions` ([T] or [B, T]), shaped to broadcast over
        [B, heads, T, head_dim]."""
        if self.rope_cos.shape[0]:  # precomputed table: a lookup, nothing rebuilt per decode step
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        else:  # very long contexts: compute on the fly instead of holding a huge table
            cos, sin = self._rope_fp32(positions)
        if positions.dim() == 2:  # per-row positions: [B, 1, T, D]
            cos, sin = cos[:, None], sin[:, None]
        return cos.to(dtype), sin.to(dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache=None, mask=None,
                last_only: bool = False, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `tokens` [B, T] at `positions` ([T] shared or [B, T] per row).

        cache: a KV cache (`llmopt.engine.kv_cache`) or None (every call sees the whole sequence).
        mask: None for causal attention aligned to the newest key, or a bool [B, 1, T, S] (True = attend).
        last_only: project only the last position to the vocabulary (what generation needs).
        logits_at: project only these indices along T ([N]; several prompts packed in one row end at several
        places), giving [B, N, V].
        """
        x = self.embed_tokens(tokens)
        if x.dtype != self.activation_dtype:  # bf16 embeddings under fp32 activations (16-bit weights only)
            x = x.to(self.activation_dtype)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, mask, self._attend)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]
        return self.lm_head(self.norm(x))

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype activations and the KV cache take: the norms' (16-bit weights may sit under fp32)."""
        return self.norm.weight.dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes held by parameters and buffers (tied weights counted once), as stored (quantized or not);
        the RoPE tables are not weights and are left out."""
        seen, total = set(), 0
        buffers = [b for name, b in self.named_buffers() if not name.startswith("rope_")]
        for t in list(self.parameters()) + buffers:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total
