"""Does the combined notebook reproduce each optimization's effect as its own notebook measures it?

For each of the six optimizations, 07 re-measures in its own run the ratio (with / without it) that the
optimization's own notebook measures: the same llmopt measurement function, the same two arms, the same metric,
at one condition that notebook saved in its results (`data/results/`) and with the repeats it used there. The
condition is read from the results, never written here: the one cheapest to re-measure (the shortest prompt, the
smallest prefix, ...).

The test is an equivalence test on the per-round ratios of both measurements (`stats.equivalence`, TOST): the
Welch-t 90% interval of rerun / notebook (ratio of geometric means) lies inside [1/(1 + margin), 1 + margin]:
*consistent*; entirely outside it: *inconsistent*; otherwise (or fewer than 2 rounds on a side, or no per-round
values saved by the notebook: results files written before `<name>.rounds.csv`): *inconclusive*, with the reason.
The margin is fixed before measuring (07's `equivalence_margin`, default 0.15); `stats.margin_from_noise` gives
beside it the smallest margin the measured round-to-round noise could ever call consistent. Each ratio also gets
its paired-round 95% interval (`effect_interval`): columns `rerun_ratio_geomean`, `_low`, `_high`, `_rounds` and
the same for `notebook_ratio_`.

Adding an optimization on top of others on 07's own workload is another quantity, the marginal effect inside the
stack (`marginal_effects`): it is shown beside this test, not used for it.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine import batching, speculative
from ..engine import quantized_variants as qv
from ..engine.batching import Request
from ..engine.generate import Decoder
from ..errors import InvalidParameterError
from . import batching_benchmark, benchmark, datasets, harness, speculative_bench
from .attention_bench import model_benchmark
from .prefix_workload import _paired_by_repeat, cold_vs_warm, summarize
from .stats import EQUIVALENCE_OUTCOMES, equivalence, margin_from_noise
from .workload import Workload, WorkloadParams, prompt_pool

RESULTS = {  # optimization -> the results file of its own notebook that holds the compared arms
    "kv_cache": "01_kv_cache_sweep", "quantization": "03_quantization_engines",
    "prompt_caching": "04_prompt_caching", "flash_attention": "05_flash_attention_model",
    "speculative_decoding": "06_speculative_decoding", "batching": "02_batching"}
METRICS = {  # optimization -> (the metric its notebook reports, in words; its result column)
    "kv_cache": ("decode tokens/s", "decode_tokens_per_s"),
    "quantization": ("decode tokens/s", "decode_tokens_per_s"),
    "prompt_caching": ("time to first token", "time_to_first_token_s"),
    "flash_attention": ("time to first token (whole-model prefill)", "time_to_first_token_s"),
    "speculative_decoding": ("decode tokens/s", "decode_tokens_per_s"),
    "batching": ("throughput (generated tokens/s)", "tokens_per_s")}
NOTEBOOK_WARMUP = 1  # warm-up rounds of 01, 03, 04 and 05 (their `warmup` default; not saved with the results)
PYTORCH_ENGINE = " · PyTorch engine"  # 03's rows that repeat a format on the PyTorch engine
DEFAULT_MARGIN = 0.15  # ±15 %: 07's `equivalence_margin` default, fixed before measuring
NOT_COMPARED = "not compared"
TINY = {"prompt_tokens": 8, "context_tokens": 32, "new_tokens": 3, "repeats": 1, "warmup": 0}  # smoke runs


@dataclass
class Condition:
    """One optimization's effect at one condition of its own notebook: the notebook's ratio (of medians) and its
    per-round ratios (`rounds`; None where its results keep none, `rounds_note` says why), and the arguments its
    measurement needs to run again (`settings`: prompt tokens, new tokens, repeats, ...)."""
    optimization: str
    settings: dict
    ratio: float
    text: str
    rounds: np.ndarray | None = None
    rounds_note: str = ""
    interval: dict = field(default_factory=dict)  # effect_interval of the notebook's results (may be all NaN)


# ---- the two arms of each effect, picked the same way from the notebook's results and from 07's re-measurement

def _kv_cache_arms(frame: pd.DataFrame, s: dict):
    rows = frame[frame.prompt_tokens == s["prompt_tokens"]].set_index("engine")
    return rows.loc["static cache"], rows.loc["no cache"]


def _quantization_arms(frame: pd.DataFrame, s: dict):
    rows = frame.set_index("engine")
    return rows.loc[s["variant"] + PYTORCH_ENGINE], rows.loc["fp32" + PYTORCH_ENGINE]


def _prompt_caching_arms(frame: pd.DataFrame, s: dict):
    table = summarize(frame[frame.prefix_tokens == s["prefix_tokens"]]).set_index("engine")
    return table.loc["warm (hit)"], table.loc["no prefix cache"]


def _flash_attention_arms(frame: pd.DataFrame, s: dict):
    rows = frame[(frame.context_tokens == s["context_tokens"]) & ~frame.skipped.astype(bool)].set_index("backend")
    return rows.loc["sdpa"], rows.loc["naive"]


def _speculative_arms(frame: pd.DataFrame, s: dict):
    rows = frame[frame.workload == s["workload"]]
    lookup = rows[(rows.drafter == "prompt_lookup") & (rows.k == s["k"])].iloc[0]
    return lookup, rows[rows.drafter.str.startswith("plain")].iloc[0]


def _batching_arms(frame: pd.DataFrame, s: dict):
    burst = frame[frame.workload == "burst"]
    on = burst[(burst.scheduler == "continuous") & (burst.max_batch == s["concurrency"])].iloc[0]
    return on, burst[burst.scheduler == "sequential"].iloc[0]


ARMS = {"kv_cache": _kv_cache_arms, "quantization": _quantization_arms, "prompt_caching": _prompt_caching_arms,
        "flash_attention": _flash_attention_arms, "speculative_decoding": _speculative_arms,
        "batching": _batching_arms}


def effect(optimization: str, frame: pd.DataFrame, settings: dict) -> float:
    """The ratio of medians of the 'with' arm over the 'without' arm on the optimization's metric, from a frame
    shaped as its notebook's results (the saved CSV or 07's re-measurement)."""
    on, off = ARMS[optimization](frame, settings)
    metric = METRICS[optimization][1]
    return float(on[metric] / off[metric])


def _round_arms(optimization: str, settings: dict) -> tuple[str, str]:
    """The 'with' and 'without' arms of one effect in its measurement's rounds (`attrs["rounds"]`)."""
    s = settings
    if optimization == "kv_cache":
        return (benchmark.arm_name("static cache", s["prompt_tokens"]),
                benchmark.arm_name("no cache", s["prompt_tokens"]))
    if optimization == "quantization":
        return (benchmark.arm_name(s["variant"] + PYTORCH_ENGINE, s["prompt_tokens"]),
                benchmark.arm_name("fp32" + PYTORCH_ENGINE, s["prompt_tokens"]))
    if optimization == "flash_attention":
        return benchmark.arm_name("sdpa", s["context_tokens"]), benchmark.arm_name("naive", s["context_tokens"])
    if optimization == "speculative_decoding":
        return (speculative_bench.arm_name(s["workload"], "prompt_lookup", s["k"]),
                speculative_bench.arm_name(s["workload"], speculative_bench.PLAIN, 0))
    return (batching_benchmark.arm_name("burst", "continuous", s["concurrency"]),
            batching_benchmark.arm_name("burst", "sequential", 1))


