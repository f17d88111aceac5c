"""The headline and verdict code of notebook 03 (llmopt.bench.quantization_experiment), on hand-made frames and a
tiny random model: which rows the checks and the document's comparison pick, their verdicts, the headline text."""
import math

import pandas as pd
import pytest
import torch

from llmopt.bench import benchmark, datasets
from llmopt.bench import quantization_experiment as qe
from llmopt.bench.rounds import Rounds
from llmopt.engine.testing import tiny_hf_config, tiny_model

PROMPT = 8
SIXTEEN = qe.SIXTEEN_BIT
INT8 = "INT8 RTN (per channel)"
RTN4 = "INT4 RTN g32, lm_head INT8"
GPTQ4 = "INT4 GPTQ g32 act-order, lm_head INT8"
GGUF4 = "GGUF Q4_1 (shipped file)"


def result_rows(**changes) -> pd.DataFrame:
    """A results frame shaped as `results_with_roof`'s, with round numbers; `changes` maps a variant to the
    columns it overrides."""
    rows = [  # variant, method, bits, memory_bytes, tokens/s, perplexity, top-1 agreement
        ("fp32", "dense", None, 540e6, 30.0, 19.4, 1.0),
        (SIXTEEN, "dense", None, 270e6, 40.0, 19.4, 0.99),
        (INT8, "rtn", 8, 140e6, 66.0, 19.45, 0.99),
        (RTN4, "rtn", 4, 90e6, 80.0, 22.8, 0.70),
        (GPTQ4, "gptq", 4, 90e6, 84.0, 21.0, 0.80),
        (GGUF4, "gguf", 4, 85e6, 90.0, 19.41, 0.98),  # best perplexity: the source of the weights
        (INT8 + ", PyTorch kernel", qe.PYTORCH_KERNEL, 8, 140e6, 15.0, 19.5, 0.99),
    ]
    frame = pd.DataFrame(rows, columns=["variant", "method", "bits", "memory_bytes", "decode_tokens_per_s",
                                        "perplexity", "top1_agreement"])
    for variant, columns in changes.items():
        for column, value in columns.items():
            frame.loc[frame.variant == variant, column] = value
    frame["perplexity_ratio"] = frame.perplexity / 19.4
    frame["decode_vs_fp32"] = frame.decode_tokens_per_s / 30.0
    frame["decode_vs_bf16"] = frame.decode_tokens_per_s / 40.0
    frame["bandwidth_fraction"] = 0.4
    frame["decode_engine"] = "fused"
    return frame


