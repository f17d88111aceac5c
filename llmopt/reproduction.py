"""Does the combined notebook reproduce each optimization's effect as its own notebook measured it?

For each optimization, one ratio (with / without it) on the metric its own notebook reports, read from that
notebook's results of the latest run (`data/results/`), at the condition closest to the combined workload's, with
the band its repeats span: for medians a, b with spreads (range, or IQR from 4 repeats) sa, sb the band is
[(a - sa/2) / (b + sb/2), (a + sa/2) / (b - sb/2)]. The combined notebook's ratio is the step that adds the
optimization in the document's order (or, for batching, its own batching run); it is "within" when it falls
inside the band (the issue's test), and the two bands "overlap" when this run's own band meets the notebook's.
The conditions differ (prompt lengths, k, what is already stacked), and each row says how.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import harness


@dataclass
class Effect:
    optimization: str
    metric: str
    ratio: float
    low: float
    high: float
    condition: str


def ratio_band(a: float, spread_a: float, b: float, spread_b: float) -> tuple[float, float, float]:
    """(a / b, low, high) with each median moved by half its spread in the direction that widens the band."""
    spread_a, spread_b = (0.0 if pd.isna(s) else float(s) for s in (spread_a, spread_b))
    low = (a - spread_a / 2) / (b + spread_b / 2)
    denominator = b - spread_b / 2
    high = (a + spread_a / 2) / denominator if denominator > 0 else float("inf")
    return a / b, low, high


def _rows_ratio(on: pd.Series, off: pd.Series, column: str) -> tuple[float, float, float]:
    """ratio_band of one column (and its `_spread` column) between two result rows."""
    return ratio_band(on[column], on[f"{column}_spread"], off[column], off[f"{column}_spread"])


def _nearest(frame: pd.DataFrame, column: str, value: float) -> pd.DataFrame:
    target = frame[column].iloc[(frame[column] - value).abs().argsort().iloc[0]]
    return frame[frame[column] == target]


def _read(directory: Path, name: str) -> pd.DataFrame | None:
    """A notebook's saved results (`harness.load_results`), None when that notebook has not run."""
    return harness.load_results(name, directory) if (directory / f"{name}.csv").exists() else None


def _nearest_pair(d: Path, name: str, column: str, value: float, index: str, on: str, off: str):
    """Rows `on` and `off` (by `index`) of results `name` at the `column` value nearest `value`; None if absent."""
    frame = _read(d, name)
    if frame is None:
        return None
    rows = _nearest(frame, column, value).set_index(index)
    return rows.loc[on], rows.loc[off]


def _kv_cache(d: Path, prompt_tokens: int) -> Effect | None:
    pair = _nearest_pair(d, "01_kv_cache_sweep", "prompt_tokens", prompt_tokens, "engine", "static cache", "no cache")
    if pair is None:
        return None
    on, off = pair
    return Effect("kv_cache", "decode tokens/s", *_rows_ratio(on, off, "decode_tokens_per_s"),
                  f"01: {int(on.prompt_tokens)}-token prompt, {int(on.new_tokens)} new tokens, SDPA attention")


PYTORCH_ENGINE = " · PyTorch engine"  # 03's rows that repeat a format on the PyTorch engine


def _quantization(d: Path, variant: str) -> Effect | None:
    """07 adds quantization on the PyTorch engine (the fused decode step comes later), so 03's PyTorch-engine
    pair is the like-for-like one when 03 measured it; otherwise 03's main rows (on its chosen engine)."""
    engines = _read(d, "03_quantization_engines")
    names = set(engines.engine) if engines is not None else set()
    if {variant + PYTORCH_ENGINE, "fp32" + PYTORCH_ENGINE} <= names:
        rows = engines.set_index("engine")
        on, off = rows.loc[variant + PYTORCH_ENGINE], rows.loc["fp32" + PYTORCH_ENGINE]
        where = "PyTorch engine"
    else:
        table = _read(d, "03_quantization")
        if table is None or variant not in set(table.variant):
            return None
        rows = table.set_index("variant")
        on, off = rows.loc[variant], rows.loc["fp32"]
        where = f"{on.get('decode_engine', 'pytorch')} engine"
    return Effect("quantization", "decode tokens/s", *_rows_ratio(on, off, "decode_tokens_per_s"),
                  f"03: {variant} against fp32, {int(on.prompt_tokens)}-token prompt, SDPA attention, {where}")


def _prompt_caching(d: Path, prefix_tokens: int) -> Effect | None:
    runs = _read(d, "04_prompt_caching")
    if runs is None:
        return None
    runs = _nearest(runs, "prefix_tokens", prefix_tokens)
    warm = runs[runs.engine == "warm (hit)"].time_to_first_token_s
    cold = runs[runs.engine == "no prefix cache"].time_to_first_token_s
    return Effect("prompt_caching", "time to first token", warm.median() / cold.median(), warm.min() / cold.max(),
                  warm.max() / cold.min(), f"04: {int(runs.prefix_tokens.iloc[0])}-token shared prefix, "
                  f"{len(warm)} repeats (band: their extremes)")


