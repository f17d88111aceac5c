"""The five benchmark loops run on `rounds.run_rounds` (issue 24, "one measurement loop"): each arm runs its
warm-up and then once per round, every ratio they compute comes with its paired-round interval, and every timing
frame says how much CPU its calls got (cpu_wall_ratio) and whether they waited for cores (contended)."""
from __future__ import annotations

import ast
import math
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llmopt.bench import benchmark, combined, harness, reproduction
from llmopt.bench.rounds import Rounds
from llmopt.engine.generate import Decoder, Generation
from llmopt.engine.testing import tiny_model
from llmopt.hardware import contended

BENCH = Path(benchmark.__file__).parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a shared machine 2 threads make them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_interval(row, name: str, rounds: int):
    """`<name>_geomean` lies in [`<name>_low`, `<name>_high`] over `rounds` paired rounds."""
    low, estimate, high = row[f"{name}_low"], row[f"{name}_geomean"], row[f"{name}_high"]
    assert low <= estimate * (1 + 1e-12) and estimate <= high * (1 + 1e-12), (name, low, estimate, high)
    assert row[f"{name}_rounds"] == rounds


def assert_timing_columns(frame: pd.DataFrame):
    assert {"cpu_wall_ratio", "contended"} <= set(frame.columns)
    assert frame.cpu_wall_ratio.notna().all() and frame.contended.map(lambda v: isinstance(v, (bool, np.bool_))).all()


# ---- the shared helpers ----------------------------------------------------------------------------------------

def test_paired_interval_is_paired_ratio_and_skips_rounds_without_a_value():
    from llmopt.bench.stats import paired_ratio

    columns = harness.paired_interval("speedup", [4.0, 6.0, float("nan"), 5.0], [2.0, 2.0, 1.0, 2.5])
    interval = paired_ratio([4.0, 6.0, 5.0], [2.0, 2.0, 2.5])
    assert columns == {"speedup_geomean": interval.estimate, "speedup_low": interval.low,
                       "speedup_high": interval.high, "speedup_rounds": 3}
    empty = harness.paired_interval("x", [], [])
    assert math.isnan(empty["x_geomean"]) and empty["x_rounds"] == 0


