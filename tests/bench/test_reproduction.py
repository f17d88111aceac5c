"""The combined notebook's check against each optimization's own notebook (llmopt.bench.reproduction)."""

import numpy as np
import pandas as pd
import pytest

from llmopt.bench import benchmark, harness, reproduction, workload
from llmopt.bench.reproduction import Condition
from llmopt.bench.rounds import Rounds
from llmopt.errors import InvalidParameterError

INT4 = "INT4 RTN g64, lm_head INT8"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from llmopt.engine.loading import default_checkpoint_dir

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


def burst_requests(tokenizer, n=3, seed=0) -> pd.DataFrame:
    """What 02 saves for its burst workload (`02_batching_workload.csv`)."""
    pool = workload.prompt_pool(tokenizer, text_lengths=(16, 32), seed=seed, max_prompt_tokens=24)
    return workload.make_workload(pool, n, seed, "burst", min_new_tokens=2, max_new_tokens=4).frame().assign(
        workload="burst")


def write_results(d, requests: pd.DataFrame, model="SmolLM2-135M-Instruct"):
    """Each notebook's results in the shape it saves them, two or more conditions each."""
    same = {"model": model, "dtype": "fp32"}
    pd.DataFrame({"engine": ["no cache", "static cache"] * 2, "prompt_tokens": [256, 256, 32, 32], "new_tokens": 8,
                  "repeats": 2, "decode_tokens_per_s": [2.0, 12.0, 6.0, 14.0],
                  "decode_tokens_per_s_spread": [0.1, 1.0, 0.2, 1.0], **same}).to_csv(d / "01_kv_cache_sweep.csv",
                                                                                     index=False)
    pd.DataFrame({"engine": ["fp32", INT4, "fp32 · PyTorch engine", "INT8 RTN (per channel) · PyTorch engine",
                             f"{INT4} · PyTorch engine"], "prompt_tokens": 32,
                  "new_tokens": 24, "repeats": 2, "decode_tokens_per_s": [30.0, 120.0, 20.0, 30.0, 40.0],
                  "decode_tokens_per_s_spread": [0.0, 0.0, 2.0, 3.0, 4.0], **same}).to_csv(
        d / "03_quantization_engines.csv", index=False)
    pd.DataFrame({"variant": ["fp32", "INT8 RTN (per channel)", INT4], "method": ["dense", "rtn", "rtn"],
                  "bits": [None, 8, 4], "group_size": [None, None, 64]}).to_csv(d / "03_quantization_variants.csv",
                                                                                index=False)
    rows = []
    for prefix, warm in ((250, 0.1), (50, 0.2)):
        for repeat in range(3):
            for engine, ttft in (("no prefix cache", 0.4 + 0.01 * repeat), ("cold (miss)", 0.4), ("warm (hit)", warm)):
                rows.append({"engine": engine, "prefix_tokens": prefix, "repeat": repeat, "prompt_tokens": prefix + 20,
                             "processed_tokens": 20 if engine == "warm (hit)" else prefix + 20, "new_tokens": 8,
                             "time_to_first_token_s": ttft, "end_to_end_s": ttft + 0.3})
    pd.DataFrame(rows).assign(**same).to_csv(d / "04_prompt_caching.csv", index=False)
    pd.DataFrame({"backend": ["naive", "sdpa", "naive", "sdpa"], "context_tokens": [256, 256, 512, 512],
                  "new_tokens": 8, "repeats": 2, "skipped": [False, True, False, False],
                  "time_to_first_token_s": [0.5, float("nan"), 1.0, 0.8],
                  "time_to_first_token_s_spread": [0.0, float("nan"), 0.1, 0.1], **same}).to_csv(
        d / "05_flash_attention_model.csv", index=False)
    pd.DataFrame({"workload": ["open-ended"] * 2 + ["repeat"] * 3,
                  "drafter": ["plain (cached)", "prompt_lookup", "plain (cached)", "prompt_lookup", "prompt_lookup"],
                  "k": [0, 10, 0, 3, 10], "prompt_tokens": [40, 40, 203, 203, 203], "new_tokens": 24, "repeats": 2,
                  "decode_tokens_per_s": [25.0, 24.0, 20.0, 60.0, 80.0], "decode_tokens_per_s_spread": 2.0,
                  "speedup": [1.0, 0.96, 1.0, 3.0, 4.0], **same}).to_csv(d / "06_speculative_decoding.csv", index=False)
    pd.DataFrame({"workload": ["burst"] * 4 + ["single"], "scheduler": ["sequential", "continuous", "continuous",
                                                                         "static", "sequential"],
                  "max_batch": [1, 4, 8, 8, 1], "tokens_per_s": [10.0, 20.0, 30.0, 25.0, 9.0],
                  "tokens_per_s_spread": [0.0, 0.0, 2.0, 0.0, 0.0], "repeats": 2, "timeout_ms": 50, **same}).to_csv(
        d / "02_batching.csv", index=False)
    requests.assign(**same).to_csv(d / "02_batching_workload.csv", index=False)


