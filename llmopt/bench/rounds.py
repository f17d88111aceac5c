"""The one measurement loop: arms interleaved in paired rounds, each call timed, ratios paired by round.

On a shared machine the speed drifts over minutes; running every arm once per round, in a shuffled or
rotated order, exposes all arms to the same drift, and a round's ratio cancels it. Each call records wall
and process CPU time: a CPU/wall ratio far below the thread count means the call waited for cores.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import InvalidParameterError
from ..hardware import contended, synchronize
from .stats import Interval, paired_ratio

ORDERS = ("shuffle", "alternate")
COLUMNS = ("round", "arm", "position", "wall_s", "cpu_s", "cpu_wall_ratio", "threads", "contended")


def round_order(arms: list[str], round_index: int, order: str, rng: random.Random) -> list[str]:
    """The arms' order in one round: seeded shuffle, or rotation (round r starts at arm r mod k)."""
    if order == "shuffle":
        shuffled = list(arms)
        rng.shuffle(shuffled)
        return shuffled
    start = round_index % len(arms)
    return arms[start:] + arms[:start]


class Rounds:
    """The tidy frame of a run_rounds run (one row per timed call) and the arms' return values."""

    def __init__(self, frame: pd.DataFrame, results: Mapping[str, list[Any]], arms: list[str]):
        self.frame = frame
        self._results = dict(results)
        self.arms = list(arms)

    def __repr__(self) -> str:
        return f"Rounds(arms={self.arms}, rounds={self.rounds})"

    @property
    def rounds(self) -> int:
        return int(self.frame["round"].nunique())

    def _check(self, arm: str, metric: str | None = None) -> None:
        if arm not in self.arms:
            raise InvalidParameterError(f"unknown arm {arm!r}; the arms are {self.arms}")
        if metric is not None and metric not in self.frame.columns:
            raise InvalidParameterError(f"unknown metric {metric!r}; the columns are {list(self.frame.columns)}")

    def values(self, arm: str, metric: str = "wall_s") -> np.ndarray:
        """One arm's metric, one value per round, in round order."""
        self._check(arm, metric)
        rows = self.frame[self.frame["arm"] == arm].sort_values("round")
        return rows[metric].to_numpy(dtype=float)

    def round_ratios(self, numerator_arm: str, denominator_arm: str, metric: str = "wall_s") -> np.ndarray:
        """Per-round ratios numerator/denominator: the input of stats.equivalence."""
        return self.values(numerator_arm, metric) / self.values(denominator_arm, metric)

    def ratio(self, numerator_arm: str, denominator_arm: str, metric: str = "wall_s",
              confidence: float = 0.95) -> Interval:
        """Geometric-mean ratio of a metric between two arms, paired by round, with its t-interval."""
        return paired_ratio(self.values(numerator_arm, metric), self.values(denominator_arm, metric), confidence)

    def speedup(self, baseline: str, arm: str, metric: str = "wall_s", confidence: float = 0.95) -> Interval:
        """baseline time / arm time: above 1 means the arm is faster."""
        return self.ratio(baseline, arm, metric, confidence)

    def median(self, arm: str, metric: str = "wall_s") -> float:
        return float(np.median(self.values(arm, metric)))

    def results(self, arm: str) -> list[Any]:
        """The arm's return values of the timed calls, in round order (empty if not kept)."""
        self._check(arm)
        return list(self._results.get(arm, []))

    def contended_rounds(self) -> list[int]:
        """Rounds in which at least one call was contended."""
        return sorted(int(r) for r in self.frame.loc[self.frame["contended"], "round"].unique())

    def add_rate(self, column: str, name: str | None = None) -> str:
        """Add column / wall_s per call (e.g. tokens -> tokens_per_s) and return the new column's name."""
        if column not in self.frame.columns:
            raise InvalidParameterError(f"unknown metric {column!r}; the columns are {list(self.frame.columns)}")
        name = name or f"{column}_per_s"
        self.frame[name] = self.frame[column] / self.frame["wall_s"]
        return name


def _validate(arms: Mapping[str, Callable[[], Any]], rounds: int, warmup: int, order: str) -> None:
    if not arms:
        raise InvalidParameterError("arms: need at least one arm to measure, got none")
    for name, fn in arms.items():
        if not callable(fn):
            raise InvalidParameterError(f"arms: arm {name!r} is not callable")
    if not isinstance(rounds, int) or rounds < 1:
        raise InvalidParameterError(f"rounds must be an integer of at least 1, got {rounds!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise InvalidParameterError(f"warmup must be an integer of at least 0, got {warmup!r}")
    if order not in ORDERS:
        raise InvalidParameterError(f"order must be one of {ORDERS}, got {order!r}")


def run_rounds(arms: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1, order: str = "shuffle",
               seed: int = 0, device: str | torch.device = "cpu", progress: str | None = None,
               metrics: Callable[[Any], Mapping[str, Any]] | None = None, keep_results: bool = True) -> Rounds:
    """Call every arm `warmup` times untimed, then once per round for `rounds` rounds, and time each call.

    order: 'shuffle' (a seeded random.Random(seed) shuffle per round) or 'alternate' (round r starts at
    arm r mod k). metrics(return value) -> dict adds columns to the call's row (tokens, accuracy...), so a
    ratio can be taken on any column. progress: a tqdm label, or None for no bar.
    """
    _validate(arms, rounds, warmup, order)
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
            synchronize(device)
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    results: dict[str, list[Any]] = {name: [] for name in names}
    with tqdm(total=rounds * len(names), desc=progress, disable=progress is None) as bar:
        for r in range(rounds):
            for position, name in enumerate(round_order(names, r, order, rng)):
                synchronize(device)
                wall0, cpu0 = time.perf_counter(), time.process_time()
                result = arms[name]()
                synchronize(device)
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                ratio = cpu / wall if wall > 0 else math.nan
                threads = torch.get_num_threads()
                row = {"round": r, "arm": name, "position": position, "wall_s": wall, "cpu_s": cpu,
                       "cpu_wall_ratio": ratio, "threads": threads, "contended": contended(ratio, threads)}
                if metrics is not None:
                    extra = dict(metrics(result))
                    clash = sorted(set(extra) & set(COLUMNS))
                    if clash:
                        raise InvalidParameterError(f"metrics: {clash} are reserved columns; rename them")
                    row.update(extra)
                rows.append(row)
                if keep_results:
                    results[name].append(result)
                bar.update()
    return Rounds(pd.DataFrame(rows), results, names)


def merge_rounds(parts: list[Rounds]) -> Rounds:
    """The Rounds of separate runs with distinct arms as one object (e.g. a frame concatenated from several
    `benchmark.compare` calls): each arm keeps its own round numbers, so an arm's values pair by round only with
    the arms of its own run; pairing arms of different runs would pair calls made minutes apart."""
    arms = [arm for part in parts for arm in part.arms]
    if len(set(arms)) != len(arms):
        raise InvalidParameterError(f"merge_rounds: the runs share arm names, their rounds would mix: {arms}")
    frame = pd.concat([part.frame for part in parts], ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    return Rounds(frame, {}, arms)
