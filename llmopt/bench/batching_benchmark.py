"""Benchmarks of the batching schedulers: grids of runs, same-run ratios, the equivalence check, the document's table.

A *grid* replays each workload once per (scheduler, max_batch) configuration in every round (`rounds.run_rounds`,
a shuffled order per round), so slow drifts of a shared machine hit every configuration alike; ratios are taken
between runs of the same grid, paired by round (`repeat`). "Concurrency c" means at most c requests in flight
(`max_batch=c`) over a backlog of requests: the sequential scheduler always has one in flight, so it is run once
per workload and is the baseline of every ratio. transformers' continuous batching (`ContinuousBatchingManager`,
the engine behind `generate_batch`) can be run on the same requests for comparison.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Sequence

import numpy as np
import pandas as pd

from ..engine.batching import SCHEDULERS, Request, RequestRecord, RunResult, run
from ..errors import InvalidParameterError
from . import datasets
from .harness import paired_interval, spread
from .rounds import Rounds, run_rounds
from .stats import Interval, estimate_verdict, interval_from_columns, ratio_interval
from .workload import Workload

METRICS = ["tokens_per_s", "decode_tokens_per_s", "requests_per_s", "wall_s", "latency_p50_s", "latency_p95_s",
           "latency_p99_s", "ttft_p50_s", "ttft_p95_s", "queue_mean_s", "busy_fraction", "padding_waste",
           "mean_decode_rows", "useful_rows_per_decode_step", "prefill_s", "forward_s", "generated_tokens",
           "useful_tokens", "padded_tokens", "forward_cpu_wall_ratio", "mixed_steps", "held_steps"]


PREFILL_ALONE = "continuous, prefill alone"  # continuous without mixed steps: an ablation of `_SlotMixedStep`
GROUPED_JOINS = "continuous, grouped joins"  # continuous holding free slots until 4 requests can join together
VARIANTS = {PREFILL_ALONE: ("continuous", {"mixed_steps": False}),  # label -> (scheduler, run() options)
            GROUPED_JOINS: ("continuous", {"join_batch": 4})}
ORDER = (*SCHEDULERS, PREFILL_ALONE, GROUPED_JOINS)


def configurations(concurrencies: Sequence[int], schedulers: Sequence[str] = SCHEDULERS) -> list[tuple[str, int]]:
    """(scheduler, max_batch) pairs: sequential once (it has one request in flight), the others at each c."""
    pairs = [("sequential", 1)] if "sequential" in schedulers else []
    return pairs + [(s, c) for c in concurrencies for s in schedulers if s != "sequential"]


def arm_name(workload: str, scheduler: str, max_batch: int) -> str:
    """The arm of one (workload, scheduler, max_batch) in `run_grid`'s rounds."""
    return f"{workload} | {scheduler} | max_batch={max_batch}"