def effect_rounds(optimization: str, frame: pd.DataFrame, settings: dict) -> np.ndarray | str:
    """The per-round ratios (with / without, paired by round) of one effect: the input of `stats.equivalence`;
    or why there are none (a reason). From the measurement's rounds (`attrs["rounds"]`: `benchmark.compare`,
    `attention_bench.model_benchmark`, `speculative_bench.sweep`, `batching_benchmark.grid_rounds`; a saved file's
    `<name>.rounds.csv`) or, for 04, its per-repeat rows."""
    metric = METRICS[optimization][1]
    try:
        if optimization == "prompt_caching":
            if "repeat" not in frame:
                return "results keep no per-repeat rows"
            at = frame[frame.prefix_tokens == settings["prefix_tokens"]]
            on = at[at.engine == "warm (hit)"].groupby("repeat")[metric].median()
            off = at[at.engine == "no prefix cache"].groupby("repeat")[metric].median()
            ratios = (on / off).to_numpy(dtype=float)
        else:
            timed = frame.attrs.get("rounds")
            if timed is None:
                return ("results keep no per-round values (saved without them: files written before "
                        "<name>.rounds.csv existed)")
            calls = timed.frame
            on_arm, off_arm = _round_arms(optimization, settings)
            if metric not in calls or not {on_arm, off_arm} <= set(calls["arm"]):
                raise KeyError(f"{on_arm!r} or {off_arm!r} ({metric})")
            on, off = (calls[calls["arm"] == arm].groupby("round")[metric].median() for arm in (on_arm, off_arm))
            ratios = (on / off).dropna().to_numpy(dtype=float)  # paired by round number (02 repeats some arms only)
    except (KeyError, IndexError, ValueError, InvalidParameterError) as exc:
        return f"per-round values lack this condition ({type(exc).__name__}: {exc})"
    ratios = np.asarray(ratios, dtype=float)
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    return ratios if ratios.size else "rounds have no round with both arms measured"


