"""The measurement harness every notebook uses: medians and spreads of rounds, paired-ratio intervals, results files.

Calls are timed by the one measurement loop, `rounds.run_rounds` (`measure` is it with one arm); each timed call
records wall time and process CPU time. On a shared machine a CPU/wall ratio far below the
thread count means the run waited for cores it did not get: such a measurement is flagged `contended`.
Results are tidy rows (one per measurement) saved under `data/results/` with the environment attached.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ..hardware import contended
from ..paths import REPO_ROOT
from .environment import environment
from .rounds import Rounds, run_rounds
from .stats import paired_ratio

DEFAULT_RESULTS_DIR = REPO_ROOT / "data" / "results"


def results_dir() -> Path:
    """Where result rows go: $LLMOPT_RESULTS_DIR (smoke runs and tests) or data/results/."""
    return Path(os.environ.get("LLMOPT_RESULTS_DIR") or DEFAULT_RESULTS_DIR)


@dataclass
class Timing:
    """Repeated measurements of one thing, in seconds (`measure`: run_rounds with one arm)."""
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
        return contended(self.cpu_wall_ratio, self.threads)

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


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device="cpu",
            progress: str | None = None) -> Timing:
    """Call `fn` `warmup` times untimed, then `repeats` times timed; keeps each call's return value.

    The one measurement loop (`rounds.run_rounds`) with a single arm: each call timed with its CPU time."""
    timed = run_rounds({"fn": fn}, rounds=repeats, warmup=warmup, device=device, progress=progress)
    frame = timed.frame
    threads = int(frame["threads"].iloc[0]) if len(frame) else torch.get_num_threads()
    return Timing(frame["wall_s"].tolist(), frame["cpu_s"].tolist(), threads, timed.results("fn"))


def paired_interval(name: str, numerator: Sequence[float], denominator: Sequence[float],
                    confidence: float = 0.95) -> dict:
    """Columns `{name}_geomean`, `{name}_low`, `{name}_high`, `{name}_rounds` for the ratio `name` of paired
    rounds: `stats.paired_ratio` (geometric mean of the per-round ratios, t-interval on their logs). Rounds where
    either side is not a finite positive number (a NaN decode rate) are left out; none left gives NaN and 0."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if num.shape != den.shape:
        raise ValueError(f"{name}: {num.size} numerator rounds against {den.size} denominator rounds")
    keep = np.isfinite(num) & np.isfinite(den) & (num > 0) & (den > 0)
    if not keep.any():
        return {f"{name}_geomean": math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan,
                f"{name}_rounds": 0}
    interval = paired_ratio(num[keep], den[keep], confidence)
    return {f"{name}_geomean": interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high,
            f"{name}_rounds": interval.rounds}


def call_columns(rows: pd.DataFrame) -> dict:
    """cpu_wall_ratio (CPU / wall over the calls, summed), contended (`hardware.contended`, the one rule) and
    contended_calls (how many single calls were contended) of one arm's rows of a `run_rounds` frame."""
    wall, cpu = float(rows["wall_s"].sum()), float(rows["cpu_s"].sum())
    ratio = cpu / wall if wall > 0 else math.nan
    threads = int(rows["threads"].iloc[0]) if len(rows) else torch.get_num_threads()
    return {"cpu_wall_ratio": ratio, "contended": contended(ratio, threads),
            "contended_calls": int(rows["contended"].sum())}


