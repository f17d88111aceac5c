"""Verdicts against the design document's estimates: the interval rule of stats.verdict at every call site, the
direction following the metric, 'inconclusive' for a point estimate of fewer than 2 rounds (constructed cases)."""
from __future__ import annotations

import math

import pandas as pd

from llmopt.bench import attention_bench, batching_benchmark, datasets, prefix_workload, speculative_bench
from llmopt.bench.stats import Interval, estimate_verdict, interval_from_columns


def columns(prefix: str, estimate: float, low: float, high: float, rounds: int) -> dict:
    return {f"{prefix}_geomean": estimate, f"{prefix}_low": low, f"{prefix}_high": high, f"{prefix}_rounds": rounds}


# ---- the rule -------------------------------------------------------------------------------------------------

def test_the_verdict_text_shows_the_interval():
    assert (estimate_verdict(Interval(2.36, 2.21, 2.52, 6), 2, 3)
            == "confirmed: 2.36x (2.21-2.52) vs estimate 2-3x")
    assert estimate_verdict(Interval(4.0, 3.6, 4.4, 3), 2, 3).startswith("refuted (better): 4.00x (3.60-4.40)")
    assert estimate_verdict(Interval(1.5, 0.6, 3.0, 2), 2, 3).startswith("inconclusive")  # too wide


def test_one_round_is_inconclusive_whatever_side_it_lies():
    for value in (0.5, 2.5, 9.0):
        text = estimate_verdict(Interval(value, value, value, 1, method="single round"), 2, 3)
        assert text.startswith("inconclusive: ") and "(1 round)" in text and "vs estimate 2-3x" in text


def test_lower_is_better_turns_the_direction():
    above = Interval(1.21, 1.13, 1.29, 4)  # a latency 1.13-1.29x the baseline's, against an estimate of 0.9-1.1x
    assert estimate_verdict(above, 0.9, 1.1, higher_is_better=False).startswith("refuted (worse)")
    assert estimate_verdict(above, 0.9, 1.1).startswith("refuted (better)")  # the old reading of those rows
    below = Interval(0.5, 0.45, 0.55, 3)
    assert estimate_verdict(below, 0.7, 0.8, higher_is_better=False).startswith("refuted (better)")


def test_the_interval_comes_from_a_rows_columns_or_falls_back_to_the_point():
    row = pd.Series({"speedup": 2.4, **columns("speedup", 2.36, 2.21, 2.52, 2)})
    assert interval_from_columns(row, "speedup") == Interval(2.36, 2.21, 2.52, 2)
    old = pd.Series({"speedup": 2.4})  # a results file saved before the interval columns
    assert interval_from_columns(old, "speedup").single and interval_from_columns(old, "speedup").estimate == 2.4
    one = pd.Series({"speedup": 2.4, **columns("speedup", 2.4, 2.4, 2.4, 1)})
    assert interval_from_columns(one, "speedup").single
    nan = {**columns("speedup", math.nan, math.nan, math.nan, 0)}
    assert interval_from_columns(nan, "speedup", 3.0) == Interval(3.0, 3.0, 3.0, 1, method="single round")


def test_a_deterministic_quantity_keeps_a_point_verdict():
    assert datasets.verdict(270, 270, 270) == "confirmed"
    assert datasets.verdict(600, 500, 500, higher_is_better=False).startswith("refuted (worse)")


# ---- the call sites -------------------------------------------------------------------------------------------

