"""What machine this is (CPU name, instruction-set flags) and the few device helpers every layer needs."""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch

CONTENDED_FRACTION = 0.5  # CPU/wall below this share of the threads: the run did not get its cores


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo_field("flags") or "").split())


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def synchronize(device: str | torch.device = "cpu") -> None:
    """Wait for queued device work, so a timer around it measures the work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def contended(cpu_wall_ratio: float, threads: int) -> bool:
    """A timed span whose CPU/wall ratio is far below its thread count waited for cores it did not get."""
    return threads > 1 and cpu_wall_ratio < CONTENDED_FRACTION * threads