def speed_frame(ratios: dict[str, list[float]], baseline_rates: list[float]) -> pd.DataFrame:
    """A `benchmark.compare`-shaped frame whose rounds give each variant the per-round tokens/s ratios `ratios`
    over fp32 (fp32's rates: `baseline_rates`; the 16-bit row runs at 4/3 of fp32 in every round)."""
    rates = {"fp32": baseline_rates, SIXTEEN: [4 / 3 * r for r in baseline_rates]}
    rates.update({name: [q * r for q, r in zip(qs, baseline_rates)] for name, qs in ratios.items()})
    calls = pd.DataFrame([{"round": i, "arm": benchmark.arm_name(name, PROMPT), "decode_tokens_per_s": rate}
                          for name, values in rates.items() for i, rate in enumerate(values)])
    frame = pd.DataFrame({"engine": list(rates), "prompt_tokens": PROMPT,
                          "decode_tokens_per_s": [sorted(v)[len(v) // 2] for v in rates.values()]})
    frame.attrs["rounds"] = Rounds(calls, {}, [benchmark.arm_name(name, PROMPT) for name in rates])
    return frame


BASE = [30.0, 27.0, 33.0, 29.0, 31.0]  # fp32 drifting over five rounds


def steady(ratio: float) -> list[float]:
    """Five per-round ratios within 2 % of `ratio`, their geometric mean exactly `ratio`."""
    return [ratio * math.exp(0.01 * k) for k in (-2, 1, 0, 2, -1)]


# ---- which rows are picked

def test_int4_row_is_the_best_perplexity_quantized_here_not_the_source_file():
    results = result_rows()
    assert qe.int4_row(results).variant == GPTQ4  # GGUF Q4_1 has a lower perplexity but is the weights' source
    assert qe.int4_row(result_rows(**{RTN4: {"perplexity": 20.0}})).variant == RTN4
    assert qe.int8_row(results).variant == INT8  # not the PyTorch-kernel row of the same codes


def test_int4_row_is_none_without_a_quantized_int4_row():
    results = result_rows()
    assert qe.int4_row(results[~results.variant.isin([RTN4, GPTQ4])]) is None


# ---- acceptance checks

def test_acceptance_checks_met_and_not_met():
    results = result_rows(**{GPTQ4: {"decode_tokens_per_s": 72.0, "perplexity": 21.6}})  # 2.4x, +11 %
    checks = qe.acceptance_checks(results).set_index("check")
    assert list(checks.columns) == ["measured", "met"]
    assert checks.met.to_dict() == {
        f"{INT8}: decode / fp32 >= 1.5": True,
        f"{INT8}: perplexity within 1 % of fp32": True,
        f"{RTN4}: decode / fp32 >= 2.5": True,
        f"{GPTQ4}: decode / fp32 >= 2.5": False,
        f"{GPTQ4}: perplexity within 10 % of fp32": False,
        f"{GPTQ4}: perplexity below {RTN4}'s": True,
        f"{GGUF4}: decode / fp32 >= 2.5": True,
    }  # no check for the dense rows or the PyTorch-kernel row
    assert checks.loc[f"{GPTQ4}: decode / fp32 >= 2.5", "measured"] == pytest.approx(2.4)
    assert checks.loc[f"{GPTQ4}: perplexity below {RTN4}'s", "measured"] == pytest.approx(21.6 / 22.8)


def test_acceptance_check_fails_when_gptq_is_worse_than_rtn_and_int8_drifts():
    results = result_rows(**{GPTQ4: {"perplexity": 23.0}, INT8: {"perplexity": 19.7, "decode_tokens_per_s": 40.0}})
    checks = qe.acceptance_checks(results).set_index("check").met
    assert not checks[f"{GPTQ4}: perplexity below {RTN4}'s"]
    assert not checks[f"{INT8}: perplexity within 1 % of fp32"]
    assert not checks[f"{INT8}: decode / fp32 >= 1.5"]


def test_acceptance_checks_of_dense_rows_only_is_an_empty_frame_with_its_columns():
    results = result_rows()
    checks = qe.acceptance_checks(results[results.method == "dense"])
    assert checks.empty and list(checks.columns) == qe.CHECK_COLUMNS


# ---- beside the document

def beside(int8_ratios: list[float], int4_ratios: list[float], baseline=BASE) -> pd.DataFrame:
    """The document table for INT8 / INT4 (GPTQ) rows whose per-round ratios over the 16-bit row are given."""
    to_fp32 = 4 / 3  # the 16-bit row runs at 4/3 of fp32
    speed = speed_frame({INT8: [r * to_fp32 for r in int8_ratios], GPTQ4: [r * to_fp32 for r in int4_ratios]},
                        baseline)
    table = qe.beside_document(result_rows(), speed, SIXTEEN, PROMPT)
    return table.set_index(["metric", "condition"])


def test_beside_document_speedup_verdicts_follow_the_interval():
    table = beside(steady(1.7), steady(4.0))  # document: INT8 1.5-2x, INT4 2-3x
    assert table.loc[("speedup", "INT8"), "verdict"].startswith("confirmed")
    assert table.loc[("speedup", "INT4"), "verdict"].startswith("refuted (better)")
    assert table.loc[("speedup", "INT8"), "measured row"] == INT8
    assert table.loc[("speedup", "INT4"), "measured row"] == GPTQ4
    assert "(1.6" in table.loc[("speedup", "INT8"), "verdict"]  # the interval is in the text


def test_beside_document_wide_or_single_round_speedup_is_inconclusive():
    wide = beside([1.1, 2.6, 1.2, 2.4, 1.7], steady(2.5))
    assert wide.loc[("speedup", "INT8"), "verdict"].startswith("inconclusive")
    assert wide.loc[("speedup", "INT4"), "verdict"].startswith("confirmed")
    single = beside([1.7], [2.5], baseline=BASE[:1])
    assert single.loc[("speedup", "INT8"), "verdict"].startswith("inconclusive")
    assert single.loc[("speedup", "INT4"), "verdict"].startswith("inconclusive")


def test_beside_document_refuted_worse_and_point_verdicts():
    table = beside(steady(1.1), steady(2.5))
    assert table.loc[("speedup", "INT8"), "verdict"].startswith("refuted (worse)")
    # memory and agreement are deterministic: point verdicts against the 16-bit row and fp32
    assert table.loc[("memory_reduction", "INT8"), "measured"] == pytest.approx(270 / 140)
    assert table.loc[("memory_reduction", "INT8"), "verdict"].startswith("refuted (worse)")
    assert table.loc[("memory_reduction", "INT4"), "measured"] == pytest.approx(3.0)
    assert table.loc[("accuracy", "INT8"), "measured"] == pytest.approx(99.0)
    assert table.loc[("accuracy", "INT8"), "verdict"] == "confirmed"
    assert table.loc[("accuracy", "INT4"), "verdict"].startswith("refuted (worse)")  # 80 % against 95-98 %


def test_beside_document_model_size_is_not_comparable():
    table = beside(steady(1.7), steady(2.5))
    sizes = table.xs("model_size")
    assert list(sizes.index) == ["FP16", "INT8", "INT4"]
    assert (sizes.verdict == qe.NOT_COMPARABLE).all()
    assert sizes.loc["FP16", "measured"] == pytest.approx(0.27)
    assert sizes.loc["FP16", "measured row"] == SIXTEEN
    assert list(table.reset_index().columns) == qe.BESIDE_COLUMNS
    assert len(table) == len(datasets.estimates("quantization"))


# ---- headline

def test_headline_carries_each_ratio_with_its_interval_and_rounds():
    speed = speed_frame({INT8: steady(2.2), GPTQ4: steady(2.8)}, BASE)
    checks = pd.DataFrame({"check": ["a", "b", "c"], "measured": [1, 2, 3], "met": [True, False, True]})
    key, verdict = qe.headline(result_rows(), speed, checks, True, PROMPT)
    assert key.startswith("INT8 2.20x (95% CI 2.1")
    assert f"and {GPTQ4} 2.80x (95% CI 2.7" in key
    assert key.count("5 rounds") == 2
    assert "fp32 decode (84.0 tok/s, 40% of the bandwidth limit, fused engine)" in key
    assert key.endswith(f"perplexity {19.45 / 19.4 - 1:+.1%} / {21.0 / 19.4 - 1:+.1%}")
    assert verdict == "2/3 acceptance checks met; GPTQ-format round trip bit-exact: True"


def test_headline_with_one_round_says_so():
    speed = speed_frame({INT8: [2.2], GPTQ4: [2.8]}, BASE[:1])
    key, _ = qe.headline(result_rows(), speed, pd.DataFrame(columns=qe.CHECK_COLUMNS), False, PROMPT)
    assert "INT8 2.20x (1 round, no interval)" in key


def test_speed_interval_pairs_rounds_against_the_named_baseline():
    speed = speed_frame({INT8: [2.0, 2.4, 2.2, 2.1, 2.3]}, BASE)
    interval = qe.speed_interval(speed, INT8, "fp32", PROMPT, 9.9)
    assert interval.rounds == 5 and interval.low < 2.2 < interval.high
    assert interval.estimate == pytest.approx(math.exp(sum(math.log(r) for r in [2.0, 2.4, 2.2, 2.1, 2.3]) / 5))
    no_rounds = speed.copy()
    no_rounds.attrs = {}
    assert qe.speed_interval(no_rounds, INT8, "fp32", PROMPT, 9.9).text() == "9.90x (1 round, no interval)"


# ---- a skipped variant on a tiny model

class Words:
    """A tokenizer stand-in: decode gives the ids as text."""

    @staticmethod
    def decode(ids):
        return " ".join(map(str, ids))


def test_a_skipped_variant_does_not_break_the_tables():
    base = tiny_model()  # hidden 64, intermediate 128: group size 256 cannot be taken
    torch.manual_seed(0)
    calibration = torch.randint(3, 96, (2, 16))
    variants = qe.build_variants(base, tiny_hf_config(), calibration, rtn_group_sizes=[256, 32],
                                 gptq_group_sizes=[32], gptq_act_order=True, include_lm_head=True, lm_head_bits=8,
                                 gguf_kinds=[], pytorch_kernel_rows=False)
    names = [v.name for v in variants]
    assert names[0] == "fp32" and "INT4 RTN g256, lm_head INT8" in names and "INT4 RTN g256, lm_head INT4" in names
    table = qe.variants_table(variants)
    skipped = table[table.skipped != ""]
    assert set(skipped.variant) == {"INT4 RTN g256, lm_head INT8", "INT4 RTN g256, lm_head INT4"}
    assert skipped.memory_bytes.isna().all() and table[table.skipped == ""].file_bytes.gt(0).all()
    assert list(qe.variants_view(table).columns) == qe.VARIANT_COLUMNS
    ran = [v for v in variants if not v.skipped]
    quality = qe.quality_table(ran, torch.randint(3, 96, (2, 12)))
    assert list(quality.variant) == [v.name for v in ran] and quality.perplexity_ratio.iloc[0] == pytest.approx(1)
    frame = pd.DataFrame({"engine": [v.name for v in ran], "prompt_tokens": PROMPT,
                          "decode_tokens_per_s": [10.0 + i for i in range(len(ran))], "time_to_first_token_s": 0.1,
                          "token_ids": [[5, 6, 7]] * len(ran), "decode_engine": "pytorch"})
    speed = qe.DecodeSpeed(frame, {v.name: "pytorch" for v in ran}, [])
    results, read_bw, _ = qe.results_with_roof(table, quality, speed, 1e9, Words())
    assert list(results.variant) == [v.name for v in ran]
    assert speed.sixteen_bit == SIXTEEN and results.decode_vs_bf16[results.variant == SIXTEEN].item() == 1
    assert results["sample"].iloc[0] == "5 6 7" and read_bw >= 1e9
    assert list(qe.summary_view(results).columns[:4]) == ["variant", "decode_engine", "file_MB", "memory_MB"]
    assert qe.engine_table(speed).empty