def run_grid(model, workloads: dict[str, Workload], configs: Sequence[tuple[str, int]], repeats: int = 1,
             timeout_ms: float = 50.0, tokenizer=None, progress: bool = True,
             repeat_only: Sequence[int] | None = None, warmup: int = 0) -> tuple[pd.DataFrame, dict]:
    """Run every configuration on every workload in `repeats` paired rounds; (a stats row per run, {key: RunResult}).

    Rounds come from `rounds.run_rounds`: each round runs every (workload, configuration) once, in a shuffled
    order, after `warmup` untimed runs of each (default none: the notebooks warm the schedulers up on short
    requests first). Keys are (workload label, scheduler, max_batch, repeat = round); a scheduler may be a label
    of `VARIANTS`. `repeat_only`: after the first round, only the configurations at these max_batch values run
    again (with the sequential baseline, which every ratio is paired with); None: all of them. Rows: the run's
    `stats()` (its `contended` flag judged on its forward time's CPU/wall ratio, given as `cpu_wall_ratio`: a
    scheduler waiting for arrivals is idle, not contended), and the timed call's `call_wall_s`,
    `call_cpu_wall_ratio` and `position` in the round."""
    def runs_in(repeat: int, scheduler: str, max_batch: int) -> bool:
        return repeat == 0 or repeat_only is None or scheduler == "sequential" or max_batch in repeat_only

    arms, keys = {}, {}
    for label, wl in workloads.items():
        for scheduler, max_batch in configs:
            name, options = VARIANTS.get(scheduler, (scheduler, {}))
            arms[arm_name(label, scheduler, max_batch)] = functools.partial(
                run, name, model, wl.requests, max_batch, timeout_ms, tokenizer=tokenizer, **options)
            keys[arm_name(label, scheduler, max_batch)] = (label, scheduler, max_batch)
    bar = "batching runs" if progress else None
    if repeat_only is None or repeats == 1:
        parts = [(run_rounds(arms, rounds=repeats, warmup=warmup, progress=bar), 0)]
    else:  # round 0: every configuration; rounds 1..: the repeated ones, numbered on
        parts = [(run_rounds(arms, rounds=1, warmup=warmup, progress=bar), 0)]
        later = {arm: fn for arm, fn in arms.items() if runs_in(1, *keys[arm][1:])}
        parts.append((run_rounds(later, rounds=repeats - 1, warmup=0, seed=1, progress=bar), 1))
    timed: dict[tuple[str, int], tuple[RunResult, pd.Series]] = {}
    for part, first_round in parts:
        calls = part.frame.set_index(["arm", "round"])
        for arm in part.arms:
            for r, result in enumerate(part.results(arm)):
                timed[(arm, first_round + r)] = (result, calls.loc[(arm, r)])
    rows, runs = [], {}
    for repeat in range(repeats):
        for label, wl in workloads.items():
            for scheduler, max_batch in configs:
                if (arm_name(label, scheduler, max_batch), repeat) not in timed:
                    continue
                result, call = timed[(arm_name(label, scheduler, max_batch), repeat)]
                result.scheduler = scheduler  # a variant keeps its label in the tables
                runs[(label, scheduler, max_batch, repeat)] = result
                stats = result.stats()
                rows.append({"workload": label, "arrival": wl.params.arrival, "rate_per_s": wl.params.rate_per_s,
                             "repeat": repeat, **stats, "cpu_wall_ratio": stats["forward_cpu_wall_ratio"],
                             "call_wall_s": call["wall_s"], "call_cpu_wall_ratio": call["cpu_wall_ratio"],
                             "position": int(call["position"])})
    return pd.DataFrame(rows), runs


def grid_rounds(grid: pd.DataFrame):
    """`run_grid`'s per-run rows as a `rounds.Rounds` (round = repeat, arm = `arm_name`, metrics such as
    tokens_per_s): what a saved summary carries in `attrs["rounds"]` so its per-round ratios can be paired again
    (07's reproduction check)."""
    arms = [arm_name(w, s, int(m)) for w, s, m in zip(grid.workload, grid.scheduler, grid.max_batch)]
    calls = grid.assign(round=grid.repeat.astype(int), arm=arms)
    return Rounds(calls, {}, list(dict.fromkeys(arms)))


