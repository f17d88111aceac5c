"""Unit tests of llmopt.bench.rounds: the paired-round loop with cheap fake arms (no model, no timing asserts)."""
from __future__ import annotations

import math
from collections import Counter

import pandas as pd
import pytest
import torch

from llmopt.bench import rounds as rounds_module
from llmopt.bench.rounds import Rounds, run_rounds
from llmopt.bench.stats import paired_ratio
from llmopt.errors import InvalidParameterError
from llmopt.hardware import CONTENDED_FRACTION, contended


def counting_arms(names, calls):
    """Arms that log their calls and return how many times they have been called."""
    def arm(name):
        def call():
            calls.append(name)
            return sum(1 for c in calls if c == name)
        return call
    return {name: arm(name) for name in names}


def sequence_arm(values):
    it = iter(values)
    return lambda: next(it)


def test_each_arm_is_called_warmup_plus_rounds_times():
    calls = []
    result = run_rounds(counting_arms(["a", "b", "c"], calls), rounds=4, warmup=2)
    assert Counter(calls) == {"a": 6, "b": 6, "c": 6}
    assert len(result.frame) == 12 and result.rounds == 4
    assert list(result.frame.columns[:8]) == ["round", "arm", "position", "wall_s", "cpu_s", "cpu_wall_ratio",
                                              "threads", "contended"]


def test_every_round_holds_each_arm_once_and_positions_follow_the_call_order():
    calls = []
    result = run_rounds(counting_arms(["a", "b", "c", "d"], calls), rounds=5, warmup=1)
    for _, group in result.frame.groupby("round"):
        assert sorted(group["arm"]) == ["a", "b", "c", "d"]
        assert sorted(group["position"]) == [0, 1, 2, 3]
    timed = calls[4:]  # after one warm-up call per arm
    ordered = result.frame.sort_values(["round", "position"])["arm"].tolist()
    assert timed == ordered


def orders(result: Rounds) -> list[tuple[str, ...]]:
    frame = result.frame.sort_values(["round", "position"])
    return [tuple(group["arm"]) for _, group in frame.groupby("round")]


def test_shuffle_is_reproducible_with_the_seed_and_varies_across_rounds():
    arms = {name: (lambda: None) for name in "abcd"}
    first = orders(run_rounds(arms, rounds=6, warmup=0, seed=7))
    assert first == orders(run_rounds(arms, rounds=6, warmup=0, seed=7))
    assert len(set(first)) > 1
    assert first != orders(run_rounds(arms, rounds=6, warmup=0, seed=8))


