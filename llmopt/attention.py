"""Attention backends: one signature, chosen by name, used by the model for prefill and decode.

`attend(q, k, v, mask)` with q [B, H, T, D], k/v [B, Hkv, S, D] (S >= T: cached keys come first; grouped-query
attention when Hkv < H) and mask None (causal, aligned so the last query sees every key) or a bool tensor
broadcastable to [B, H, T, S] (True = attend). Returns [B, H, T, D].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InvalidParameterError


def causal_mask(query_length: int, key_length: int, device=None) -> torch.Tensor:
    """Bool [T, S]: query i (at absolute position S - T + i) sees keys 0 .. S - T + i."""
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(key_length - query_length)


def _expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    groups = num_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def naive(q, k, v, mask=None):
    """The textbook attention: materialize the [T, S] score matrix, softmax, then weight the values."""
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    t, s = q.shape[-2], k.shape[-2]
    if mask is None and t > 1:
        mask = causal_mask(t, s, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v


def sdpa(q, k, v, mask=None):
    """PyTorch's fused `scaled_dot_product_attention` (flash kernel on CPU and CUDA where it applies)."""
    t, s = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        if t == 1 or t == s:  # decode sees every key; prefill without cache is plain causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        mask = causal_mask(t, s, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


BACKENDS = {"naive": naive, "sdpa": sdpa}


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise InvalidParameterError(
            f"unknown attention backend {name!r}; available: {', '.join(sorted(BACKENDS))}"
        ) from None