def _flash_attention(d: Path, context_tokens: int) -> Effect | None:
    pair = _nearest_pair(d, "05_flash_attention_model", "context_tokens", context_tokens, "backend", "sdpa", "naive")
    if pair is None:
        return None
    on, off = pair
    return Effect("flash_attention", "decode tokens/s", *_rows_ratio(on, off, "decode_tokens_per_s"),
                  f"05: {int(on.context_tokens)}-token context, {int(on.repeats)} repeat(s)")


def _speculative(d: Path, k: int) -> Effect | None:
    runs = _read(d, "06_speculative_decoding")
    if runs is None:
        return None
    runs = runs[runs.workload == "repeat"]
    lookup = _nearest(runs[runs.drafter == "prompt_lookup"], "k", k).iloc[0]
    plain = runs[runs.drafter.str.startswith("plain")].iloc[0]
    return Effect("speculative_decoding", "decode tokens/s", *_rows_ratio(lookup, plain, "decode_tokens_per_s"),
                  f"06: prompt lookup k={int(lookup.k)} on the 'repeat' workload, {int(lookup.prompt_tokens)}-token prompt")


def _batching(d: Path, concurrency: int) -> Effect | None:
    runs = _read(d, "02_batching")
    if runs is None:
        return None
    burst = runs[runs.workload == "burst"]
    on = _nearest(burst[burst.scheduler == "continuous"], "max_batch", concurrency).iloc[0]
    off = burst[burst.scheduler == "sequential"].iloc[0]
    return Effect("batching", "throughput (tokens/s)", *_rows_ratio(on, off, "tokens_per_s"),
                  f"02: continuous at {int(on.max_batch)} concurrent against sequential, burst workload")


def notebook_effects(prompt_tokens: int, prefix_tokens: int, quantization_variant: str, k: int, concurrency: int,
                     directory: Path | None = None) -> dict[str, Effect | None]:
    """Each optimization's effect as its own notebook measured it (None: that notebook's results are missing)."""
    d = Path(directory) if directory else harness.results_dir()
    return {"kv_cache": _kv_cache(d, prompt_tokens), "quantization": _quantization(d, quantization_variant),
            "prompt_caching": _prompt_caching(d, prefix_tokens), "flash_attention": _flash_attention(d, prompt_tokens),
            "speculative_decoding": _speculative(d, k), "batching": _batching(d, concurrency)}


METRIC_COLUMNS = {"decode tokens/s": "decode_tokens_per_s", "time to first token": "time_to_first_token_s"}


def combined_effects(run: pd.DataFrame, order: list[str], labels: dict[str, str], effects: dict[str, Effect | None],
                     batching: tuple[float, float, float] | None = None) -> pd.DataFrame:
    """One row per optimization: the combined run's step ratio on the notebook's metric beside the notebook's
    ratio and band, and the verdict. `order`: optimizations in the order they were stacked; `labels`:
    optimization -> configuration name of the stack that adds it; `batching`: the combined run's own
    (ratio, low, high) for continuous / sequential."""
    table = run.set_index("configuration")
    rows, previous = [], "baseline"
    for name in order:
        current = labels[name]
        effect = effects.get(name)
        row = {"optimization": name}
        if effect is not None:
            column = METRIC_COLUMNS[effect.metric]
            ratio, low, high = _rows_ratio(table.loc[current], table.loc[previous], column)
            row.update(_compare(effect, ratio, low, high, f"07: step adding it to '{previous}'"))
        else:
            row.update(verdict="not compared: its notebook has no results in this results directory")
        rows.append(row)
        previous = current
    if "batching" in effects:
        effect = effects["batching"]
        if effect is not None and batching is not None:
            rows.append({"optimization": "batching", **_compare(effect, *batching, "07: on the stacked model")})
        else:
            rows.append({"optimization": "batching", "verdict": "not compared: no results"})
    return pd.DataFrame(rows, columns=COLUMNS)


COLUMNS = ["optimization", "metric", "combined_ratio", "combined_low", "combined_high", "notebook_ratio",
           "notebook_low", "notebook_high", "combined / notebook", "within_notebook_spread", "bands_overlap", "verdict",
           "notebook_condition", "combined_condition"]


def _compare(effect: Effect, ratio: float, low: float, high: float, condition: str) -> dict:
    inside = effect.low <= ratio <= effect.high
    return {"metric": f"{effect.metric} with / without", "combined_ratio": ratio, "combined_low": low,
            "combined_high": high, "notebook_ratio": effect.ratio, "notebook_low": effect.low,
            "notebook_high": effect.high, "combined / notebook": ratio / effect.ratio,
            "within_notebook_spread": inside, "bands_overlap": low <= effect.high and effect.low <= high,
            "verdict": "reproduced (within the notebook's spread)" if inside else
            f"not reproduced: {ratio:.2f}x against {effect.low:.2f}-{effect.high:.2f}x",
            "notebook_condition": effect.condition, "combined_condition": condition}
