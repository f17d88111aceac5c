"""Attention backends: one signature, chosen by name, used by the model for prefill and decode.

`attend(q, k, v, mask)` with q [B, H, T, D], k/v [B, Hkv, S, D] (S >= T: cached keys come first; grouped-query
attention when Hkv < H) and mask None (causal, aligned so the last query sees every key) or a bool tensor
broadcastable to [B, H, T, S] (True = attend). Returns [B, H, T, D].

- `naive`: the textbook formula; materializes the [T, S] scores (the design document's "standard" attention).
- `tiled`: FlashAttention's algorithm (Dao et al. 2022, loop order of FlashAttention-2) written in plain
  PyTorch: blocks of queries against blocks of keys with an online softmax, so no [T, S] matrix ever exists.
  It is the readable reference for what the fused kernels do, not a fast kernel.
- `sdpa`: PyTorch's `scaled_dot_product_attention`, which dispatches to a fused kernel (flash on CPU and CUDA,
  memory-efficient or cuDNN on CUDA, or the unfused "math" fallback); `sdpa_kernel_used` records which ran.
- `flash_attn`: the `flash-attn` package (CUDA, fp16/bf16 only), when it is installed.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError

DEFAULT_BLOCK_QUERIES = 256
DEFAULT_BLOCK_KEYS = 512


def causal_mask(query_length: int, key_length: int, device=None) -> torch.Tensor:
    """Bool [T, S]: query i (at absolute position S - T + i) sees keys 0 .. S - T + i."""
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(key_length - query_length)


def sliding_window_mask(query_length: int, key_length: int, window: int, device=None) -> torch.Tensor:
    """Bool [T, S]: `causal_mask` where query i (at position S - T + i) also sees only keys within `window`
    positions of it (Mistral: position - key < window)."""
    query = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    key = torch.arange(key_length, device=device)[None, :]
    return (key <= query) & (query - key < window)


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
    """PyTorch's fused `scaled_dot_product_attention` (flash kernel on CPU and CUDA where it applies).

    GQA goes through `enable_gqa=True` (no K/V copy); with PyTorch 2.13 this keeps the CPU flash kernel, which
    `sdpa_kernel_used` confirms. A cache offset in prefill (T < S, T > 1) needs bottom-right causal alignment,
    which `is_causal` does not give (it aligns top-left), so that case passes an explicit [T, S] mask."""
    t, s = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    if mask is None:
        if t == 1 or t == s:  # decode sees every key; prefill without cache is plain causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        mask = causal_mask(t, s, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _mask_block(mask: torch.Tensor, q0: int, q1: int, k0: int, k1: int, kv_heads: int, groups: int):
    """Block [q0:q1, k0:k1] of a bool mask broadcastable to [B, H, T, S], shaped to broadcast against the
    grouped scores [B, Hkv, groups, q1 - q0, k1 - k0] (dimensions of size 1 stay broadcast, nothing is copied)."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    rows = slice(q0, q1) if mask.shape[2] > 1 else slice(None)
    cols = slice(k0, k1) if mask.shape[3] > 1 else slice(None)
    block = mask[:, :, rows, cols]
    return block.unsqueeze(2) if block.shape[1] == 1 else block.unflatten(1, (kv_heads, groups))


