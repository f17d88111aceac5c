"""Where things live: the repository (notebooks, data, reports) and the cache of converted models and kernels."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Where converted checkpoints and compiled kernels live: $LLMOPT_CACHE, else ~/.cache/llmopt."""
    return Path(os.environ.get("LLMOPT_CACHE", Path.home() / ".cache" / "llmopt"))
