"""What a result was measured on: hardware, threads, library versions, git revision."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: leave torch's default). Returns the number in force."""
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def git_revision() -> str:
    """Short commit of the working tree, with '+dirty' when it has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def environment(device: str | torch.device = "cpu") -> dict:
    """One flat dict describing the run, attached to every result row."""
    import transformers

    from . import cpu_kernels

    flags = cpu_flags()
    return {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_amx": "amx_bf16" in flags,
        "cpu_avx512": "avx512f" in flags,
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": "llmopt AVX2 gemv" if cpu_kernels.available() else f"torch ({cpu_kernels.unavailable_reason()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_revision": git_revision(),
    }