def test_alternate_rotates_the_starting_arm():
    arms = {name: (lambda: None) for name in "abc"}
    result = run_rounds(arms, rounds=4, warmup=0, order="alternate")
    assert orders(result) == [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b"), ("a", "b", "c")]


def test_ratio_pairs_metrics_by_round():
    # per-round ratios are exactly 2, but any unpaired combination would differ
    arms = {"fast": sequence_arm([2.0, 8.0, 3.0, 50.0]), "slow": sequence_arm([1.0, 4.0, 1.5, 25.0])}
    result = run_rounds(arms, rounds=4, warmup=0, metrics=lambda tokens: {"tokens": tokens})
    interval = result.ratio("fast", "slow", metric="tokens")
    assert (interval.estimate, interval.low, interval.high) == (pytest.approx(2.0),) * 3
    assert result.round_ratios("fast", "slow", "tokens").tolist() == pytest.approx([2.0] * 4)
    assert result.results("fast") == [2.0, 8.0, 3.0, 50.0]
    assert result.values("slow", "tokens").tolist() == [1.0, 4.0, 1.5, 25.0]


def test_ratio_is_paired_ratio_of_the_rounds_and_speedup_is_baseline_over_arm():
    arms = {"base": sequence_arm([3.0, 5.0, 4.0]), "opt": sequence_arm([1.0, 2.0, 1.5])}
    result = run_rounds(arms, rounds=3, warmup=0, order="alternate", metrics=lambda x: {"time": x})
    assert result.ratio("base", "opt", "time") == paired_ratio([3.0, 5.0, 4.0], [1.0, 2.0, 1.5])
    assert result.speedup("base", "opt", "time") == result.ratio("base", "opt", "time")
    assert result.speedup("base", "opt", "time").estimate > 1
    assert result.median("opt", "time") == 1.5
    assert result.speedup("base", "opt").rounds == 3  # on wall time by default


def test_add_rate_gives_a_throughput_column_to_take_ratios_on():
    arms = {"a": lambda: 10, "b": lambda: 20}
    result = run_rounds(arms, rounds=2, warmup=0, metrics=lambda n: {"tokens": n})
    name = result.add_rate("tokens")
    assert name == "tokens_per_s"
    frame = result.frame
    assert (frame[name] == frame["tokens"] / frame["wall_s"]).all()
    assert result.ratio("b", "a", name).rounds == 2


def test_one_round_gives_a_single_round_interval():
    result = run_rounds({"a": lambda: 2.0, "b": lambda: 1.0}, rounds=1, metrics=lambda x: {"v": x})
    assert result.ratio("a", "b", "v").method == "single round"


def test_contended_rule():
    assert CONTENDED_FRACTION == 0.5
    assert contended(0.9, 2) and not contended(1.1, 2)
    assert contended(1.9, 4) and not contended(2.0, 4)
    assert not contended(0.05, 1)  # one thread: waiting is not contention
    assert not contended(math.nan, 2)


def test_the_contended_column_follows_the_rule():
    result = run_rounds({"a": lambda: sum(range(1000)), "b": lambda: None}, rounds=3, warmup=0)
    frame = result.frame
    expected = [contended(r, t) for r, t in zip(frame["cpu_wall_ratio"], frame["threads"])]
    assert frame["contended"].tolist() == expected
    assert (frame["threads"] == torch.get_num_threads()).all()
    assert (frame["cpu_wall_ratio"] == frame["cpu_s"] / frame["wall_s"]).all()


def test_contended_rounds_lists_rounds_with_any_contended_call():
    frame = pd.DataFrame({"round": [0, 0, 1, 1, 2, 2], "arm": list("ababab"),
                          "contended": [False, True, False, False, True, True]})
    assert Rounds(frame, {}, ["a", "b"]).contended_rounds() == [0, 2]


def test_cuda_device_synchronizes_around_every_call(monkeypatch):
    syncs = []
    monkeypatch.setattr(rounds_module.torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    run_rounds({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=1, device="cuda")
    assert len(syncs) == 2 + 2 * 2 * 2  # once after each warm-up call, before and after each timed call
    syncs.clear()
    run_rounds({"a": lambda: None}, rounds=2, device="cpu")
    assert syncs == []


def test_progress_bar_and_kept_results_are_optional():
    result = run_rounds({"a": lambda: 1}, rounds=2, progress="smoke", keep_results=False)
    assert result.results("a") == []


@pytest.mark.parametrize("kwargs, words", [
    ({"rounds": 0}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"rounds": 2, "warmup": -1}, "warmup"),
    ({"rounds": 2, "order": "random"}, "order"),
])
def test_run_rounds_validates_its_parameters(kwargs, words):
    with pytest.raises(InvalidParameterError, match=words):
        run_rounds({"a": lambda: None}, **kwargs)


def test_run_rounds_rejects_empty_or_uncallable_arms():
    with pytest.raises(InvalidParameterError, match="arms"):
        run_rounds({}, rounds=2)
    with pytest.raises(InvalidParameterError, match="not callable"):
        run_rounds({"a": 3}, rounds=2)


def test_unknown_arms_metrics_and_reserved_metric_names_are_clear_errors():
    result = run_rounds({"a": lambda: 1, "b": lambda: 2}, rounds=2, warmup=0)
    with pytest.raises(InvalidParameterError, match="unknown arm 'c'"):
        result.ratio("a", "c")
    with pytest.raises(InvalidParameterError, match="unknown metric 'tokens'"):
        result.ratio("a", "b", "tokens")
    with pytest.raises(InvalidParameterError, match="reserved"):
        run_rounds({"a": lambda: 1}, rounds=1, metrics=lambda x: {"wall_s": x})
