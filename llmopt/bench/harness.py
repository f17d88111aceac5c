"""The measurement harness every notebook uses: warm-up, repeats, median and spread, same-run ratios.

Each timed call records wall time and process CPU time. On a shared machine a CPU/wall ratio far below the
thread count means the run waited for cores it did not get: such a measurement is flagged `contended`.
Results are tidy rows (one per measurement) saved under `data/results/` with the environment attached.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..paths import REPO_ROOT
from .environment import environment

DEFAULT_RESULTS_DIR = REPO_ROOT / "data" / "results"


def results_dir() -> Path:
    """Where result rows go: $LLMOPT_RESULTS_DIR (smoke runs and tests) or data/results/."""
    return Path(os.environ.get("LLMOPT_RESULTS_DIR") or DEFAULT_RESULTS_DIR)
CONTENDED_FRACTION = 0.5  # CPU/wall below this share of the threads: the run did not get its cores


@dataclass
class Timing:
    """Repeated measurements of one thing, in seconds."""
    wall_s: list[float]
    cpu_s: list[float]
    threads: int
    results: list[Any] = field(default_factory=list, repr=False)

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def spread_s(self) -> float:
        """Interquartile range (max - min when fewer than 4 repeats)."""
        return spread(self.wall_s)

    @property
    def cpu_wall_ratio(self) -> float:
        return sum(self.cpu_s) / sum(self.wall_s) if sum(self.wall_s) > 0 else float("nan")

    @property
    def contended(self) -> bool:
        return self.threads > 1 and self.cpu_wall_ratio < CONTENDED_FRACTION * self.threads

    def summary(self, prefix: str = "time") -> dict:
        return {f"{prefix}_median_s": self.median_s, f"{prefix}_spread_s": self.spread_s,
                f"{prefix}_min_s": min(self.wall_s), "repeats": len(self.wall_s),
                "cpu_wall_ratio": self.cpu_wall_ratio, "contended": self.contended}


def spread(values: Sequence[float]) -> float:
    """Interquartile range, or the full range for fewer than 4 values."""
    values = sorted(values)
    if len(values) < 2:
        return 0.0
    if len(values) < 4:
        return values[-1] - values[0]
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def synchronize(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device="cpu",
            progress: str | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed; keeps each call's return value."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    timing = Timing([], [], torch.get_num_threads())
    for _ in tqdm(range(repeats), desc=progress, disable=progress is None, leave=False):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = fn()
        synchronize(device)
        timing.wall_s.append(time.perf_counter() - wall0)
        timing.cpu_s.append(time.process_time() - cpu0)
        timing.results.append(result)
    return timing


def peak_memory_bytes(fn: Callable[[], Any], device="cpu") -> tuple[Any, int]:
    """Run `fn` once and return (its result, peak extra memory in bytes it allocated).

    CUDA: the allocator's peak. CPU: torch's profiler memory accounting (allocations made by torch ops)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # Allocations and frees inside an op are its *self* memory; frees outside any op are "[memory]" events.
    changes = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            changes.append((event.time_range.start, delta))
    current = peak = 0
    for _, delta in sorted(changes):
        current += delta
        peak = max(peak, current)
    return result, peak


class quiet_output:
    """Silence what C/C++ code writes to file descriptors (default: fd 2), which Python's sys.stderr does not see:
    the profiler's start/stop lines, llama.cpp's loading and quantizing logs."""

    def __init__(self, fds=(2,)):
        self.fds = tuple(fds)

    def __enter__(self):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = [os.dup(fd) for fd in self.fds]
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in self.fds:
            os.dup2(devnull, fd)
        os.close(devnull)

    def __exit__(self, *exc):
        for fd, saved in zip(self.fds, self.saved):
            os.dup2(saved, fd)
            os.close(saved)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def save_results(rows: list[dict] | pd.DataFrame, experiment: str, device="cpu", extra: dict | None = None,
                 directory: Path | str | None = None) -> Path:
    """Save tidy rows with the environment columns as `data/results/<experiment>.csv`, atomically."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    env = {**environment(device), **(extra or {})}
    for key, value in env.items():
        if key not in frame.columns:
            frame[key] = value
    directory = Path(directory) if directory else results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{experiment}.csv"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{experiment}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            frame.to_csv(handle, index=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_results(experiment: str, directory: Path | str | None = None) -> pd.DataFrame:
    return pd.read_csv((Path(directory) if directory else results_dir()) / f"{experiment}.csv")


def save_headline(notebook: str, title: str, key_figure: str, verdict: str, table: pd.DataFrame | None = None,
                  directory: Path | str | None = None, device="cpu") -> Path:
    """A notebook's one-line summary (and optional small table) for the report index and the README, with the
    environment of the run (`device`: where the notebook ran, as `save_results` takes it)."""
    import json

    directory = Path(directory) if directory else results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = {"notebook": notebook, "title": title, "key_figure": key_figure, "verdict": verdict,
              "table": None if table is None else json.loads(table.to_json(orient="split", index=False)),
              **environment(device)}
    target = directory / f"headline_{notebook}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, target)
    return target
