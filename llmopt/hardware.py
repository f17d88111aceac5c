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


ISA_LEVELS = (  # (name, flags it needs), highest first
    ("AMX (BF16/INT8 tiles) + AVX-512", ("amx_tile", "amx_bf16", "amx_int8", "avx512f")),
    ("AVX-512 (F/BW/VL/VNNI/BF16)", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")),
    ("AVX-512 (F/BW/VL/VNNI)", ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    ("AVX-512 (F/BW/VL)", ("avx512f", "avx512bw", "avx512vl")),
    ("AVX2 + FMA", ("avx2", "fma")),
)


def isa_level(flags: frozenset[str] | None = None) -> str:
    """The highest vector ISA level this CPU offers, named as kernels are chosen by it."""
    flags = cpu_flags() if flags is None else flags
    for name, needed in ISA_LEVELS:
        if all(f in flags for f in needed):
            return name
    return platform.machine() or "unknown"


@lru_cache(maxsize=1)
def l3_cache_bytes() -> int | None:
    """The last-level (L3) cache size in bytes as the OS reports it for CPU 0, or None."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