def _paired_with_sequential(frame: pd.DataFrame, keys: tuple[str, str, int], metric: str, name: str) -> dict:
    """Interval columns of metric(run) / metric(the sequential run of the same workload and repeat)."""
    workload, scheduler, max_batch = keys
    sequential = frame[frame.scheduler == "sequential"].groupby(["workload", "repeat"])[metric].median()
    mine = frame[(frame.workload == workload) & (frame.scheduler == scheduler) & (frame.max_batch == max_batch)]
    pairs = [(value, sequential[(workload, r)]) for r, value in zip(mine.repeat, mine[metric])
             if (workload, r) in sequential.index]
    return paired_interval(name, [n for n, _ in pairs], [d for _, d in pairs])


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Median over repeats per (workload, scheduler, max_batch), the spread of throughput, and the same-run
    throughput and p50-latency ratios against the sequential scheduler on the same workload.

    throughput_vs_sequential and latency_p50_vs_sequential are ratios of medians; throughput_ratio_low/high the
    range of the paired repeats' ratios; each ratio also gets its paired-round geometric mean with a 95%
    interval (`<ratio>_geomean`, `<ratio>_low`, `<ratio>_high`, `<ratio>_rounds`)."""
    keys = ["workload", "scheduler", "max_batch"]
    metrics = [m for m in METRICS + ["cpu_wall_ratio"] if m in frame.columns]
    grouped = frame.groupby(keys, sort=False)
    summary = grouped[metrics].median()
    summary["tokens_per_s_spread"] = grouped["tokens_per_s"].agg(spread)
    summary["repeats"] = grouped.size()
    summary["contended"] = grouped["contended"].any()
    paired = paired_ratios(frame).groupby(keys, sort=False)
    summary["throughput_ratio_low"], summary["throughput_ratio_high"] = paired.min(), paired.max()
    summary = summary.reset_index()
    baseline = summary[summary.scheduler == "sequential"].set_index("workload")
    summary["throughput_vs_sequential"] = summary.tokens_per_s / summary.workload.map(baseline.tokens_per_s)
    summary["latency_p50_vs_sequential"] = summary.latency_p50_s / summary.workload.map(baseline.latency_p50_s)
    intervals = [{**_paired_with_sequential(frame, row, "tokens_per_s", "throughput_vs_sequential"),
                  **_paired_with_sequential(frame, row, "latency_p50_s", "latency_p50_vs_sequential")}
                 for row in zip(summary.workload, summary.scheduler, summary.max_batch)]
    return pd.concat([summary, pd.DataFrame(intervals, index=summary.index)], axis=1)


def paired_ratios(frame: pd.DataFrame) -> pd.Series:
    """Each run's throughput over the sequential run of the same workload and repeat (runs of one repeat are
    interleaved, so this pairs measurements taken minutes apart at most), indexed like `frame`."""
    sequential = frame[frame.scheduler == "sequential"].set_index(["workload", "repeat"]).tokens_per_s
    baseline = [sequential.get((w, r), math.nan) for w, r in zip(frame.workload, frame.repeat)]
    return pd.Series(frame.tokens_per_s.to_numpy() / baseline, index=pd.MultiIndex.from_frame(
        frame[["workload", "scheduler", "max_batch"]]), name="throughput_vs_sequential")


def paired_scheduler_ratio(frame: pd.DataFrame, scheduler: str, baseline: str, max_batch: int,
                           workload: str = "burst") -> pd.Series:
    """Throughput of `scheduler` over `baseline` at `max_batch` on one workload, one ratio per repeat (the two runs
    of a repeat are interleaved, minutes apart at most)."""
    rows = frame[(frame.workload == workload) & (frame.max_batch == max_batch)].set_index(["scheduler", "repeat"])
    return (rows.loc[scheduler].tokens_per_s / rows.loc[baseline].tokens_per_s).rename(f"{scheduler} / {baseline}")


def paired_scheduler_interval(frame: pd.DataFrame, scheduler: str, baseline: str, max_batch: int,
                              workload: str = "burst") -> Interval:
    """`paired_scheduler_ratio`'s per-repeat ratios as one estimate: their geometric mean with a 95% t-interval
    (`stats.ratio_interval`; one repeat gives no interval)."""
    ratios = paired_scheduler_ratio(frame, scheduler, baseline, max_batch, workload).dropna()
    return ratio_interval(ratios.to_numpy(dtype=float))


def by_concurrency(summary: pd.DataFrame, concurrencies: Sequence[int],
                   single: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (concurrency, scheduler): the sequential row repeated at every concurrency (its schedule does
    not depend on it); the concurrency-1 rows taken from `single` (a summary of max_batch=1 runs) when given."""
    parts = []
    for c in concurrencies:
        source = single if c == 1 and single is not None else summary
        parts.append(source[(source.max_batch == c) | (source.scheduler == "sequential")].assign(concurrency=c))
    table = pd.concat(parts, ignore_index=True).drop(columns="max_batch")
    order = {s: i for i, s in enumerate(ORDER)}
    return table.sort_values(["concurrency", "scheduler"], key=lambda col: col.map(order) if col.name ==
                             "scheduler" else col).reset_index(drop=True)


def _against_sequential(summary: pd.DataFrame, label: str, scheduler: str, concurrency: int) -> tuple:
    """The summary rows of workload `label`'s sequential run and of `scheduler` at `concurrency` (a clear error
    when either is missing)."""
    part = summary[summary.workload == label].set_index(["scheduler", "max_batch"])
    if ("sequential", 1) not in part.index or (scheduler, concurrency) not in part.index:
        raise InvalidParameterError(f"workload {label!r} has no sequential and {scheduler} "
                                    f"(max_batch {concurrency}) runs in the summary")
    return part.loc[("sequential", 1)], part.loc[(scheduler, concurrency)]


