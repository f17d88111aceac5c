"""Memory read bandwidth, and the decode speed it allows (the roofline of batch-1 decoding).

At batch 1 each decode step reads every weight once and does ~2 flops per weight, so on a CPU it is bound by
how fast memory can be read: tokens/s <= bandwidth / bytes read per token. The probe reads a buffer much larger
than the caches with every thread, in two ways, and keeps the best pass of either: a PyTorch `sum` (little
arithmetic) and, where our CPU kernels run, the very GEMV decode uses (one activation row against a weight
matrix the size of the buffer), because that is how decode reads weights and a probe slower than decode would
put decode above its own roof. A measured decode speed that still implies more bandwidth than the probe found
raises the roof to what decode proved (`roof`), and the row says so: no fraction of the limit exceeds 1.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from ..engine import cpu_kernels
from ..hardware import synchronize


@dataclass
class Bandwidth:
    best_bytes_per_s: float
    median_bytes_per_s: float
    probe_bytes: int
    threads: int
    method: str = "torch sum"  # the probe whose best pass is `best_bytes_per_s`
    by_method: dict = field(default_factory=dict)  # best bytes/s of each probe

    def as_dict(self) -> dict:
        return {"read_bandwidth_best_GB_per_s": self.best_bytes_per_s / 1e9,
                "read_bandwidth_median_GB_per_s": self.median_bytes_per_s / 1e9,
                "read_bandwidth_probe": self.method, "probe_bytes": self.probe_bytes, "threads": self.threads}


def _passes(read, nbytes: int, repeats: int, device) -> list[float]:
    rates = []
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        read()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if i:  # the first pass warms up (page faults, caches)
            rates.append(nbytes / elapsed)
    return rates


def read_bandwidth(probe_bytes: int = 256 * 2**20, repeats: int = 7, device="cpu") -> Bandwidth:
    """Bytes per second read from a `probe_bytes` fp32 buffer: best and median pass of the fastest probe."""
    data = torch.ones(probe_bytes // 4, dtype=torch.float32, device=device)
    nbytes = data.numel() * 4
    probes = {"torch sum": _passes(lambda: data.sum().item(), nbytes, repeats, device)}
    if cpu_kernels.runs_on(device):
        k = 4096
        weight = data[: data.numel() // k * k].view(-1, k)
        x = torch.ones(1, k)
        probes["llmopt gemv (the decode kernel)"] = _passes(lambda: cpu_kernels.gemv(x, weight), weight.numel() * 4,
                                                            repeats, device)
    method = max(probes, key=lambda name: max(probes[name]))
    rates = probes[method]
    return Bandwidth(max(rates), statistics.median(rates), nbytes, torch.get_num_threads(), method,
                     {name: max(r) for name, r in probes.items()})


def decode_limit_tokens_per_s(bytes_per_token: int, bandwidth_bytes_per_s: float) -> float:
    """The batch-1 decode speed at which reading the weights alone would take all the time."""
    return bandwidth_bytes_per_s / bytes_per_token


def roof(probe_bytes_per_s: float, bytes_per_token, tokens_per_s) -> tuple[float, str]:
    """The bandwidth roof: the probe's, or the bandwidth a measured decode row proves if that is higher (a
    probe can only under-read the machine). Returns (bytes/s, where it came from)."""
    implied = [b * t for b, t in zip(bytes_per_token, tokens_per_s) if b and t and t == t]
    best = max(implied, default=0.0)
    if best > probe_bytes_per_s:
        return best, (f"raised to what measured decode proves ({best / 1e9:.1f} GB/s; the probe read "
                      f"{probe_bytes_per_s / 1e9:.1f} GB/s)")
    return probe_bytes_per_s, "probe"
