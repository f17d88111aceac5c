"""KV caches: keep each layer's keys and values so a decode step runs one token, not the whole sequence.

- `StaticCache` (gpt-fast): per layer a buffer [B, Hkv, max_length, D] allocated once and written in place at
  the next positions; nothing is allocated while decoding.
- `DynamicCache` (transformers' / candle's): per layer a tensor that grows by concatenation as tokens arrive
  (each step copies the whole cache: simple, allocation-heavy).

Both store only the KV heads (grouped-query attention), are cleared per request with `reset()`, and can be cut
back with `crop(n)` (speculative decoding rolls back rejected tokens; a prefix cache loads a stored prefix).
The interface the model sees is one method: `update(layer_idx, k, v) -> (k_all, v_all)`.
"""
from __future__ import annotations

import torch

from ..errors import ContextLengthError, InvalidParameterError
from .config import ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, batch_size: int = 1) -> int:
    """Bytes one token adds to the cache: keys and values, every layer, only the KV heads."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element * batch_size


class StaticCache:
    """Preallocated per-layer buffers written in place by position."""

    def __init__(self, cfg: ModelConfig, max_length: int, batch_size: int = 1,
                 dtype=torch.float32, device="cpu"):
        if max_length <= 0 or batch_size <= 0:
            raise InvalidParameterError("a cache needs max_length > 0 and batch_size > 0")
        shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        self.max_length = max_length
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.lengths = [0] * cfg.num_layers
        self.bytes_per_token = kv_bytes_per_token(cfg, dtype, batch_size)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.max_length:
            raise ContextLengthError(f"KV cache full: {end} tokens do not fit its {self.max_length} positions")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    @property
    def length(self) -> int:
        """Tokens held (by the last layer, i.e. after complete forward passes)."""
        return self.lengths[-1]

    def crop(self, length: int) -> None:
        self.lengths = [min(n, length) for n in self.lengths]

    def reset(self) -> None:
        self.crop(0)

    def load(self, keys, values) -> None:
        """Start from a stored prefix (a prefix cache's hit): per layer keys/values [B, Hkv, n, D], copied in."""
        n = keys[0].shape[2]
        if len(keys) != len(self.keys) or n > self.max_length:
            raise ContextLengthError(f"a {len(keys)}-layer prefix of {n} tokens does not fit this cache")
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.keys[layer][:, :, :n] = k
            self.values[layer][:, :, :n] = v
        self.lengths = [n] * len(self.lengths)

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def used_bytes(self) -> int:
        return self.length * self.bytes_per_token


class DynamicCache:
    """Per-layer tensors grown by concatenation, one step at a time."""

    def __init__(self, cfg: ModelConfig, max_length: int | None = None, batch_size: int = 1,
                 dtype=torch.float32, device="cpu"):
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * cfg.num_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.num_layers
        self.bytes_per_token = kv_bytes_per_token(cfg, dtype, batch_size)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        if self.max_length is not None and self.keys[layer_idx].shape[2] > self.max_length:
            raise ContextLengthError(f"KV cache full: more than {self.max_length} tokens")
        return self.keys[layer_idx], self.values[layer_idx]

    @property
    def length(self) -> int:
        return 0 if self.keys[-1] is None else self.keys[-1].shape[2]

    def crop(self, length: int) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]

    def reset(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)

    def load(self, keys, values) -> None:
        """Start from a stored prefix (a prefix cache's hit): per layer keys/values [B, Hkv, n, D]."""
        if len(keys) != len(self.keys) or (self.max_length is not None and keys[0].shape[2] > self.max_length):
            raise ContextLengthError(f"a {len(keys)}-layer prefix of {keys[0].shape[2]} tokens does not fit")
        self.keys, self.values = list(keys), list(values)  # update() concatenates: never writes into them

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    @property
    def used_bytes(self) -> int:
        return self.length * self.bytes_per_token


CACHES = {"static": StaticCache, "dynamic": DynamicCache}


def make_cache(kind: str, cfg: ModelConfig, max_length: int, batch_size: int = 1, dtype=torch.float32,
               device="cpu"):
    """A fresh cache of `kind` ('static' | 'dynamic'), or None for kind 'none' (the no-cache baseline)."""
    if kind in (None, "none"):
        return None
    if kind not in CACHES:
        raise InvalidParameterError(f"unknown cache kind {kind!r}; use none, static or dynamic")
    return CACHES[kind](cfg, max_length, batch_size, dtype, device)