def batching_summary(latency_intervals: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    """A `summarize` table: one request in flight ('single') and 8 concurrent ('burst'), with interval columns."""
    rows = []
    for workload, scheduler, max_batch in (("single", "sequential", 1), ("single", "static", 1),
                                           ("single", "dynamic", 1), ("single", "continuous", 1),
                                           ("burst", "sequential", 1), ("burst", "continuous", 8)):
        baseline = scheduler == "sequential"
        latency = (1.0, 1.0, 1.0) if baseline else latency_intervals.get(scheduler, (1.0, 0.98, 1.02))
        throughput = (1.0, 1.0, 1.0) if baseline else ((2.5, 2.3, 2.7) if max_batch == 8 else (1.0, 0.97, 1.03))
        if workload == "burst" and not baseline:
            latency = (1.2, 1.1, 1.3)
        rows.append({"workload": workload, "scheduler": scheduler, "max_batch": max_batch,
                     "tokens_per_s": 10 * throughput[0], "decode_tokens_per_s": 10 * throughput[0],
                     "latency_p50_s": latency[0], "busy_fraction": 0.5, "padding_waste": 0.0,
                     "useful_rows_per_decode_step": 1.0 if baseline else 6.0,
                     "throughput_vs_sequential": throughput[0], "latency_p50_vs_sequential": latency[0],
                     **columns("throughput_vs_sequential", *throughput, 1 if baseline else 3),
                     **columns("latency_p50_vs_sequential", *latency, 1 if baseline else 3)})
    return pd.DataFrame(rows)


def test_the_batching_tables_latency_rows_read_lower_as_better():
    summary = batching_summary({"static": (1.13, 1.11, 1.15), "continuous": (1.29, 1.2, 1.4)})
    table = batching_benchmark.document_table(summary, "burst", concurrency=8, single_workload="single")
    latency = table[table.quantity == "latency, one request in flight (p50)"].set_index("scheduler").verdict
    assert latency["static"].startswith("refuted (worse): 1.13x (1.11-1.15) vs estimate 0.9-1.1x")
    assert latency["continuous"].startswith("refuted (worse): 1.29x (1.20-1.40)")
    assert latency["dynamic"].startswith("confirmed: 1.00x (0.98-1.02)")
    rows = table.set_index("quantity").verdict
    assert rows["throughput, 8 concurrent requests"].startswith("confirmed: 2.50x (2.30-2.70) vs estimate 2-3x")
    # 1.2x (1.1-1.3) the sequential latency: "slightly higher", read as 1-1.5x, lower is better
    assert rows["latency p50, 8 concurrent requests"].startswith("confirmed: 1.20x (1.10-1.30) vs estimate 1-1.5x")
    # a median without an interval: inconclusive; decode occupancy is deterministic: a point verdict
    assert rows["tokens/s, 8 concurrent requests (document's model and machine)"].startswith("inconclusive")
    occupancy = table[table.quantity.str.startswith("decode occupancy")].set_index("scheduler").verdict
    assert occupancy["continuous"] == "confirmed" and occupancy["sequential"] == "confirmed"  # 75 %, 12.5 %


def test_the_batching_table_without_intervals_is_inconclusive():
    summary = batching_summary({"static": (1.5, 1.5, 1.5)})
    summary = summary.drop(columns=[c for c in summary if c.endswith(("_geomean", "_low", "_high", "_rounds"))])
    table = batching_benchmark.document_table(summary, "burst", concurrency=8, single_workload="single")
    timed = table[table.quantity.str.contains("throughput|latency")]
    assert timed.verdict.str.startswith("inconclusive").all(), timed.verdict.tolist()


def test_prompt_caching_latency_is_lower_is_better_and_token_counts_keep_a_point_verdict():
    ratio = "end_to_end_s / no cache"
    table = pd.DataFrame([
        {"engine": "no prefix cache", "prefix_tokens": 250, "processed_tokens": 270, ratio: 1.0,
         **columns(ratio, 1.0, 1.0, 1.0, 3)},
        {"engine": "cold (miss)", "prefix_tokens": 250, "processed_tokens": 270, ratio: 1.02,
         **columns(ratio, 1.02, 1.02, 1.02, 1)},  # one round: inconclusive
        {"engine": "warm (hit)", "prefix_tokens": 250, "processed_tokens": 20, ratio: 0.5,
         **columns(ratio, 0.5, 0.45, 0.55, 3)}])
    versus = prefix_workload.versus_document(table, 250).set_index("condition").verdict
    assert versus["cached prefix (hit)"] == "refuted (better): 0.50x (0.45-0.55) vs estimate 0.7-0.8x"
    assert versus["cache miss"].startswith("inconclusive: 1.02x (1 round)")
    assert versus["scenario with caching"] == "confirmed" and versus["scenario"] == "confirmed"


def test_speculative_rows_use_their_speedup_interval():
    results = pd.DataFrame([
        {"workload": "repeat", "drafter": "prompt_lookup", "k": 5, "alpha": 0.9, "speedup": 3.3,
         **columns("speedup", 3.3, 3.1, 3.5, 3)},
        {"workload": "open-ended", "drafter": "prompt_lookup", "k": 5, "alpha": 0.5, "speedup": 0.9,
         **columns("speedup", 0.9, 0.9, 0.9, 1)}])
    table = speculative_bench.document_comparison(results, datasets.estimates("speculative_decoding"), k=5)
    verdicts = dict(zip(table.acceptance, table.verdict))
    assert verdicts[0.9] == "confirmed: 3.30x (3.10-3.50) vs estimate 3-4x"
    assert verdicts[0.5].startswith("inconclusive: 0.90x (1 round)")  # below 1.5x, but one round
    assert verdicts[0.7] == "not measured"


def test_attention_op_rows_use_the_paired_repeats():
    op = pd.DataFrame([
        {"backend": "naive", "context_tokens": 512, "skipped": False, "time_median_s": 1.0, "peak_bytes": 4},
        {"backend": "sdpa", "context_tokens": 512, "skipped": False, "time_median_s": 0.5, "peak_bytes": 2,
         **columns("speedup_vs_naive", 2.0, 1.9, 2.1, 3)},
        {"backend": "sdpa", "context_tokens": 2048, "skipped": False, "time_median_s": 0.4, "peak_bytes": 2,
         **columns("speedup_vs_naive", 2.5, 2.5, 2.5, 1)},
        {"backend": "naive", "context_tokens": 2048, "skipped": False, "time_median_s": 1.0, "peak_bytes": 4}])
    table = attention_bench.estimate_table(op, None, datasets.estimates("flash_attention"), backends=("sdpa",))
    verdicts = table.set_index("context_tokens").verdict
    assert verdicts[512] == "refuted (better): 2.00x (1.90-2.10) vs estimate 1.5x"
    assert verdicts[2048].startswith("inconclusive: 2.50x (1 round)")
