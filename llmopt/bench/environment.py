"""What a result was measured on: hardware, threads, library versions, git revision."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess

import torch
import transformers

from ..engine import cpu_kernels
from ..errors import InvalidParameterError
from ..hardware import cpu_flags, cpu_name, device_name, isa_level, l3_cache_bytes
from ..paths import REPO_ROOT


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: leave torch's default). Returns the number in force.

    A count below 1 means nothing and is refused (InvalidParameterError), never replaced by a default."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidParameterError(f"threads must be an integer >= 1 (or None: torch's default), got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()






def git_revision() -> str:
    """Short commit of the working tree, with '+dirty' when it has uncommitted changes.

    $LLMOPT_GIT_REVISION, when set, is the answer: the suite runner reads the revision once, before a run writes
    anything, so a run's own outputs do not make it "+dirty"."""
    if os.environ.get("LLMOPT_GIT_REVISION"):
        return os.environ["LLMOPT_GIT_REVISION"]
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
        "cpu_isa": isa_level(flags),
        "cpu_l3_MiB": (l3_cache_bytes() or 0) / 2**20 or None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ISA path ATen's kernels take
        "cpu_amx": "amx_bf16" in flags,
        "cpu_avx512": "avx512f" in flags,
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": "llmopt AVX2 gemv" if cpu_kernels.available() else f"torch ({cpu_kernels.unavailable_reason()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_revision": git_revision(),
    }
