"""What a result was measured on: hardware, threads, library versions, git revision."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess

import torch
import transformers

from ..engine import cpu_kernels
from ..hardware import cpu_flags, cpu_name, device_name
from ..paths import REPO_ROOT



def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: leave torch's default). Returns the number in force."""
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()






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




def environment(device: str | torch.device = "cpu") -> dict:
    """One flat dict describing the run, attached to every result row."""
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