def test_harness_measure_is_run_rounds_with_one_arm():
    calls = []
    timing = harness.measure(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and timing.results == [3, 4, 5] and len(timing.wall_s) == len(timing.cpu_s) == 3
    timing.threads = 4
    assert timing.contended == contended(timing.cpu_wall_ratio, 4)


# ---- benchmark.compare -------------------------------------------------------------------------------------------

class Words:
    """A tokenizer stand-in: one id per character."""

    def __call__(self, text):
        return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()


def fake_engine(calls: list, name: str, step_s: float):
    def run(prompt_ids, new_tokens):
        calls.append((name, len(prompt_ids)))
        times = [step_s * (i + 1) for i in range(new_tokens)]
        return Generation(list(prompt_ids), list(range(new_tokens)), token_times_s=times)
    return run


def test_compare_runs_warmup_then_rounds_and_gives_ratio_intervals():
    calls = []
    engines = {"slow": fake_engine(calls, "slow", 0.02), "fast": fake_engine(calls, "fast", 0.01)}
    frame = benchmark.compare(engines, [4, 8], 3, Words(), repeats=3, warmup=2, progress=False)
    counts = Counter(calls)
    assert counts == {("slow", 4): 2 + 3, ("fast", 4): 2 + 3, ("slow", 8): 3, ("fast", 8): 3}  # warm-up: 1st length
    assert_timing_columns(frame)
    assert (frame.repeats == 3).all() and "contended_calls" in frame
    # the old columns keep their meaning: medians over the rounds
    timed = frame.attrs["rounds"]
    assert isinstance(timed, Rounds) and timed.rounds == 3 and len(timed.frame) == 12
    row = frame.set_index(["engine", "prompt_tokens"]).loc[("fast", 8)]
    values = timed.values(benchmark.arm_name("fast", 8), "decode_tokens_per_s")
    assert row.decode_tokens_per_s == pytest.approx(statistics.median(values)) == pytest.approx(100.0)
    assert row.per_token_latency_ms == pytest.approx(10.0)
    walls = timed.values(benchmark.arm_name("fast", 8))
    assert row.end_to_end_tokens_per_s == pytest.approx(statistics.median(3 / walls))
    # ratios: of medians as before, and their paired-round intervals
    table = benchmark.ratio_intervals(frame, "decode_tokens_per_s", "slow").set_index(["prompt_tokens", "engine"])
    name = "decode_tokens_per_s / slow"
    assert table.loc[(4, "fast"), name] == pytest.approx(2.0)
    assert benchmark.ratios(frame, "decode_tokens_per_s", "slow").loc[4, "fast / slow"] == table.loc[(4, "fast"), name]
    for key in table.index:
        assert_interval(table.loc[key], name, 3)
    assert table.loc[(8, "fast"), f"{name}_geomean"] == pytest.approx(2.0)
    # frames of several runs cannot be paired: a concat drops the rounds, the intervals are NaN (no error)
    both = pd.concat([frame, benchmark.compare(engines, [4], 3, Words(), repeats=1, warmup=0, progress=False)])
    assert "rounds" not in both.attrs
    assert benchmark.paired(both, "decode_tokens_per_s", "fast", "slow", 4)[f"{name}_rounds"] == 0


def test_latency_by_position_runs_each_engine_once_and_says_whether_it_was_contended():
    calls = []
    frame = benchmark.latency_by_position({"a": fake_engine(calls, "a", 0.01), "b": fake_engine(calls, "b", 0.02)},
                                          [1, 2, 3], 4)
    assert sorted(calls) == [("a", 3), ("b", 3)] and len(frame) == 2 * 3
    assert frame[frame.engine == "b"].latency_ms.tolist() == pytest.approx([20.0] * 3)
    assert_timing_columns(frame)


# ---- combined.measure and cumulative --------------------------------------------------------------------------

def fake_configuration(calls: list, name: str, step_s: float):
    def run(prompts, new_tokens):
        calls.append((name, len(prompts), new_tokens))
        return [Generation(list(p), [1] * new_tokens, token_times_s=[step_s * (i + 1) for i in range(new_tokens)])
                for p in prompts]
    return run


def test_combined_measure_runs_warmup_then_rounds_and_cumulative_gives_intervals():
    calls = []
    configurations = {"baseline": fake_configuration(calls, "baseline", 0.02),
                      "a": fake_configuration(calls, "a", 0.01)}
    frame = combined.measure(configurations, [[1, 2], [3, 4]], 6, repeats=3, warmup=1, progress=False)
    assert Counter(calls) == {("baseline", 1, combined.WARMUP_TOKENS): 1, ("a", 1, combined.WARMUP_TOKENS): 1,
                              ("baseline", 2, 6): 3, ("a", 2, 6): 3}
    assert_timing_columns(frame)
    timed = frame.attrs["rounds"]
    row = frame.set_index("configuration").loc["a"]
    assert row.workload_s == pytest.approx(statistics.median(timed.values("a")))
    assert row.decode_tokens_per_s == pytest.approx(100.0) and row.repeats == 3
    steps = combined.cumulative(frame, ["a"]).set_index("step")
    assert steps.loc["a", "cumulative_speedup"] == frame.workload_s.iloc[0] / row.workload_s  # of medians
    for step in ("baseline", "a"):
        assert_interval(steps.loc[step], "step_speedup", 3)
        assert_interval(steps.loc[step], "cumulative_speedup", 3)
    assert steps.loc["baseline", "cumulative_speedup_geomean"] == pytest.approx(1.0)
    ratios = timed.values("baseline") / timed.values("a")
    assert steps.loc["a", "cumulative_speedup_geomean"] == pytest.approx(math.exp(np.log(ratios).mean()))
    # the marginal table of 07 takes the same rounds for each stack step
    marginal = reproduction.marginal_effects(frame, ["kv_cache"], {"kv_cache": "a"}).iloc[0]
    assert marginal.marginal_ratio == pytest.approx(2.0) and marginal.marginal_ratio_geomean == pytest.approx(2.0)
    assert marginal.marginal_ratio_rounds == 3


# ---- speculative_bench.sweep ----------------------------------------------------------------------------------

def test_sweep_runs_warmup_then_rounds_and_gives_speedup_intervals(monkeypatch):
    from llmopt.bench import speculative_bench
    from llmopt.engine.speculative import PromptLookupDrafter, SpeculativeDecoder

    target = tiny_model(seed=0)
    calls = Counter()

    def counting(original):
        def generate(self, prompt, config, *args, **kwargs):
            calls[(type(self).__name__, getattr(self, "k", 0), config.max_new_tokens)] += 1
            return original(self, prompt, config, *args, **kwargs)
        return generate

    for cls in (Decoder, SpeculativeDecoder):
        monkeypatch.setattr(cls, "generate", counting(cls.generate))
    prompt = [5, 17, 23, 5, 17, 40, 41, 42, 5, 17]
    rows = speculative_bench.sweep(target, None, {"prompt_lookup": (PromptLookupDrafter(), [2, 3])},
                                   {"w": prompt, "v": prompt[2:]}, new_tokens=8, repeats=3, warmup_tokens=2,
                                   progress=False)
    assert calls == {("Decoder", 0, 2): 2, ("Decoder", 0, 8): 2 * 3, ("SpeculativeDecoder", 2, 2): 2,
                     ("SpeculativeDecoder", 2, 8): 2 * 3, ("SpeculativeDecoder", 3, 2): 2,
                     ("SpeculativeDecoder", 3, 8): 2 * 3}
    assert list(zip(rows.workload, rows.drafter, rows.k)) == [(w, d, k) for w in ("w", "v") for d, k in (
        (speculative_bench.PLAIN, 0), ("prompt_lookup", 2), ("prompt_lookup", 3))]
    assert_timing_columns(rows)
    assert rows.tokens_identical.all() and (rows.repeats == 3).all()
    timed = rows.attrs["rounds"]
    for row in rows.itertuples():
        arm = speculative_bench.arm_name(row.workload, row.drafter, row.k)
        plain = speculative_bench.arm_name(row.workload, speculative_bench.PLAIN, 0)
        decode = timed.values(arm, "decode_tokens_per_s")
        assert row.decode_tokens_per_s == pytest.approx(statistics.median(decode))  # old column: the median
        assert row.speedup == pytest.approx(statistics.median(decode)
                                            / statistics.median(timed.values(plain, "decode_tokens_per_s")))
        assert_interval(rows.loc[row.Index], "speedup", 3)
        assert_interval(rows.loc[row.Index], "end_to_end_speedup", 3)
    assert rows[rows.k == 0].speedup_geomean.tolist() == pytest.approx([1.0, 1.0])


# ---- prefix_workload.cold_vs_warm -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from llmopt.engine.loading import default_checkpoint_dir

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


def test_cold_vs_warm_runs_warmup_then_rounds_and_summarize_gives_intervals(tokenizer, monkeypatch):
    from llmopt.bench import prefix_workload as w

    model = tiny_model("llama", seed=5, vocab_size=49152, max_position_embeddings=256)
    calls = Counter()
    original = Decoder.generate

    def counting(self, prompt, config, *args, **kwargs):
        result = original(self, prompt, config, *args, **kwargs)
        kind = "plain" if self.prefix_cache is None else "hit" if result.prefix_cached_tokens else "miss"
        calls[(kind, config.max_new_tokens)] += 1
        return result

    monkeypatch.setattr(Decoder, "generate", counting)
    frame = w.cold_vs_warm(model, tokenizer, [50, 60], new_tokens=2, repeats=3, warmup=1)
    # warm-up round (first length): plain, cold, warm; per (length, round): the warm cache filled untimed
    # (one token), then the three timed calls
    assert calls == {("plain", 2): 1 + 2 * 3, ("miss", 2): 1 + 2 * 3, ("hit", 2): 1 + 2 * 3, ("miss", 1): 2 * 3}
    assert len(frame) == 3 * 2 * 3 and list(frame.repeat) == [0] * 6 + [1] * 6 + [2] * 6
    assert_timing_columns(frame)
    assert sorted(frame[frame.repeat == 1].position) == list(range(6))
    warm, cold = frame[frame.engine == "warm (hit)"], frame[frame.engine == "cold (miss)"]
    assert (warm.processed_tokens == 20).all() and (cold.cached_tokens == 0).all()
    assert w.equivalence(frame).all().all()
    table = w.summarize(frame).set_index(["engine", "prefix_tokens"])
    row = table.loc[("warm (hit)", 50)]
    at = frame[frame.prefix_tokens == 50].set_index(["engine", "repeat"])
    assert row.time_to_first_token_s == statistics.median(at.loc["warm (hit)"].time_to_first_token_s)
    assert row["time_to_first_token_s / no cache"] == pytest.approx(
        row.time_to_first_token_s / table.loc[("no prefix cache", 50), "time_to_first_token_s"])
    ratios = at.loc["warm (hit)"].time_to_first_token_s / at.loc["no prefix cache"].time_to_first_token_s
    assert row["time_to_first_token_s / no cache_geomean"] == pytest.approx(math.exp(np.log(ratios).mean()))
    for key in table.index:
        for name in ("time_to_first_token_s / no cache", "end_to_end_s / no cache", "time_to_first_token_s / cold"):
            assert_interval(table.loc[key], name, 3)
    assert {"cpu_wall_ratio", "contended"} <= set(table.columns)


def test_the_multi_tenant_replay_records_each_requests_cpu_share(tokenizer):
    from llmopt.bench import prefix_workload as w

    model = tiny_model("llama", seed=5, vocab_size=49152, max_position_embeddings=512)
    frame = w.multi_tenant(model, tokenizer, requests=3, tenants=2, users=2)
    assert_timing_columns(frame)
    assert (frame.end_to_end_s >= frame.time_to_first_token_s).all()


# ---- batching_benchmark.run_grid ------------------------------------------------------------------------------

def test_run_grid_runs_warmup_then_rounds_and_summarize_gives_intervals(monkeypatch):
    from llmopt.bench import batching_benchmark as bench
    from llmopt.bench import workload

    model = tiny_model("llama", seed=3)
    calls = Counter()
    original = bench.run

    def counting(name, model, requests, max_batch, *args, **kwargs):
        calls[(name, max_batch)] += 1
        return original(name, model, requests, max_batch, *args, **kwargs)

    monkeypatch.setattr(bench, "run", counting)
    pool = workload.random_pool(model.config.vocab_size, 8, 2, 12, seed=2)
    wl = workload.make_workload(pool, 4, seed=1, min_new_tokens=2, max_new_tokens=4)
    configs = [("sequential", 1), ("continuous", 2), ("dynamic", 2), ("continuous", 3)]
    frame, runs = bench.run_grid(model, {"burst": wl}, configs, repeats=3, timeout_ms=0, progress=False,
                                 warmup=1)
    assert calls == {("sequential", 1): 1 + 3, ("continuous", 2): 1 + 3, ("dynamic", 2): 1 + 3,
                     ("continuous", 3): 1 + 3}
    assert len(frame) == 12 and sorted(runs) == sorted((("burst", s, c, r) for s, c in configs for r in range(3)))
    assert_timing_columns(frame)
    assert (frame.cpu_wall_ratio == frame.forward_cpu_wall_ratio).all() and frame.call_wall_s.gt(0).all()
    assert (frame.contended == [contended(r, torch.get_num_threads()) for r in frame.cpu_wall_ratio]).all()
    summary = bench.summarize(frame).set_index(["scheduler", "max_batch"])
    assert_timing_columns(summary)
    paired = bench.paired_ratios(frame).loc[("burst", "continuous", 2)]
    row = summary.loc[("continuous", 2)]
    assert (row.throughput_ratio_low, row.throughput_ratio_high) == (paired.min(), paired.max())  # unchanged
    assert row.throughput_vs_sequential == pytest.approx(
        row.tokens_per_s / summary.loc[("sequential", 1), "tokens_per_s"])
    assert row.throughput_vs_sequential_geomean == pytest.approx(math.exp(np.log(paired.to_numpy()).mean()))
    for key in summary.index:
        assert_interval(summary.loc[key], "throughput_vs_sequential", 3)
        assert_interval(summary.loc[key], "latency_p50_vs_sequential", 3)
    interval = bench.paired_scheduler_interval(frame, "continuous", "dynamic", 2)
    ratios = bench.paired_scheduler_ratio(frame, "continuous", "dynamic", 2)
    assert interval.rounds == 3 and interval.low <= interval.estimate <= interval.high
    assert interval.estimate == pytest.approx(math.exp(np.log(ratios.to_numpy()).mean()))
    # repeat_only: round 0 runs everything, later rounds the listed concurrencies and the sequential baseline
    calls.clear()
    partial, _ = bench.run_grid(model, {"burst": wl}, configs, repeats=3, timeout_ms=0, progress=False,
                                repeat_only=[3])
    assert calls == {("sequential", 1): 3, ("continuous", 2): 1, ("dynamic", 2): 1, ("continuous", 3): 3}
    assert list(partial.repeat) == [0, 0, 0, 0, 1, 1, 2, 2]
    once = bench.summarize(partial).set_index(["scheduler", "max_batch"]).loc[("continuous", 2)]
    assert once.throughput_vs_sequential_rounds == 1
    assert once.throughput_vs_sequential_low == once.throughput_vs_sequential_high  # one round: no interval


# ---- reproduction: the rerun's ratio with its interval ---------------------------------------------------------

def test_each_effect_gets_the_interval_of_its_paired_rounds():
    calls = []
    engines = {"no cache": fake_engine(calls, "no cache", 0.04), "static cache": fake_engine(calls, "static", 0.01)}
    frame = benchmark.compare(engines, [4], 3, Words(), repeats=2, warmup=0, progress=False)
    kv = reproduction.effect_interval("kv_cache", frame, {"prompt_tokens": 4})
    assert kv["geomean"] == pytest.approx(4.0) and kv["rounds"] == 2 and kv["low"] <= kv["high"]
    rows = pd.DataFrame([{"engine": e, "prefix_tokens": 50, "repeat": r, "time_to_first_token_s": t}
                         for r, (plain, hit) in enumerate(((0.4, 0.1), (0.5, 0.1), (0.45, 0.1)))
                         for e, t in (("no prefix cache", plain), ("warm (hit)", hit))])
    cached = reproduction.effect_interval("prompt_caching", rows, {"prefix_tokens": 50})
    assert cached["rounds"] == 3 and cached["geomean"] == pytest.approx((0.25 * 0.2 * 0.1 / 0.45) ** (1 / 3))
    saved = pd.DataFrame({"workload": ["w", "w"], "drafter": ["plain (cached)", "prompt_lookup"], "k": [0, 5],
                          "speedup": [1.0, 2.0]})  # results saved before the rounds: no interval, no error
    assert math.isnan(reproduction.effect_interval("speculative_decoding", saved, {"workload": "w", "k": 5})["geomean"])
    c = reproduction.Condition("kv_cache", {"repeats": 2}, 3.0, "", None, "no rounds", kv)
    row = reproduction.compare(c, 3.2, None, 1.0, kv)
    assert row["rerun_ratio_geomean"] == row["notebook_ratio_geomean"] == kv["geomean"]
    assert set(reproduction.INTERVAL_COLUMNS) <= set(reproduction.COLUMNS)


# ---- no module but rounds.py times arms in a loop of its own --------------------------------------------------

# (module, top-level function or class) -> why its clock reading is not the timing of an arm
TIMING_EXCEPTIONS = {
    ("rounds.py", "run_rounds"): "the one measurement loop",
    ("benchmark.py", "transformers_generate"): "per-token times inside one generation (a streamer's clock)",
    ("peers.py", "llama_cpp_engine"): "per-token times inside one llama.cpp generation",
    ("batching_benchmark.py", "transformers_continuous"): "the arrival clock that hands requests over on time",
    ("combined.py", "StackRunner"): "how long quantizing the model once took (setup, not an arm)",
    ("reproduction.py", "_reproduce_one"): "how long a re-measurement took (the measure_s column)",
    ("bandwidth.py", "_passes"): "best-of-N memory read bandwidth: a machine limit, not arms compared",
    ("attention_bench.py", "_profiled_call"): "the profiled warm-up call's time, which sizes the op's rounds",
}
CLOCKS = {"perf_counter", "process_time", "monotonic", "time", "perf_counter_ns", "process_time_ns"}


def clock_readings(path: Path) -> list[tuple[str, int]]:
    """(top-level function or class, line) of every `time.<clock>()` call in a module."""
    tree = ast.parse(path.read_text())
    found = []
    for top in tree.body:
        for node in ast.walk(top):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in CLOCKS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "time"):
                found.append((getattr(top, "name", "<module>"), node.lineno))
    return found


def test_only_rounds_py_times_arms():
    readings = {(path.name, name): line for path in sorted(BENCH.glob("*.py")) for name, line in clock_readings(path)}
    unexpected = {key: line for key, line in readings.items() if key not in TIMING_EXCEPTIONS}
    assert not unexpected, f"time arms with rounds.run_rounds, or list the reading as an exception: {unexpected}"
    assert ("rounds.py", "run_rounds") in readings
    for module in ("benchmark.py", "combined.py", "speculative_bench.py", "prefix_workload.py",
                   "batching_benchmark.py", "harness.py"):
        assert "from tqdm" not in (BENCH / module).read_text(), f"{module}: run_rounds draws the progress bar"


def test_one_contention_rule():
    """`hardware.contended` is the rule; no bench module writes its own threshold."""
    rule = re.compile(r"(0\.5|CONTENDED_FRACTION)\s*\*\s*\w*threads")
    offenders = [path.name for path in BENCH.glob("*.py") if rule.search(path.read_text())]
    assert offenders == []