INTERVAL_KEYS = ("geomean", "low", "high", "rounds")


def _interval_of(columns: dict) -> dict:
    """{'geomean', 'low', 'high', 'rounds'} from `harness.paired_interval`'s or a result row's `<ratio>_*` columns."""
    return {key: next(v for k, v in columns.items() if k.endswith(f"_{key}")) for key in INTERVAL_KEYS}


def _row_interval(row: pd.Series, ratio: str) -> dict:
    """The interval columns a result row carries for one of its ratio columns (NaN when it has none)."""
    return {key: row.get(f"{ratio}_{key}", math.nan) for key in INTERVAL_KEYS}


def effect_interval(optimization: str, frame: pd.DataFrame, settings: dict) -> dict:
    """The paired-round interval of `effect`'s ratio: {'geomean', 'low', 'high', 'rounds'}, from the rounds the
    measurement carries: `benchmark.compare`'s `attrs["rounds"]` (01, 03), the per-repeat rows of 04, the
    interval columns of 06's and 02's rows. NaN (rounds 0) where there are none: 05's whole-model benchmark
    concatenates its lengths' runs, and saved CSV files keep no attrs."""
    metric = METRICS[optimization][1]
    none = {"geomean": math.nan, "low": math.nan, "high": math.nan, "rounds": 0}
    try:
        if optimization == "kv_cache":
            return _interval_of(benchmark.paired(frame, metric, "static cache", "no cache",
                                                 settings["prompt_tokens"]))
        if optimization == "quantization":
            return _interval_of(benchmark.paired(frame, metric, settings["variant"] + PYTORCH_ENGINE,
                                                 "fp32" + PYTORCH_ENGINE, settings["prompt_tokens"]))
        if optimization == "prompt_caching":
            return _interval_of(_paired_by_repeat(frame, "ratio", metric, "warm (hit)", "no prefix cache",
                                                  settings["prefix_tokens"]))
        if optimization == "speculative_decoding":
            return _row_interval(ARMS[optimization](frame, settings)[0], "speedup")
        if optimization == "batching":
            return _row_interval(ARMS[optimization](frame, settings)[0], "throughput_vs_sequential")
    except (KeyError, IndexError, ValueError):
        return none
    return none


# ---- the compared condition of each notebook, read from its results

def _read(directory: Path, name: str) -> pd.DataFrame | None:
    """A notebook's saved results (`harness.load_results`), None when that notebook has not run."""
    return harness.load_results(name, directory) if (directory / f"{name}.csv").exists() else None


def _require(directory: Path, name: str) -> pd.DataFrame:
    frame = _read(directory, name)
    if frame is None:
        raise FileNotFoundError(f"{name}.csv is not in {directory}")
    return frame


def _kv_cache_settings(frame: pd.DataFrame, directory: Path) -> tuple[dict, str]:
    shortest = int(frame.prompt_tokens.min())
    row = frame[(frame.prompt_tokens == shortest) & (frame.engine == "static cache")].iloc[0]
    s = {"prompt_tokens": shortest, "new_tokens": int(row.new_tokens), "repeats": int(row.repeats),
         "warmup": NOTEBOOK_WARMUP}
    return s, (f"01: static cache against no cache (benchmark.compare), {shortest}-token prompt (01's shortest), "
               f"{s['new_tokens']} new tokens")


def _recipe(made: pd.DataFrame, variant: str) -> dict:
    """How 03 made one of its variants (`03_quantization_variants.csv`): method, bits, group size, lm_head bits."""
    row = made.loc[variant]
    head = re.search(r"lm_head INT(\d+)", variant)  # 03 names the lm_head's bits when they differ from the rest
    return {"variant": variant, "method": row.method, "bits": None if pd.isna(row.bits) else int(row.bits),
            "group_size": None if pd.isna(row.group_size) else int(row.group_size),
            "lm_head_bits": int(head.group(1)) if head else None}