def answer_length_table(summary: pd.DataFrame, workloads: dict[str, Workload], concurrency: int,
                        scheduler: str = "continuous") -> pd.DataFrame:
    """One row per workload (the same prompts with other output caps): its caps, prompt and generated tokens, the
    share of the sequential scheduler's forward time spent in prefill, and `scheduler`'s throughput over the
    sequential scheduler's at `concurrency` (the ratio of medians, the range of the paired repeats, and their
    geometric mean with a 95% interval: `throughput_vs_sequential_geomean`, `_low`, `_high`, `_rounds`).

    Batching makes decode steps cheap per token and prefill barely cheaper, so at a fixed concurrency its gain
    depends on how much of the work is decode: this is that dependence, measured."""
    rows = []
    for label, wl in workloads.items():
        sequential, batched = _against_sequential(summary, label, scheduler, concurrency)
        rows.append({"workload": label, "answer_caps": f"{wl.params.min_new_tokens}-{wl.params.max_new_tokens}",
                     "prompt_tokens": sum(len(r.prompt_ids) for r in wl.requests),
                     "generated_tokens": int(sequential.generated_tokens),
                     "sequential_prefill_share": sequential.prefill_s / sequential.forward_s,
                     "throughput_vs_sequential": batched.throughput_vs_sequential,
                     "throughput_ratio_low": batched.throughput_ratio_low,
                     "throughput_ratio_high": batched.throughput_ratio_high, "repeats": int(batched.repeats),
                     **{f"throughput_vs_sequential{suffix}": batched.get(f"throughput_vs_sequential{suffix}", np.nan)
                        for suffix in ("_geomean", "_low", "_high", "_rounds")}})
    return pd.DataFrame(rows)


def equivalence(runs: dict, reference: dict[int, list[int]] | None = None) -> pd.DataFrame:
    """Per run: how many requests got exactly the reference's greedy tokens (default: the sequential run of the
    same workload and repeat), and the first request that did not."""
    rows = []
    for (label, scheduler, max_batch, repeat), result in runs.items():
        expected = reference if reference is not None else runs[(label, "sequential", 1, repeat)].tokens
        mismatched = [i for i, ids in result.tokens.items() if ids != expected.get(i)]
        rows.append({"workload": label, "scheduler": scheduler, "max_batch": max_batch, "repeat": repeat,
                     "requests": len(result.tokens), "identical": len(result.tokens) - len(mismatched),
                     "first_mismatch": mismatched[0] if mismatched else None})
    return pd.DataFrame(rows)


COMPARED_CONFIG_FIELDS = ("max_requests_per_batch", "page_size", "num_blocks", "max_batch_tokens")


def transformers_continuous_unsupported() -> str | None:
    """Why transformers' continuous batching cannot be driven here, or None. Its API is young and changes between
    releases (this comparison is written against transformers 5.24's `ContinuousBatchingConfig`)."""
    import inspect

    import transformers

    config = getattr(transformers, "ContinuousBatchingConfig", None)
    if config is None:
        return f"transformers {transformers.__version__} has no ContinuousBatchingConfig"
    fields = inspect.signature(config).parameters
    missing = [name for name in COMPARED_CONFIG_FIELDS if name not in fields]
    if missing:
        return (f"transformers {transformers.__version__}'s ContinuousBatchingConfig has no {', '.join(missing)} "
                "(the comparison is written against transformers 5.24)")
    return None