def tiled(q, k, v, mask=None, block_queries: int = DEFAULT_BLOCK_QUERIES, block_keys: int = DEFAULT_BLOCK_KEYS):
    """FlashAttention's algorithm in plain PyTorch: never builds the [T, S] score matrix.

    For each block of queries, walk the key/value blocks keeping three running quantities per query row:
    the largest score seen (`row_max`), the softmax denominator relative to it (`row_sum`) and the weighted sum
    of values relative to it (`acc`). A new block may raise the maximum; the old sums are then rescaled by
    exp(old_max - new_max) so that every term ends up relative to the final maximum (the "online softmax",
    Milakov & Gimelshein 2018). The output is acc / row_sum. Peak extra memory is one score block
    [B, H, block_queries, block_keys], whatever the context length.

    Causal (mask None) is aligned bottom-right as in `naive`: query i sits at absolute position S - T + i. Key
    blocks entirely in the future of a query block are skipped (half the work of a causal prefill); blocks
    that straddle the diagonal get a mask built for that block only. Grouped-query attention shares each K/V
    head among its group of query heads by broadcasting, without copying K/V. Accumulates in fp32.
    """
    batch, heads, query_length, head_dim = q.shape
    kv_heads, key_length = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim)
    offset = key_length - query_length  # absolute position of query 0 (cached keys come first)
    causal = mask is None
    q_grouped = q.unflatten(1, (kv_heads, groups))  # [B, Hkv, G, T, D]: query head h uses KV head h // G
    k_shared, v_shared = k.unsqueeze(2), v.unsqueeze(2)  # [B, Hkv, 1, S, D], broadcast over the group
    out = torch.empty_like(q_grouped)
    for q0 in range(0, query_length, block_queries):
        q1 = min(q0 + block_queries, query_length)
        q_block = q_grouped[..., q0:q1, :]
        row_positions = torch.arange(offset + q0, offset + q1, device=q.device)[:, None]
        row_max = torch.full((*q_block.shape[:-1], 1), float("-inf"), dtype=torch.float32, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(q_block.shape, dtype=torch.float32, device=q.device)
        key_end = min(key_length, offset + q1) if causal else key_length  # later keys: every row's future
        for k0 in range(0, key_end, block_keys):
            k1 = min(k0 + block_keys, key_end)
            scores = (q_block @ k_shared[..., k0:k1, :].transpose(-2, -1)).float() * scale
            if causal and k1 - 1 > offset + q0:  # the block crosses the diagonal of this query block
                key_positions = torch.arange(k0, k1, device=q.device)
                scores = scores.masked_fill(key_positions > row_positions, float("-inf"))
            elif not causal:
                scores = scores.masked_fill(~_mask_block(mask, q0, q1, k0, k1, kv_heads, groups), float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows that have seen no key yet
            weights = torch.exp(scores - shift)
            rescale = torch.exp(row_max - shift)  # how far the old maximum was below the new one
            row_sum = row_sum * rescale + weights.sum(dim=-1, keepdim=True)
            acc = acc * rescale + (weights.to(v.dtype) @ v_shared[..., k0:k1, :]).float()
            row_max = new_max
        out[..., q0:q1, :] = (acc / row_sum).to(q.dtype)  # a row that saw no key: 0/0 = nan, as in naive
    return out.flatten(1, 2)


SDPA_KERNELS = {  # the aten op that scaled_dot_product_attention dispatched to -> a readable name
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "flash (CUDA)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient (CUDA)",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN (CUDA)",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (device override)",
    "aten::_scaled_dot_product_attention_math": "math (unfused)",
}


def sdpa_kernel_used(q, k, v, mask=None) -> str:
    """The aten op `sdpa(q, k, v, mask)` actually runs here (a key of `SDPA_KERNELS`), found by running it once
    under torch.profiler; 'unknown' if none of the known ops appears."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        sdpa(q, k, v, mask)
    names = {event.name for event in prof.events()}
    found = [op for op in SDPA_KERNELS if op in names]
    return found[0] if found else "unknown"


def _flash_attn_unavailable() -> str | None:
    """Why the flash-attn package cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "flash_attn needs a CUDA GPU (the flash-attn package has no CPU kernel)"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn needs the flash-attn package: pip install flash-attn --no-build-isolation"
    return None


def flash_attn(q, k, v, mask=None):
    """The `flash-attn` package's kernel (Dao 2023): CUDA, fp16/bf16, GQA native, causal aligned bottom-right
    (flash-attn >= 2.1; older versions align top-left).

    flash-attn takes no arbitrary mask: calls with an explicit mask (padded batches) go to `sdpa` instead."""
    if mask is not None:
        return sdpa(q, k, v, mask)
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise InvalidParameterError(
            f"flash_attn runs on CUDA in fp16/bf16 only (got {q.dtype} on {q.device}); load the model with "
            "dtype='bf16' or 'fp16' on device='cuda'")
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=q.shape[2] > 1)
    return out.transpose(1, 2)


BACKENDS = {"naive": naive, "tiled": tiled, "sdpa": sdpa, "flash_attn": flash_attn}


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run in this environment, or None when it can."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}"
    return _flash_attn_unavailable() if name == "flash_attn" else None


def available_backends() -> list[str]:
    """The backends that can run in this environment, in the order naive, tiled, sdpa, flash_attn."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def get_backend(name: str):
    reason = unavailable_reason(name)
    if reason is not None:
        raise InvalidParameterError(reason)
    return BACKENDS[name]
