"""Memory read bandwidth, and the decode speed it allows (the roofline of batch-1 decoding).

At batch 1 each decode step reads every weight once and does ~2 flops per weight, so on a CPU it is bound by
how fast memory can be read: tokens/s <= bandwidth / bytes read per token. The probe sums a tensor much larger
than the caches (each element read once, almost no arithmetic) and reports the best of several repeats, as
STREAM-like benchmarks do; on a shared machine the median is reported beside it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Bandwidth:
    best_bytes_per_s: float
    median_bytes_per_s: float
    probe_bytes: int
    threads: int

    def as_dict(self) -> dict:
        return {"read_bandwidth_best_GB_per_s": self.best_bytes_per_s / 1e9,
                "read_bandwidth_median_GB_per_s": self.median_bytes_per_s / 1e9,
                "probe_bytes": self.probe_bytes, "threads": self.threads}


def read_bandwidth(probe_bytes: int = 256 * 2**20, repeats: int = 7, device="cpu") -> Bandwidth:
    """Bytes per second a `sum` over a `probe_bytes` fp32 tensor reads (best and median of `repeats`)."""
    data = torch.ones(probe_bytes // 4, dtype=torch.float32, device=device)
    rates = []
    for i in range(repeats + 1):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        data.sum().item()
        elapsed = time.perf_counter() - start
        if i:  # the first pass warms up
            rates.append(data.numel() * 4 / elapsed)
    return Bandwidth(max(rates), statistics.median(rates), data.numel() * 4, torch.get_num_threads())


def decode_limit_tokens_per_s(bytes_per_token: int, bandwidth_bytes_per_s: float) -> float:
    """The batch-1 decode speed at which reading the weights alone would take all the time."""
    return bandwidth_bytes_per_s / bytes_per_token
