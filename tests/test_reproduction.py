"""The combined notebook's check against each optimization's own notebook (llmopt.reproduction)."""
import math

import pandas as pd
import pytest

from llmopt import reproduction


def test_ratio_band_widens_with_the_spreads():
    ratio, low, high = reproduction.ratio_band(10.0, 2.0, 5.0, 1.0)
    assert ratio == 2.0 and low == pytest.approx(9 / 5.5) and high == pytest.approx(11 / 4.5)
    assert reproduction.ratio_band(10.0, float("nan"), 5.0, 0.0) == (2.0, 2.0, 2.0)
    assert math.isinf(reproduction.ratio_band(1.0, 0.0, 1.0, 4.0)[2])


def write_results(d):
    pd.DataFrame({"engine": ["no cache", "static cache"] * 2, "prompt_tokens": [32, 32, 256, 256],
                  "new_tokens": 8, "decode_tokens_per_s": [6.0, 14.0, 2.0, 12.0],
                  "decode_tokens_per_s_spread": [0.2, 1.0, 0.1, 1.0]}).to_csv(d / "01_kv_cache_sweep.csv", index=False)
    pd.DataFrame({"variant": ["fp32", "INT8 RTN (per channel)"], "prompt_tokens": 32, "decode_tokens_per_s": [20.0, 30.0],
                  "decode_tokens_per_s_spread": [2.0, 2.0]}).to_csv(d / "03_quantization.csv", index=False)
    pd.DataFrame({"workload": "burst", "scheduler": ["sequential", "continuous", "continuous"], "max_batch": [1, 4, 8],
                  "tokens_per_s": [10.0, 20.0, 30.0], "tokens_per_s_spread": [0.0, 0.0, 2.0]}).to_csv(
        d / "02_batching.csv", index=False)


def test_effects_read_the_nearest_condition_and_missing_notebooks_are_none(tmp_path):
    write_results(tmp_path)
    effects = reproduction.notebook_effects(300, 250, "INT8 RTN (per channel)", 8, 8, tmp_path)
    assert effects["kv_cache"].ratio == pytest.approx(6.0) and "256-token" in effects["kv_cache"].condition
    assert effects["quantization"].ratio == pytest.approx(1.5)
    assert effects["batching"].ratio == pytest.approx(3.0) and effects["batching"].low == pytest.approx(2.9)
    assert effects["prompt_caching"] is None and effects["speculative_decoding"] is None


def test_quantization_prefers_03s_pytorch_engine_pair_the_step_07_measures(tmp_path):
    write_results(tmp_path)
    pd.DataFrame({"engine": ["fp32", "INT8 RTN (per channel)", "fp32 · PyTorch engine",
                             "INT8 RTN (per channel) · PyTorch engine"], "prompt_tokens": 32,
                  "decode_tokens_per_s": [20.0, 30.0, 10.0, 12.0], "decode_tokens_per_s_spread": 0.0}).to_csv(
        tmp_path / "03_quantization_engines.csv", index=False)
    effect = reproduction.notebook_effects(300, 250, "INT8 RTN (per channel)", 8, 8, tmp_path)["quantization"]
    assert effect.ratio == pytest.approx(1.2) and "PyTorch engine" in effect.condition


def test_combined_effects_compare_each_step_with_the_notebook_band(tmp_path):
    write_results(tmp_path)
    effects = reproduction.notebook_effects(300, 250, "INT8 RTN (per channel)", 8, 8, tmp_path)
    run = pd.DataFrame({"configuration": ["baseline", "kv_cache", "kv_cache + quantization"],
                        "decode_tokens_per_s": [2.0, 12.0, 24.0], "decode_tokens_per_s_spread": [0.0, 0.0, 0.0],
                        "time_to_first_token_s": [1.0, 1.0, 1.0], "time_to_first_token_s_spread": [0.0, 0.0, 0.0]})
    table = reproduction.combined_effects(run, ["kv_cache", "quantization"],
                                          {"kv_cache": "kv_cache", "quantization": "kv_cache + quantization"},
                                          effects, (2.0, 2.0, 2.0)).set_index("optimization")
    assert table.loc["kv_cache", "combined_ratio"] == pytest.approx(6.0)
    assert table.loc["kv_cache", "within_notebook_spread"]
    assert table.loc["quantization", "combined_ratio"] == pytest.approx(2.0)
    assert not table.loc["quantization", "within_notebook_spread"]  # band 1.38-1.63
    assert not table.loc["quantization", "bands_overlap"]  # this run's spreads are 0: its band is the point 2.0
    assert "not reproduced" in table.loc["quantization", "verdict"]
    assert not table.loc["batching", "within_notebook_spread"]  # 2.0 against 2.9-3.1


def test_without_notebook_results_every_row_says_so(tmp_path):
    effects = reproduction.notebook_effects(300, 250, "INT8 RTN (per channel)", 8, 8, tmp_path)
    run = pd.DataFrame({"configuration": ["baseline", "kv_cache"], "decode_tokens_per_s": [2.0, 12.0],
                        "decode_tokens_per_s_spread": [0.0, 0.0]})
    table = reproduction.combined_effects(run, ["kv_cache"], {"kv_cache": "kv_cache"}, effects, (2.0, 2.0, 2.0))
    assert list(table.columns) == reproduction.COLUMNS and table.combined_ratio.isna().all()
    assert table.verdict.str.startswith("not compared").all()