def light_rounds(timed):
    """The same Rounds without the arms' return values: the per-round values a result frame carries in
    `frame.attrs["rounds"]` (pandas copies attrs with every derived frame; a frame keeps them through filters and
    drops them in a concat of frames from different runs, whose rounds cannot be paired)."""
    return Rounds(timed.frame, {}, timed.arms)


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
    """Save tidy rows with the environment columns as `data/results/<experiment>.csv`, atomically; a frame that
    carries its per-round values (`attrs["rounds"]`, a `rounds.Rounds`) also gets `<experiment>.rounds.csv`,
    which `load_results` attaches again (07's reproduction check pairs them)."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    env = {**environment(device), **(extra or {})}
    for key, value in env.items():
        if key not in frame.columns:
            frame[key] = value
    directory = Path(directory) if directory else results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    timed = frame.attrs.get("rounds")
    if getattr(timed, "frame", None) is not None and len(timed.frame):  # the per-round values, for reproduction
        _write_csv(timed.frame, directory, f"{experiment}{ROUNDS_SUFFIX}")
    else:  # none: a previous run's rounds must not pass for this run's
        (directory / f"{experiment}{ROUNDS_SUFFIX}.csv").unlink(missing_ok=True)
    return _write_csv(frame, directory, experiment)


ROUNDS_SUFFIX = ".rounds"  # `<experiment>.rounds.csv`: a results frame's per-round values (`attrs["rounds"]`)


def _write_csv(frame: pd.DataFrame, directory: Path, name: str) -> Path:
    """`frame` as `<directory>/<name>.csv`, written atomically (a temporary file, then a rename)."""
    target = directory / f"{name}.csv"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            frame.to_csv(handle, index=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_results(experiment: str, directory: Path | str | None = None) -> pd.DataFrame:
    """A saved results frame; with its per-round values in `attrs["rounds"]` (a `rounds.Rounds` without return
    values) where `save_results` wrote them beside it (`<experiment>.rounds.csv`; files saved before have none)."""
    directory = Path(directory) if directory else results_dir()
    frame = pd.read_csv(directory / f"{experiment}.csv")
    rounds_file = directory / f"{experiment}{ROUNDS_SUFFIX}.csv"
    if rounds_file.exists():

        calls = pd.read_csv(rounds_file)
        frame.attrs["rounds"] = Rounds(calls, {}, list(dict.fromkeys(calls["arm"])))
    return frame


def save_headline(notebook: str, title: str, key_figure: str, verdict: str, table: pd.DataFrame | None = None,
                  directory: Path | str | None = None, device="cpu") -> Path:
    """A notebook's one-line summary (and optional small table) for the report index and the README, with the
    environment of the run (`device`: where the notebook ran, as `save_results` takes it)."""
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


VS_DOCUMENT_SUFFIX = "_vs_document"  # `<notebook>_vs_document.csv`: one notebook's estimate-against-measurement rows
VS_DOCUMENT_COLUMNS = ["quantity", "document (estimate)", "measured", "verdict"]


def save_vs_document(table: pd.DataFrame, notebook: str, device="cpu", extra: dict | None = None) -> Path:
    """A notebook's table of the design document's estimates against its measurements, in the one shape 07
    collects from every notebook: `quantity` (what was measured, with its condition), `document (estimate)`
    (the document's text), `measured` (the value, or the interval's text) and `verdict`."""
    missing = [c for c in VS_DOCUMENT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"a vs-document table needs the columns {VS_DOCUMENT_COLUMNS}; {missing} missing")
    return save_results(table[VS_DOCUMENT_COLUMNS].copy(), notebook + VS_DOCUMENT_SUFFIX, device, extra)


def read_vs_document(directory: Path | str | None = None) -> pd.DataFrame:
    """Every notebook's vs-document rows saved in `directory` (default: this run's results), with a `notebook`
    column first; empty (with the columns) when none was saved."""
    directory = Path(directory) if directory else results_dir()
    frames = [pd.read_csv(path)[VS_DOCUMENT_COLUMNS].assign(notebook=path.name[:-len(VS_DOCUMENT_SUFFIX + ".csv")])
              for path in sorted(directory.glob(f"*{VS_DOCUMENT_SUFFIX}.csv"))]
    if not frames:
        return pd.DataFrame(columns=["notebook", *VS_DOCUMENT_COLUMNS])
    table = pd.concat(frames, ignore_index=True)
    return table[["notebook", *VS_DOCUMENT_COLUMNS]]