def transformers_continuous(hf_model, requests: Sequence[Request], max_batch: int, eos_token_ids: Sequence[int],
                            page_size: int = 64) -> RunResult:
    """transformers' continuous batching on the same requests (greedy), timed like ours.

    Requests are handed to its manager at their arrival times; start, first token and finish come from its
    own per-request timestamps. Its forward time and token accounting are not visible: those stats are NaN."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    blocks = max_batch * math.ceil(longest / page_size) + max_batch
    cb_config = ContinuousBatchingConfig(max_requests_per_batch=max_batch, page_size=page_size, num_blocks=blocks,
                                         max_batch_tokens=max(256, max(len(r.prompt_ids) for r in requests)))
    gen_config = GenerationConfig(do_sample=False, eos_token_id=list(eos_token_ids), pad_token_id=0,
                                  max_new_tokens=max(r.max_new_tokens for r in requests))
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    outputs = {}
    with hf_model.continuous_batching_context_manager(generation_config=gen_config, warmup=False,
                                                      continuous_batching_config=cb_config) as manager:
        t0 = time.perf_counter()
        for r in pending:
            delay = r.arrival_s - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            manager.add_request(list(r.prompt_ids), request_id=str(r.request_id), max_new_tokens=r.max_new_tokens,
                                record_timestamps=True, eos_token_id=list(eos_token_ids))
        while len(outputs) < len(requests):
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                outputs[int(out.request_id)] = out
            elif out is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped early")
        wall_s = max(o.lifespan[1] for o in outputs.values()) - t0
    records = []
    for r in sorted(requests, key=lambda r: r.request_id):
        out = outputs[r.request_id]
        ids = list(out.generated_tokens)
        records.append(RequestRecord(
            r.request_id, len(r.prompt_ids), r.max_new_tokens, r.arrival_s, out.lifespan[0] - t0,
            out.timestamps[0] - t0, out.timestamps[-1] - t0, out.lifespan[1] - t0, ids,
            "eos" if ids and ids[-1] in set(eos_token_ids) else "length", 1))
    return RunResult("transformers continuous", max_batch, math.nan, records, wall_s, math.nan, math.nan, 0, 0, 0)


def _verdict(row, ratio: str, low: float, high: float, higher_is_better: bool = True) -> str:
    """`stats.estimate_verdict` of a summary row's paired-round interval of `ratio` (a `summarize` ratio column:
    throughput_vs_sequential, or latency_p50_vs_sequential with higher_is_better=False: a latency above the
    range is worse); a row without an interval of 2 or more rounds reads 'inconclusive'."""
    return estimate_verdict(interval_from_columns(row, ratio), low, high, higher_is_better)


def _within(row, ratio: str, value: float, tolerance: float, higher_is_better: bool = True) -> str:
    """The verdict for a point estimate, read as value ± tolerance (a ratio of exactly 1.000 is never measured)."""
    return _verdict(row, ratio, value * (1 - tolerance), value * (1 + tolerance), higher_is_better)


def _point_percent(fraction: float, e) -> str:
    """A timed fraction (busy fraction) as a median without an interval: 'inconclusive' by the interval rule."""
    return estimate_verdict(Interval(100 * fraction, 100 * fraction, 100 * fraction, 1), e.low, e.high,
                            unit="%", digits=0)


def document_table(summary: pd.DataFrame, workload: str, concurrency: int = 8, tolerance: float = 0.10,
                   single_workload: str | None = None, other_workloads: Sequence[str] = ()) -> pd.DataFrame:
    """The design document's batching table beside the measured values, with a verdict per row.

    summary: `summarize(...)` of a burst grid; `workload` is its label; `single_workload` (default: the same) is
    where the concurrency-1 rows come from; `other_workloads`: labels of other backlogs (other answer lengths)
    whose continuous / sequential throughput at `concurrency` gets a row of its own against the same estimate.
    Point estimates (1x, "same") are read as ± `tolerance`."""
    est = datasets.estimates("batching").set_index(["metric", "condition"])
    single_workload = single_workload or workload

    def row(scheduler, max_batch, label=workload):
        hit = summary[(summary.workload == label) & (summary.scheduler == scheduler) & (summary.max_batch == max_batch)]
        return hit.iloc[0] if len(hit) else None

    sequential, single_seq = row("sequential", 1), row("sequential", 1, single_workload)
    rows = []
    for scheduler in ("static", "dynamic", "continuous"):
        one = row(scheduler, 1, single_workload)
        if one is not None:
            e = est.loc[("speedup", "single request throughput")]
            ratio = one.tokens_per_s / single_seq.tokens_per_s
            rows.append(["throughput, one request in flight", scheduler, e.document_text, f"{ratio:.2f}x",
                         _within(one, "throughput_vs_sequential", e.low, tolerance)])
            e = est.loc[("latency_ratio", "single request latency")]
            ratio = one.latency_p50_s / single_seq.latency_p50_s
            rows.append(["latency, one request in flight (p50)", scheduler, e.document_text, f"{ratio:.2f}x",
                         _within(one, "latency_p50_vs_sequential", e.low, tolerance, higher_is_better=False)])
    for scheduler in ("static", "dynamic", "continuous"):
        at_c = row(scheduler, concurrency)
        if at_c is None:
            continue
        e = est.loc[("speedup", "8 concurrent requests throughput")]
        ratio = at_c.tokens_per_s / sequential.tokens_per_s
        rows.append([f"throughput, {concurrency} concurrent requests", scheduler, e.document_text,
                     f"{ratio:.2f}x ({at_c.tokens_per_s:.1f} vs {sequential.tokens_per_s:.1f} tok/s)",
                     _verdict(at_c, "throughput_vs_sequential", e.low, e.high)])
        ratio = at_c.decode_tokens_per_s / sequential.decode_tokens_per_s
        rows.append([f"decode phase only (prefill excluded), {concurrency} concurrent requests", scheduler,
                     "(not in the document)", f"{ratio:.2f}x decode tokens per second of decode compute", ""])
        e = est.loc[("throughput", "8 concurrent requests")]
        rows.append([f"tokens/s, {concurrency} concurrent requests (document's model and machine)", scheduler,
                     e.document_text, f"{at_c.tokens_per_s:.1f} tok/s",  # a median, no interval: inconclusive
                     estimate_verdict(interval_from_columns(at_c, "tokens_per_s"), e.low, e.high, unit=" tok/s",
                                      digits=1)])
        ratio = at_c.latency_p50_s / sequential.latency_p50_s
        # "slightly higher": read as 1 to 1 + 5 * tolerance times the sequential latency; lower is better
        word = _verdict(at_c, "latency_p50_vs_sequential", 1.0, 1 + 5 * tolerance, higher_is_better=False)
        rows.append([f"latency p50, {concurrency} concurrent requests", scheduler,
                     est.loc[("latency", "concurrent requests")].document_text,
                     f"{ratio:.2f}x sequential ({at_c.latency_p50_s:.2f} vs {sequential.latency_p50_s:.2f} s)", word])
    for label in other_workloads:
        base, at_c = _against_sequential(summary, label, "continuous", concurrency)
        e = est.loc[("speedup", "8 concurrent requests throughput")]
        ratio = at_c.tokens_per_s / base.tokens_per_s
        rows.append([f"throughput, {concurrency} concurrent requests ({label})", "continuous", e.document_text,
                     f"{ratio:.2f}x ({at_c.tokens_per_s:.1f} vs {base.tokens_per_s:.1f} tok/s)",
                     _verdict(at_c, "throughput_vs_sequential", e.low, e.high)])
    e = est.loc[("utilization_baseline", "compute busy fraction (GPU utilization)")]
    rows.append(["busy fraction (CPU analogue of GPU utilization)", "sequential", e.document_text,
                 f"{100 * sequential.busy_fraction:.0f}%", _point_percent(sequential.busy_fraction, e)])
    e = est.loc[("utilization", "compute busy fraction (GPU utilization)")]
    for scheduler in ("static", "dynamic", "continuous"):
        at_c = row(scheduler, concurrency)
        if at_c is not None:
            rows.append([f"busy fraction, {concurrency} concurrent requests", scheduler, e.document_text,
                         f"{100 * at_c.busy_fraction:.0f}% (padding waste {100 * at_c.padding_waste:.0f}%)",
                         _point_percent(at_c.busy_fraction, e)])
    # a second analogue: how full the decode batch is with useful rows, out of `concurrency` rows; deterministic
    # (the schedule gives it, not the clock), so a point verdict is right
    base = est.loc[("utilization_baseline", "compute busy fraction (GPU utilization)")]
    occupancy = 100 * sequential.useful_rows_per_decode_step / concurrency
    rows.append([f"decode occupancy (useful rows per step / {concurrency})", "sequential", base.document_text,
                 f"{occupancy:.0f}% (one row of {concurrency}, by construction)",
                 datasets.verdict(occupancy, base.low, base.high)])
    for scheduler in ("static", "dynamic", "continuous"):
        at_c = row(scheduler, concurrency)
        if at_c is not None:
            occupancy = 100 * at_c.useful_rows_per_decode_step / concurrency
            rows.append([f"decode occupancy (useful rows per step / {concurrency})", scheduler, e.document_text,
                         f"{occupancy:.0f}%", datasets.verdict(occupancy, e.low, e.high)])
    return pd.DataFrame(rows, columns=["quantity", "scheduler", "document (estimate)", "measured", "verdict"])

