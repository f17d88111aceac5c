"""The inputs in `data/`: prompt workloads, evaluation text and the design document's estimates."""
from __future__ import annotations

import json

import pandas as pd

from ..paths import REPO_ROOT

DATA_DIR = REPO_ROOT / "data"


def prompts(kind: str | None = None) -> list[dict]:
    """Prompt records from `data/prompts.jsonl` ({id, kind, chat, text}), optionally of one kind."""
    with open(DATA_DIR / "prompts.jsonl") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def evaluation_text(split: str = "heldout") -> str:
    """The Python Language Reference text (PSF license): 'calibration' or 'heldout' split."""
    if split not in ("calibration", "heldout"):
        raise ValueError("split must be 'calibration' or 'heldout'")
    return (DATA_DIR / "text" / f"python_reference.{split}.txt").read_text()


def estimates(section: str | None = None) -> pd.DataFrame:
    """The design document's impact tables as rows (all marked source='estimate')."""
    frame = pd.read_csv(DATA_DIR / "estimates.csv")
    return frame if section is None else frame[frame["section"] == section].reset_index(drop=True)


def priority_ranking() -> pd.DataFrame:
    return pd.read_csv(DATA_DIR / "priority_ranking.csv")


def verdict(measured: float, low: float, high: float, higher_is_better: bool = True) -> str:
    """A POINT value against an estimated range: 'confirmed' inside it, else refuted, which way and by how much.

    Only for deterministic quantities measured without rounds (a byte count, a count of processed tokens, the
    decode occupancy a schedule gives by construction): there a point verdict is right, since measuring again
    gives the same value. A timed quantity (a speedup, a latency, a throughput) goes through
    `stats.estimate_verdict` with its paired-round interval (`stats.interval_from_columns`): one round or no
    interval reads 'inconclusive' there, and the direction follows the metric (lower is better for latency,
    time to first token and memory)."""
    if low <= measured <= high:
        return "confirmed"
    bound = high if measured > high else low
    better = (measured > high) == higher_is_better
    factor = measured / bound if bound else float("inf")
    estimate = f"{low:g}" if low == high else f"{low:g}-{high:g}"
    return f"refuted ({'better' if better else 'worse'}): {measured:.3g} vs {estimate}, {factor:.2g}x the estimate"