@pytest.fixture
def results(tmp_path, tokenizer):
    write_results(tmp_path, burst_requests(tokenizer))
    return tmp_path


def test_each_condition_is_the_cheapest_one_its_notebook_saved(results):
    c = reproduction.notebook_conditions(results, "SmolLM2-135M-Instruct", "fp32", INT4, concurrency=7)
    assert all(isinstance(v, Condition) for v in c.values()), c
    kv = c["kv_cache"]
    assert kv.settings == {"prompt_tokens": 32, "new_tokens": 8, "repeats": 2, "warmup": 1}
    assert kv.ratio == pytest.approx(14 / 6)
    assert kv.rounds is None and "no per-round values" in kv.rounds_note  # saved without 01_kv_cache_sweep.rounds
    quant = c["quantization"].settings
    assert (quant["method"], quant["bits"], quant["group_size"], quant["lm_head_bits"]) == ("rtn", 4, 64, 8)
    assert c["quantization"].ratio == pytest.approx(2.0)  # the PyTorch-engine pair, not the fused 4.0
    # 07 times every PyTorch-engine row 03 timed together (what a row is interleaved with moves its ratio)
    assert [(r["variant"], r["bits"], r["group_size"]) for r in quant["pytorch_rows"]] == [
        ("INT8 RTN (per channel)", 8, None), (INT4, 4, 64)]
    assert "with INT8 RTN (per channel)" in c["quantization"].text
    caching = c["prompt_caching"]
    assert caching.settings["prefix_tokens"] == 50 and caching.settings["repeats"] == 3
    assert caching.ratio == pytest.approx(0.2 / 0.41)
    assert caching.rounds == pytest.approx([0.2 / 0.4, 0.2 / 0.41, 0.2 / 0.42])  # 04's per-repeat rows
    assert c["flash_attention"].settings["context_tokens"] == 512  # 256 has no sdpa row that ran
    assert c["flash_attention"].ratio == pytest.approx(0.8)
    spec = c["speculative_decoding"].settings
    assert (spec["workload"], spec["k"], spec["new_tokens"]) == ("repeat", 10, 24)
    assert c["speculative_decoding"].ratio == pytest.approx(4.0)
    batch = c["batching"]
    assert batch.settings["concurrency"] == 8 and batch.settings["repeats"] == 2
    assert len(batch.settings["requests"]) == 3
    assert batch.ratio == pytest.approx(3.0)
    assert "32-token prompt" in kv.text and "50-token shared prefix" in caching.text


