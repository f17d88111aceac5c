"""How fast this machine reads memory, and what that allows a decoder at batch 1.

Decoding one token at batch 1 reads every weight once (plus the KV cache), so
`bandwidth_limit_tokens_per_s = read_bandwidth / bytes_read_per_token` bounds any implementation
(gpt-fast states its results as a fraction of this bound).
"""
from __future__ import annotations

import statistics
import time

import torch


def read_bandwidth_bytes_per_s(size_bytes: int = 512 * 2**20, repeats: int = 7, device="cpu") -> float:
    """Median read bandwidth of a reduction over a `size_bytes` fp32 buffer (larger than any cache)."""
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    buffer.sum()  # touch every page before timing
    times = []
    for _ in range(repeats):
        if buffer.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        buffer.sum()
        if buffer.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return size_bytes / statistics.median(times)


def decode_bytes_per_token(weight_bytes: int, cache_bytes_per_token: int = 0, context_tokens: int = 0) -> int:
    """Bytes a batch-1 decode step reads: all weights once, plus the KV cache of the context so far."""
    return weight_bytes + cache_bytes_per_token * context_tokens


def bandwidth_limit_tokens_per_s(bandwidth_bytes_per_s: float, bytes_per_token: int) -> float:
    return bandwidth_bytes_per_s / bytes_per_token