def _quantization_settings(frame: pd.DataFrame, directory: Path, variant: str) -> tuple[dict, str]:
    made = _require(directory, "03_quantization_variants").set_index("variant")
    row = frame.set_index("engine").loc[variant + PYTORCH_ENGINE]
    # 03 times its PyTorch-engine rows in a comparison of their own (interleaved with each other only): 07 runs
    # the same rows, since what a row is interleaved with moves this pair's ratio (~1.6x among 03's fused rows
    # against ~2x alone, measured in one process)
    together = [name[:-len(PYTORCH_ENGINE)] for name in frame.engine if name.endswith(PYTORCH_ENGINE)]
    s = {**_recipe(made, variant), "pytorch_rows": [_recipe(made, name) for name in together if name != "fp32"],
         "prompt_tokens": int(row.prompt_tokens), "new_tokens": int(row.new_tokens), "repeats": int(row.repeats),
         "warmup": NOTEBOOK_WARMUP}
    others = [r["variant"] for r in s["pytorch_rows"] if r["variant"] != variant]
    return s, (f"03: {variant} against fp32, both on the PyTorch engine (quantized_variants.quantized, "
               f"benchmark.compare{' with ' + ', '.join(others) if others else ''} as 03 times them), "
               f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens")


def _prompt_caching_settings(frame: pd.DataFrame, directory: Path) -> tuple[dict, str]:
    shortest = int(frame.prefix_tokens.min())
    rows = frame[frame.prefix_tokens == shortest]
    s = {"prefix_tokens": shortest, "new_tokens": int(rows.new_tokens.iloc[0]), "repeats": int(rows.repeat.nunique()),
         "warmup": NOTEBOOK_WARMUP}
    user = int(rows.prompt_tokens.iloc[0]) - shortest
    return s, (f"04: warm prefix cache (hit) against no prefix cache (prefix_workload.cold_vs_warm), "
               f"{shortest}-token shared prefix (04's shortest) + {user} user tokens, {s['new_tokens']} new tokens")


def _flash_attention_settings(frame: pd.DataFrame, directory: Path) -> tuple[dict, str]:
    ran = frame[~frame.skipped.astype(bool)]
    both = ran.groupby("context_tokens").backend.agg(lambda names: {"naive", "sdpa"} <= set(names))
    shortest = int(both[both].index.min())
    row = ran[(ran.context_tokens == shortest) & (ran.backend == "sdpa")].iloc[0]
    s = {"context_tokens": shortest, "new_tokens": int(row.new_tokens), "repeats": int(row.repeats),
         "warmup": NOTEBOOK_WARMUP}
    return s, (f"05: sdpa against naive attention, whole model (attention_bench.model_benchmark), "
               f"{shortest}-token prompt (05's shortest), {s['new_tokens']} new tokens")


def _speculative_settings(frame: pd.DataFrame, directory: Path) -> tuple[dict, str]:
    grounded = frame[(frame.drafter == "prompt_lookup") & (frame.workload != "open-ended")]
    best = grounded.loc[grounded.speedup.idxmax()]  # 06's headline row, and the fastest (cheapest) to re-measure
    s = {"workload": best.workload, "k": int(best.k), "new_tokens": int(best.new_tokens), "repeats": int(best.repeats)}
    return s, (f"06: prompt lookup k={s['k']} against the plain cached decoder (speculative_bench.sweep), "
               f"'{s['workload']}' workload ({best.prompt_tokens}-token prompt, 06's headline and fastest k), "
               f"{s['new_tokens']} new tokens")


def _batching_settings(frame: pd.DataFrame, directory: Path, concurrency: int) -> tuple[dict, str]:
    burst = frame[frame.workload == "burst"]
    continuous = burst[burst.scheduler == "continuous"]
    nearest = int(continuous.max_batch.iloc[(continuous.max_batch - concurrency).abs().argmin()])
    row = continuous[continuous.max_batch == nearest].iloc[0]
    saved = _require(directory, "02_batching_workload")
    requests = saved[saved.workload == "burst"].reset_index(drop=True)
    if requests.empty:
        raise KeyError("no burst requests in 02_batching_workload")
    first = requests.iloc[0]
    s = {"concurrency": nearest, "repeats": int(row.repeats), "timeout_ms": float(row.timeout_ms),
         "requests": requests}
    return s, (f"02: continuous at {nearest} concurrent against sequential (batching_benchmark.run_grid), 02's burst "
               f"workload rebuilt from its saved requests ({len(requests)} requests, seed {first.workload_seed}, "
               f"caps {first.workload_min_new_tokens}-{first.workload_max_new_tokens} tokens), "
               f"timeout {row.timeout_ms:g} ms")


SETTINGS = {"kv_cache": _kv_cache_settings, "quantization": _quantization_settings,
            "prompt_caching": _prompt_caching_settings, "flash_attention": _flash_attention_settings,
            "speculative_decoding": _speculative_settings, "batching": _batching_settings}


def _other_setup(frame: pd.DataFrame, model_name: str | None, dtype: str | None) -> str | None:
    """How the notebook's run differs from this one in model or dtype (None: it does not, or is not recorded)."""
    for column, ours in (("model", model_name), ("dtype", dtype)):
        if ours is not None and column in frame and str(frame[column].iloc[0]) != str(ours):
            return f"{column} {frame[column].iloc[0]} (this run: {ours})"
    return None


def read_condition(optimization: str, directory: Path, model_name: str | None = None, dtype: str | None = None,
                   **choice) -> Condition | str:
    """The condition 07 re-measures for one optimization, or why it cannot (a 'not compared: ...' line)."""
    name = RESULTS[optimization]
    frame = _read(directory, name)
    if frame is None:
        return f"not compared: {name}.csv is not in {directory} (its notebook has not run)"
    other = _other_setup(frame, model_name, dtype)
    if other:
        return f"not compared: {name} was measured with {other}"
    try:
        settings, text = SETTINGS[optimization](frame, directory, **choice)
        ratio = effect(optimization, frame, settings)
    except FileNotFoundError as exc:
        return f"not compared: {exc}"
    except (KeyError, IndexError, ValueError) as exc:
        return f"not compared: {name} lacks the rows this check reads ({type(exc).__name__}: {exc})"
    rounds = effect_rounds(optimization, frame, settings)
    note = f"{name}.csv: {rounds}" if isinstance(rounds, str) else ""
    return Condition(optimization, settings, ratio, text, None if note else rounds, note,
                     effect_interval(optimization, frame, settings))


def notebook_conditions(directory: Path | str | None = None, model_name: str | None = None, dtype: str | None = None,
                        quantization_variant: str = "INT4 RTN g64, lm_head INT8",
                        concurrency: int = 8) -> dict[str, Condition | str]:
    """Per optimization, the condition of its own notebook that 07 re-measures (or why not). `model_name`,
    `dtype`: this run's (a notebook measured on another is not compared); `quantization_variant`: 03's row
    compared with fp32; `concurrency`: 02's concurrency compared with sequential (the nearest it measured)."""
    d = Path(directory) if directory else harness.results_dir()
    choices = {"quantization": {"variant": quantization_variant}, "batching": {"concurrency": concurrency}}
    return {name: read_condition(name, d, model_name, dtype, **choices.get(name, {})) for name in RESULTS}


def tiny(conditions: dict[str, Condition | str]) -> dict[str, Condition | str]:
    """The same conditions shrunk to a few tokens, one repeat and two requests (smoke runs: every path in seconds)."""
    out = {}
    for name, c in conditions.items():
        if not isinstance(c, Condition):
            out[name] = c
            continue
        s = {key: min(value, TINY[key]) if key in TINY else value for key, value in c.settings.items()}
        changed = [f"{key} {value}" for key, value in s.items() if key in TINY and value != c.settings[key]]
        if "requests" in s:
            s["requests"] = s["requests"].head(2).assign(max_new_tokens=lambda f: f.max_new_tokens.clip(upper=2))
            changed.append("2 requests of at most 2 tokens")
        out[name] = replace(c, settings=s, text=f"{c.text} [smoke: {', '.join(changed)}]")
    return out


# ---- measuring again, as each notebook does

def batching_workload(tokenizer, requests: pd.DataFrame):
    """02's workload rebuilt from the rows it saved (`02_batching_workload.csv`): each request's prompt from its
    source in 02's prompt pool (`workload.prompt_pool`: a prompt of data/prompts.jsonl, or a held-out text slice
    `heldout:START:LENGTH`) cut to its saved length from the left as the pool cuts long prompts, with its saved
    cap and arrival. The seed and caps 02 drew are in the rows; the pool's text lengths and prompt cap are not,
    and the sources make them unnecessary."""
    pool = dict(prompt_pool(tokenizer, text_lengths=(), max_prompt_tokens=None))
    text_ids: list[int] = []
    built = []
    for r in requests.itertuples():
        kind, start, length = r.source.split(":")
        if kind == "heldout":
            text_ids = text_ids or tokenizer(datasets.evaluation_text("heldout")).input_ids
            ids = list(text_ids[int(start):int(start) + int(length)])
        elif r.source in pool:
            ids = list(pool[r.source])
        else:
            raise InvalidParameterError(f"request {r.request_id}: prompt source {r.source!r} is not in the pool")
        ids = ids[-int(r.prompt_tokens):]
        if len(ids) != r.prompt_tokens:
            raise InvalidParameterError(f"request {r.request_id}: {r.source} gives {len(ids)} tokens, "
                                        f"02 saved {r.prompt_tokens}")
        built.append(Request(int(r.request_id), tuple(ids), int(r.max_new_tokens), float(r.arrival_s), r.source))
    first = requests.iloc[0]
    params = WorkloadParams(len(built), int(first.workload_seed), str(first.workload_arrival), None,
                            int(first.workload_min_new_tokens), int(first.workload_max_new_tokens))
    return Workload(params, built)


def _measure_kv_cache(model, tokenizer, s: dict) -> pd.DataFrame:

    engines = {"no cache": benchmark.ours(Decoder(model, tokenizer, cache="none")),
               "static cache": benchmark.ours(Decoder(model, tokenizer, cache="static"))}
    return benchmark.compare(engines, [s["prompt_tokens"]], s["new_tokens"], tokenizer, s["repeats"], s["warmup"],
                             progress=False)


def _measure_quantization(model, tokenizer, s: dict) -> pd.DataFrame:

    models = {"fp32": model}  # compared only when 03's dtype is this run's (fp32)
    for r in s["pytorch_rows"]:  # every row 03 timed beside fp32 (the compared variant among them), in 03's order
        head = {"lm_head_bits": r["lm_head_bits"]} if r["lm_head_bits"] else {}
        variant = qv.quantized(model, r["variant"], r["method"], bits=r["bits"], group_size=r["group_size"], **head)
        if variant.skipped:
            raise InvalidParameterError(f"{r['variant']}: {variant.skipped}")
        models[r["variant"]] = variant.model
    engines = {name + PYTORCH_ENGINE: benchmark.ours(Decoder(m, tokenizer, cache="static"))
               for name, m in models.items()}
    return benchmark.compare(engines, [s["prompt_tokens"]], s["new_tokens"], tokenizer, s["repeats"], s["warmup"],
                             progress=False)


def _measure_prompt_caching(model, tokenizer, s: dict) -> pd.DataFrame:

    return cold_vs_warm(model, tokenizer, [s["prefix_tokens"]], s["new_tokens"], s["repeats"], s["warmup"])


def _measure_flash_attention(model, tokenizer, s: dict) -> pd.DataFrame:

    return model_benchmark(model, tokenizer, ["naive", "sdpa"], [s["context_tokens"]], s["new_tokens"],
                           s["repeats"], s["warmup"], progress=False)


def _measure_speculative(model, tokenizer, s: dict) -> pd.DataFrame:

    prompts = speculative_bench.workload_prompts(tokenizer, [s["workload"]])
    drafters = {"prompt_lookup": (speculative.make_drafter("prompt_lookup", model), [s["k"]])}
    return speculative_bench.sweep(model, tokenizer, drafters, prompts, s["new_tokens"], s["repeats"], progress=False)


def _measure_batching(model, tokenizer, s: dict) -> pd.DataFrame:

    burst = batching_workload(tokenizer, s["requests"])
    warm = [replace(r, max_new_tokens=min(2, r.max_new_tokens)) for r in burst.requests[:2]]
    for scheduler in ("sequential", "continuous"):  # 02 warms every scheduler up on two short requests
        batching.run(scheduler, model, warm, max_batch=2, timeout_ms=0, tokenizer=tokenizer)
    configs = [("sequential", 1), ("continuous", s["concurrency"])]
    grid, _ = batching_benchmark.run_grid(model, {"burst": burst}, configs, s["repeats"], s["timeout_ms"], tokenizer,
                             progress=False)
    summary = batching_benchmark.summarize(grid)
    summary.attrs["rounds"] = batching_benchmark.grid_rounds(grid)  # the per-round throughputs, paired by repeat
    return summary


MEASURES = {"kv_cache": _measure_kv_cache, "quantization": _measure_quantization,
            "prompt_caching": _measure_prompt_caching, "flash_attention": _measure_flash_attention,
            "speculative_decoding": _measure_speculative, "batching": _measure_batching}


def measure(condition: Condition, model, tokenizer) -> pd.DataFrame:
    """Run the condition's measurement again on `model`, on SDPA attention as every notebook loads it (the
    model's backend is restored afterwards); a frame shaped as the notebook's results."""
    previous = model.attention_backend
    model.set_attention("sdpa")
    try:
        return MEASURES[condition.optimization](model, tokenizer, condition.settings)
    finally:
        model.set_attention(previous)


# ---- the table

INTERVAL_COLUMNS = [f"{side}_ratio_{key}" for side in ("rerun", "notebook") for key in INTERVAL_KEYS]
COLUMNS = ["optimization", "metric", "rerun_ratio", "notebook_ratio", "rerun / notebook", "outcome",
           "equivalence_ratio", "equivalence_low", "equivalence_high", "margin", "noise_margin", "verdict", "repeats",
           "condition", "measure_s", *INTERVAL_COLUMNS]


def compare(condition: Condition, ratio: float, rerun_rounds: np.ndarray | str | None, seconds: float = math.nan,
            interval: dict | None = None, margin: float = DEFAULT_MARGIN) -> dict:
    """One row: 07's re-measured ratio beside the notebook's, and the equivalence outcome of their per-round ratios
    (`stats.equivalence(rerun, notebook, margin)`: the 90% interval of rerun / notebook against
    [1/(1 + margin), 1 + margin]). No per-round values on a side (a reason string or None) or fewer than 2 rounds:
    'inconclusive', with the reason. `noise_margin`: `stats.margin_from_noise`, the smallest margin these rounds
    could call consistent. With `interval` (the rerun's `effect_interval`) and the condition's, the paired-round
    95% intervals of both ratios (NaN where missing)."""
    band = f"±{margin:.0%} ({1 / (1 + margin):.3g}-{1 + margin:g}x)"
    outcome, low, high, estimate, noise = "inconclusive", math.nan, math.nan, math.nan, math.nan
    if condition.rounds is None:
        verdict = f"inconclusive: the notebook's {condition.rounds_note or 'per-round values are unavailable'}"
    elif rerun_rounds is None or isinstance(rerun_rounds, str):
        verdict = f"inconclusive: the re-measurement's {rerun_rounds or 'per-round values are unavailable'}"
    else:
        outcome, result = equivalence(rerun_rounds, condition.rounds, margin)
        estimate, low, high = result.estimate, result.low, result.high
        if result.single:
            verdict = (f"inconclusive: fewer than 2 rounds on a side (notebook {len(condition.rounds)}, "
                       f"re-measurement {len(rerun_rounds)}): no interval")
        else:
            noise = margin_from_noise(rerun_rounds, condition.rounds)
            verdict = (f"{outcome}: rerun / notebook {estimate:.2f}x (90% CI {low:.2f}-{high:.2f}, "
                       f"{len(rerun_rounds)} and {len(condition.rounds)} rounds) against {band}")
    return {"optimization": condition.optimization, "metric": f"{METRICS[condition.optimization][0]} with / without",
            "rerun_ratio": ratio, "notebook_ratio": condition.ratio, "rerun / notebook": ratio / condition.ratio,
            "outcome": outcome, "equivalence_ratio": estimate, "equivalence_low": low, "equivalence_high": high,
            "margin": margin, "noise_margin": noise, "verdict": verdict,
            "repeats": condition.settings.get("repeats"), "condition": condition.text, "measure_s": seconds,
            **{f"{side}_ratio_{key}": (values or {}).get(key, math.nan)
               for side, values in (("rerun", interval), ("notebook", condition.interval)) for key in INTERVAL_KEYS}}


def _not_compared(name: str, why: str) -> dict:
    return {"optimization": name, "metric": f"{METRICS[name][0]} with / without", "outcome": NOT_COMPARED,
            "verdict": why}


def _reproduce_one(name: str, condition: Condition | str, model, tokenizer, margin: float) -> dict:
    if not isinstance(condition, Condition):
        return _not_compared(name, condition)
    start = time.perf_counter()
    try:
        frame = measure(condition, model, tokenizer)
    except InvalidParameterError as exc:  # e.g. a saved workload this tokenizer cannot rebuild
        return _not_compared(name, f"not compared: {exc}")
    seconds = time.perf_counter() - start
    return compare(condition, effect(name, frame, condition.settings), effect_rounds(name, frame, condition.settings),
                   seconds, effect_interval(name, frame, condition.settings), margin)


def reproduce(conditions: dict[str, Condition | str], model, tokenizer, margin: float = DEFAULT_MARGIN
              ) -> pd.DataFrame:
    """Re-measure every condition (`notebook_conditions`) on `model` and test each effect's equivalence with its
    notebook's (`compare`, at `margin`); a condition that could not be read or rebuilt gives a row that says why
    (outcome 'not compared')."""
    if not margin > 0:
        raise InvalidParameterError(f"margin must be positive (0.15 means ratios within 15%), got {margin}")
    rows = [_reproduce_one(name, conditions.get(name, "not compared: no condition"), model, tokenizer, margin)
            for name in RESULTS]
    return pd.DataFrame(rows, columns=COLUMNS)


def counts(table: pd.DataFrame) -> dict[str, int]:
    """How many rows are consistent, inconclusive, inconsistent, not compared, and in all (inconclusive is never
    counted as consistent)."""
    found = table.outcome.value_counts()
    return {**{name: int(found.get(name, 0)) for name in (*EQUIVALENCE_OUTCOMES, NOT_COMPARED)}, "total": len(table)}


def counts_text(tally: dict[str, int]) -> str:
    """E.g. 'consistent 4, inconclusive 2, inconsistent 0' (and ', not compared 1' where some were not)."""
    text = ", ".join(f"{name} {tally[name]}" for name in ("consistent", "inconclusive", "inconsistent"))
    return text + (f", not compared {tally[NOT_COMPARED]}" if tally.get(NOT_COMPARED) else "")


# ---- the stack's own steps: a different quantity

MARGINAL_COLUMNS = ["optimization", "metric", "step", "marginal_ratio", "single_ratio", "marginal / single",
                    *[f"marginal_ratio_{key}" for key in INTERVAL_KEYS]]


def _stack_interval(run: pd.DataFrame, metric: str, on: str, off: str) -> dict:
    """The paired-round interval of metric(on) / metric(off) from `combined.measure`'s rounds (`run.attrs`)."""
    timed = run.attrs.get("rounds")
    if timed is None or not {on, off} <= set(timed.arms) or metric not in timed.frame.columns:
        return {"geomean": math.nan, "low": math.nan, "high": math.nan, "rounds": 0}
    return _interval_of(harness.paired_interval("ratio", timed.values(on, metric), timed.values(off, metric)))


def marginal_effects(run: pd.DataFrame, order: list[str], labels: dict[str, str], batching: float | None = None,
                     singles: pd.DataFrame | None = None) -> pd.DataFrame:
    """The marginal effect inside the stack: per optimization, the stack that adds it over the stack before it
    (07's workload, `order` of stacking; `labels`: optimization -> configuration name), on the metric of
    `METRICS` (ratio of medians). `batching`: continuous / sequential on the stacked model; `singles`: the
    `reproduce` table, whose re-measured single effect is shown beside for reading. With `combined.measure`'s
    rounds in `run.attrs`, each step also gets its paired-round interval (`marginal_ratio_geomean`, `_low`,
    `_high`, `_rounds`)."""
    table = run.set_index("configuration")
    single = singles.set_index("optimization").rerun_ratio if singles is not None else pd.Series(dtype=float)
    steps, previous = [], "baseline"
    for name in order:
        metric = METRICS[name][1]
        ratio = float(table.loc[labels[name], metric] / table.loc[previous, metric])
        steps.append((name, f"'{previous}' -> '{labels[name]}'", ratio,
                      _stack_interval(run, metric, labels[name], previous)))
        previous = labels[name]
    if batching is not None:
        steps.append(("batching", "continuous / sequential on the stacked model", float(batching), {}))
    rows = []
    for name, step, ratio, interval in steps:
        alone = single.get(name, math.nan)
        rows.append({"optimization": name, "metric": f"{METRICS[name][0]} with / without", "step": step,
                     "marginal_ratio": ratio, "single_ratio": alone, "marginal / single": ratio / alone,
                     **{f"marginal_ratio_{key}": interval.get(key, math.nan) for key in INTERVAL_KEYS}})
    return pd.DataFrame(rows, columns=MARGINAL_COLUMNS)