def test_missing_results_another_model_or_a_missing_companion_file_are_not_compared(results, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    missing = reproduction.notebook_conditions(empty)
    assert all(isinstance(v, str) and v.startswith("not compared") for v in missing.values())
    table = reproduction.reproduce(missing, model=None, tokenizer=None)  # nothing to measure: no model needed
    assert list(table.columns) == reproduction.COLUMNS and list(table.optimization) == list(reproduction.RESULTS)
    assert table.rerun_ratio.isna().all() and table.verdict.str.startswith("not compared").all()
    assert reproduction.counts(table) == {"consistent": 0, "inconsistent": 0, "inconclusive": 0, "not compared": 6,
                                          "total": 6}
    other = reproduction.notebook_conditions(results, "another-model", "fp32")
    assert all(v.startswith("not compared") and "another-model" in v for v in other.values())
    (results / "02_batching_workload.csv").unlink()
    assert "02_batching_workload.csv" in reproduction.notebook_conditions(results)["batching"]


def test_a_row_is_an_equivalence_test_of_the_per_round_ratios():
    notebook = np.array([3.0, 3.06, 2.94, 3.0])
    c = Condition("kv_cache", {"repeats": 4}, 3.0, "01: ...", notebook)
    same = reproduction.compare(c, 3.01, np.array([3.02, 2.98, 3.0, 3.03]))
    assert same["outcome"] == "consistent" and same["verdict"].startswith("consistent: rerun / notebook 1.00x")
    assert "against ±15% (0.87-1.15x)" in same["verdict"] and same["noise_margin"] < 0.15
    far = reproduction.compare(c, 4.5, np.array([4.5, 4.6, 4.4, 4.5]))
    assert far["outcome"] == "inconsistent" and far["equivalence_low"] > 1.15
    noisy = reproduction.compare(c, 3.2, np.array([2.0, 4.5]))
    assert noisy["outcome"] == "inconclusive" and noisy["noise_margin"] > 0.15
    assert reproduction.compare(c, 3.1, np.array([3.1]))["verdict"].startswith(
        "inconclusive: fewer than 2 rounds on a side (notebook 4, re-measurement 1)")
    old = Condition("kv_cache", {"repeats": 2}, 3.0, "", None,
                    "01_kv_cache_sweep.csv: results keep no per-round values")
    row = reproduction.compare(old, 3.0, np.array([3.0, 3.0]))
    assert row["outcome"] == "inconclusive" and "no per-round values" in row["verdict"]
    assert reproduction.compare(c, 3.0, "rounds have no round with both arms measured")["outcome"] == "inconclusive"
    # the margin is the caller's, fixed in advance: a wide one turns the noisy row consistent, never the reverse
    assert reproduction.compare(c, 3.0, np.array([3.0, 3.06, 2.94, 3.0]), margin=0.5)["outcome"] == "consistent"
    with pytest.raises(InvalidParameterError):
        reproduction.reproduce({}, None, None, margin=0)


def test_the_counts_never_count_inconclusive_as_consistent():
    c = Condition("kv_cache", {"repeats": 2}, 3.0, "", np.array([3.0, 3.05, 2.95]))
    table = pd.DataFrame([reproduction.compare(c, 3.0, np.array([3.0, 3.03, 2.97])),
                          reproduction.compare(c, 3.0, np.array([2.0, 4.0])),
                          reproduction.compare(c, 3.0, np.array([6.0, 6.1, 5.9])),
                          reproduction._not_compared("batching", "not compared: no results")],
                         columns=reproduction.COLUMNS)
    tally = reproduction.counts(table)
    assert tally == {"consistent": 1, "inconsistent": 1, "inconclusive": 1, "not compared": 1, "total": 4}
    assert reproduction.counts_text(tally) == ("consistent 1, inconclusive 1, inconsistent 1, not compared 1")
    assert reproduction.counts_text({**tally, "not compared": 0}) == "consistent 1, inconclusive 1, inconsistent 1"


def test_saved_rounds_come_back_and_pair_by_round(tmp_path):
    arms = [benchmark.arm_name("no cache", 32), benchmark.arm_name("static cache", 32)]
    calls = pd.DataFrame({"round": [0, 0, 1, 1, 2, 2], "arm": arms * 3, "wall_s": 1.0, "contended": False,
                          "decode_tokens_per_s": [2.0, 6.0, 2.2, 6.0, 1.8, 6.3]})
    frame = pd.DataFrame({"engine": ["no cache", "static cache"], "prompt_tokens": 32,
                          "decode_tokens_per_s": [2.0, 6.0]})
    frame.attrs["rounds"] = Rounds(calls, {}, arms)
    harness.save_results(frame, "01_kv_cache_sweep", directory=tmp_path)
    assert (tmp_path / "01_kv_cache_sweep.rounds.csv").exists()
    loaded = harness.load_results("01_kv_cache_sweep", tmp_path)
    ratios = reproduction.effect_rounds("kv_cache", loaded, {"prompt_tokens": 32})
    assert ratios == pytest.approx([3.0, 6.0 / 2.2, 6.3 / 1.8])
    assert "lack this condition" in reproduction.effect_rounds("kv_cache", loaded, {"prompt_tokens": 64})
    bare = pd.DataFrame(frame)  # a frame without rounds replaces the file: the old rounds must go with it
    bare.attrs = {}
    harness.save_results(bare, "01_kv_cache_sweep", directory=tmp_path)
    assert not (tmp_path / "01_kv_cache_sweep.rounds.csv").exists()
    assert "no per-round values" in reproduction.effect_rounds("kv_cache", harness.load_results(
        "01_kv_cache_sweep", tmp_path), {"prompt_tokens": 32})


def test_tiny_shrinks_every_measurement_but_keeps_the_arms(results):
    c = reproduction.tiny(reproduction.notebook_conditions(results, concurrency=8))
    assert c["kv_cache"].settings == {"prompt_tokens": 8, "new_tokens": 3, "repeats": 1, "warmup": 0}
    assert c["flash_attention"].settings["context_tokens"] == 32 and c["kv_cache"].ratio == pytest.approx(14 / 6)
    requests = c["batching"].settings["requests"]
    assert len(requests) == 2 and requests.max_new_tokens.max() <= 2 and c["batching"].settings["concurrency"] == 8


def test_02s_workload_is_rebuilt_from_what_it_saved(tokenizer):
    saved = burst_requests(tokenizer, n=8, seed=3)
    pool = workload.prompt_pool(tokenizer, text_lengths=(16, 32), seed=3, max_prompt_tokens=24)
    original = workload.make_workload(pool, 8, 3, "burst", min_new_tokens=2, max_new_tokens=4)
    rebuilt = reproduction.batching_workload(tokenizer, saved)
    assert rebuilt.requests == original.requests and rebuilt.params == original.params
    with pytest.raises(InvalidParameterError):
        reproduction.batching_workload(tokenizer, saved.assign(prompt_tokens=saved.prompt_tokens + 1000))


@pytest.fixture(scope="module")
def tiny_wide():
    from llmopt.engine.testing import tiny_model

    return tiny_model("llama", seed=5, vocab_size=49152, max_position_embeddings=1024)


def test_every_effect_is_re_measured_with_its_notebooks_function(results, tiny_wide, tokenizer):
    conditions = reproduction.tiny(reproduction.notebook_conditions(results, concurrency=8))
    tiny_wide.set_attention("naive")  # measured on SDPA as the notebooks load the model, then restored
    table = reproduction.reproduce(conditions, tiny_wide, tokenizer).set_index("optimization")
    assert tiny_wide.attention_backend == "naive"
    assert (table.rerun_ratio > 0).all() and table.measure_s.notna().all(), table.verdict
    assert (table.repeats == 1).all() and (table.outcome == "inconclusive").all(), table.verdict  # one round
    assert table.loc["prompt_caching", "verdict"].startswith("inconclusive: fewer than 2 rounds")
    for name in conditions:  # every re-measurement carries its per-round ratios
        frame = reproduction.measure(conditions[name], tiny_wide, tokenizer)
        assert len(reproduction.effect_rounds(name, frame, conditions[name].settings)) == 1, name
    assert table.loc["quantization", "notebook_ratio"] == pytest.approx(2.0)
    measured = reproduction.measure(conditions["quantization"], tiny_wide, tokenizer)
    assert list(measured.engine) == ["fp32 · PyTorch engine", "INT8 RTN (per channel) · PyTorch engine",
                                     f"{INT4} · PyTorch engine"]


def test_the_marginal_table_takes_each_stack_step_on_the_single_effects_metric():
    run = pd.DataFrame({"configuration": ["baseline", "kv_cache", "kv_cache + prompt_caching"],
                        "decode_tokens_per_s": [2.0, 12.0, 12.0], "decode_tokens_per_s_spread": 0.0,
                        "time_to_first_token_s": [1.0, 1.0, 0.5], "time_to_first_token_s_spread": [0.0, 0.0, 0.2]})
    singles = pd.DataFrame({"optimization": ["kv_cache", "prompt_caching", "batching"],
                            "rerun_ratio": [3.0, 0.25, 2.0]})
    table = reproduction.marginal_effects(run, ["kv_cache", "prompt_caching"],
                                          {"kv_cache": "kv_cache", "prompt_caching": "kv_cache + prompt_caching"},
                                          2.5, singles).set_index("optimization")
    assert list(table.index) == ["kv_cache", "prompt_caching", "batching"]
    assert table.loc["kv_cache", "marginal_ratio"] == pytest.approx(6.0)
    assert table.loc["kv_cache", "marginal / single"] == pytest.approx(2.0)
    assert table.loc["prompt_caching", "marginal_ratio"] == pytest.approx(0.5)  # time to first token, not decode
    assert table.loc["batching", "step"].startswith("continuous / sequential")
