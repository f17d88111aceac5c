"""Notebook 07's experiment (llmopt.bench.combined_experiment): the headline, the ranking, the peer table, the
equivalence check and the collected estimate-against-measurement rows, on hand-made frames and a tiny model."""
import math
import statistics
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from llmopt.bench import combined, harness
from llmopt.bench import combined_experiment as ce
from llmopt.bench.rounds import Rounds
from llmopt.engine.loading import default_checkpoint_dir
from llmopt.engine.testing import tiny_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

DOC = list(combined.DOCUMENT_ORDER)


def fake_run(walls: dict[str, list[float]], tokens: dict[str, list[list[int]]] | None = None) -> pd.DataFrame:
    """A `combined.measure` frame from per-round workload times (decode tokens/s = 10 / wall), with its rounds."""
    calls = pd.DataFrame([{"round": r, "arm": arm, "position": 0, "wall_s": w, "cpu_s": w, "cpu_wall_ratio": 1.0,
                           "threads": 1, "contended": False, "decode_tokens_per_s": 10 / w,
                           "time_to_first_token_s": 0.1}
                          for arm, values in walls.items() for r, w in enumerate(values)])
    frame = pd.DataFrame([{"configuration": arm, "workload_s": statistics.median(values),
                           "decode_tokens_per_s": statistics.median(10 / w for w in values),
                           "time_to_first_token_s": 0.1, "token_ids": (tokens or {}).get(arm, [[1, 2, 3]])}
                          for arm, values in walls.items()])
    frame.attrs["rounds"] = Rounds(calls, {}, list(walls))
    return frame


def document_walls(rounds: int = 5) -> dict[str, list[float]]:
    """The document's stacks (and one peer) with noisy per-round workload times, each step faster."""
    rng = np.random.default_rng(0)
    stacks = combined.stacks_in_order(DOC)
    walls = {name: list(40.0 / (i + 1) ** 1.2 * (1 + 0.03 * rng.standard_normal(rounds)))
             for i, name in enumerate(stacks)}
    walls["transformers (prompt lookup)"] = list(8.0 * (1 + 0.03 * rng.standard_normal(rounds)))
    return walls


@pytest.fixture
def document():
    run = fake_run(document_walls())
    stacks = combined.stacks_in_order(DOC)
    return run, stacks, ce.steps(run, stacks, DOC)


def test_steps_carry_intervals_from_five_paired_rounds(document):
    _, _, table = document
    assert table.optimization.tolist() == ["baseline", *DOC]
    assert (table.cumulative_speedup_rounds == 5).all() and (table.step_speedup_rounds == 5).all()
    last = table.iloc[-1]
    assert last.cumulative_speedup_low < last.cumulative_speedup_geomean < last.cumulative_speedup_high
    assert ce.speedup(table).text().endswith("5 rounds)")


def test_headline_gives_every_ratio_its_interval_and_round_count(document):
    run, stacks, table = document
    peers = ce.peer_table([run], list(stacks), [run.attrs["rounds"]])
    checks = [pd.DataFrame({"configuration": list(stacks), "lossless": [s.lossless for s in stacks.values()],
                            "tokens identical": True, "token agreement": 1.0})]
    reproduced = pd.DataFrame({"outcome": ["consistent", "inconclusive", "not compared"]})
    key, verdict = ce.headline(table, table, peers, pd.DataFrame(), checks, reproduced, 0.15, [], "1 request × 300")
    assert key.startswith("1 request × 300: ")
    assert key.count("95% CI") == 3 and key.count("5 rounds") == 3  # document order, measured order, ours / peer
    assert "ours / transformers (prompt lookup) decode tok/s" in key
    assert "fused" not in key  # no extension measured
    assert verdict.startswith("lossless stacks token-identical")
    assert "consistent 1, inconclusive 1, inconsistent 0, not compared 1" in verdict
    checks[0].loc[2, "tokens identical"] = False  # quantized: lossy, not a mismatch
    _, verdict = ce.headline(table, table, peers, pd.DataFrame(), checks, reproduced, 0.15, [], "w")
    assert verdict.startswith("lossless stacks token-identical")
    checks[0].loc[1, "tokens identical"] = False  # the KV cache alone is lossless
    _, verdict = ce.headline(table, table, peers, pd.DataFrame(), checks, reproduced, 0.15, [], "w")
    assert verdict.startswith("MISMATCH: ['kv_cache']")


def test_headline_without_rounds_says_one_round_no_interval():
    walls = {name: [10.0 / (i + 1)] for i, name in enumerate(combined.stacks_in_order(DOC))}
    run = fake_run(walls)
    table = ce.steps(run, combined.stacks_in_order(DOC), DOC)
    key, _ = ce.headline(table, table, ce.peer_table([run], list(walls), [run.attrs["rounds"]]), pd.DataFrame(),
                         [], pd.DataFrame({"outcome": []}), 0.15, [], "w")
    assert "1 round, no interval" in key and "95% CI" not in key
    assert "ours /" not in key  # no peer measured


def test_peer_table_pairs_only_arms_of_the_same_rounds(document):
    run, stacks, _ = document
    later = fake_run({"kv_cache + fused_decode": [0.5, 0.6, 0.55, 0.5, 0.52]})  # fastest, measured in other rounds
    rounds = [run.attrs["rounds"], later.attrs["rounds"]]
    table = ce.peer_table([run, later], [*stacks, "kv_cache + fused_decode"], rounds).set_index("engine")
    assert "llmopt: kv_cache + fused_decode" not in table.index  # not in the peers' rounds: it would not pair
    ours = table.index[0]
    assert ours.startswith("llmopt: ") and ours.removeprefix("llmopt: ") in set(run.configuration)
    peer = table.loc["transformers (prompt lookup)"]
    assert peer[ce.PEER_RATIO] == pytest.approx(table.loc[ours, "decode_tokens_per_s"] / peer.decode_tokens_per_s)
    assert peer[f"{ce.PEER_RATIO}_rounds"] == 5 and peer[f"{ce.PEER_RATIO}_low"] < peer[f"{ce.PEER_RATIO}_high"]
    same = ce.peer_table([run], list(stacks), rounds).set_index("engine").loc["transformers (prompt lookup)"]
    assert same[f"{ce.PEER_RATIO}_rounds"] == 5 and same[f"{ce.PEER_RATIO}_low"] < same[f"{ce.PEER_RATIO}_high"]


def test_ranking_gain_per_kloc_ranks_and_workload(document):
    _, _, table = document
    ranked = ce.ranking(table, 3.0, [], "1 request × 300 prompt tokens → 32 new tokens", "8 × 64 → 16")
    assert list(ranked.columns) == ce.RANKING_COLUMNS
    by = ranked.set_index("optimization")
    assert set(by.index) == {*DOC, "batching"}
    kv = by.loc["kv_cache"]
    # the estimate its interval is about: the paired rounds' geometric mean, inside that interval
    assert kv.measured_gain_x == pytest.approx(table.set_index("optimization").step_speedup_geomean["kv_cache"])
    assert kv.gain_low <= kv.measured_gain_x <= kv.gain_high
    assert kv.gain_per_kloc == pytest.approx((kv.measured_gain_x - 1) / (kv.lines_of_code / 1000))
    assert kv.gain_low < kv.gain_high and kv.gain_rounds == 5
    assert by.loc["batching", "gain_rounds"] == 1 and math.isnan(by.loc["batching", "gain_low"])
    assert ranked.measured_rank.tolist() == sorted(ranked.measured_rank.tolist())
    assert ranked.gain_per_kloc.is_monotonic_decreasing
    assert by.loc["batching", "workload"] == "8 × 64 → 16" and by.loc["kv_cache", "workload"].startswith("1 request")
    with_fused = ce.ranking(pd.concat([table, pd.DataFrame([{"optimization": "fused_decode", "step_speedup": 0.9}])],
                                      ignore_index=True), 3.0, ["fused_decode"], "w", "b").set_index("optimization")
    assert with_fused.loc["fused_decode", "estimated_impact"] == "not in the document"
    assert with_fused.loc["fused_decode", "gain_per_kloc"] < 0  # slower: negative gain, last
    assert with_fused.loc["fused_decode", "measured_rank"] == len(with_fused)


def test_equivalence_raises_when_a_lossless_stack_changes_tokens(capsys):
    stacks = combined.stacks_in_order(["kv_cache", "quantization"])
    names = list(stacks)
    run = fake_run({n: [1.0] for n in names}, {names[0]: [[1, 2, 3, 4]], names[1]: [[1, 2, 3, 4]],
                                              names[2]: [[1, 2, 9, 9]]})
    frame = ce.equivalence(run, stacks, "fp32")  # only the quantized stack differs: reported, not raised
    assert frame["tokens identical"].tolist() == [True, True, False]
    assert frame["token agreement"].tolist() == [1.0, 1.0, 0.5]
    run.at[1, "token_ids"] = [[1, 2, 3, 5]]
    with pytest.raises(AssertionError, match="kv_cache"):
        ce.equivalence(run, stacks, "fp32")
    assert ce.equivalence(run, stacks, "bf16")["tokens identical"].tolist()[1] is False  # half precision: noted
    assert "NOTE (bf16)" in capsys.readouterr().out


def test_vs_document_marks_notebooks_without_a_table(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_RESULTS_DIR", str(tmp_path))
    assert ce.vs_document(tmp_path).quantity.tolist() == ["not run"] * 6
    row = {"quantity": "decode speedup", "document (estimate)": "5-10x", "measured": "7.1x", "verdict": "confirmed"}
    harness.save_vs_document(pd.DataFrame([row]), "01_kv_cache")
    harness.save_vs_document(pd.DataFrame([row, {**row, "quantity": "memory"}]), "03_quantization")
    table = ce.vs_document(tmp_path)
    assert table.notebook.tolist() == ["01_kv_cache", "02_batching", "03_quantization", "03_quantization",
                                       "04_prompt_caching", "05_flash_attention", "06_speculative_decoding"]
    missing = table[table.quantity == "not run"]
    assert missing.notebook.tolist() == ["02_batching", "04_prompt_caching", "05_flash_attention",
                                         "06_speculative_decoding"]
    assert not table[harness.VS_DOCUMENT_COLUMNS].isna().any().any()  # no NaN-filled rows
    assert table.loc[0, "verdict"] == "confirmed"


def test_waterfall_draws_intervals_labels_and_legend(document):
    _, _, table = document
    fig, ax = plt.subplots()
    ce.waterfall(ax, table, "t")
    assert "speedup" in ax.get_ylabel() and "(x" in ax.get_ylabel() and ax.get_xlabel()
    assert len(ax.get_legend().get_texts()) == 2  # bars and their 95% intervals
    assert len(ax.containers) == 2  # the bars and the error bars
    plt.close(fig)


def test_workload_label_counts_requests_and_tokens():
    assert ce.Workload([[1] * 300], 250, 32).label == (
        "1 request × 300 prompt tokens (250 shared, cached for prompt caching) → 32 new tokens")
    assert ce.Workload([[1] * 300, [1] * 310], 250, 32).label.startswith("2 requests × 300-310 prompt tokens")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


def test_shared_prefix_is_cached_before_each_run_and_stays_lossless(model):
    shared = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    prompts = [shared + [20, 21, 3, 4, 5], shared + [22, 23, 24]]
    runner = combined.StackRunner(model, None, k=4, shared_prefix=shared)
    stack = combined.Stack(kv_cache=True, prompt_caching=True, speculative_decoding=True)
    runner.prepare([stack])
    baseline = [g.token_ids for g in runner.run(combined.Stack(), prompts, 8)]
    for _ in range(2):  # a second run starts again from the shared prefix alone, not from its own prompts
        generations = runner.run(stack, prompts, 8)
        assert [g.token_ids for g in generations] == baseline
        assert [g.prefix_cached_tokens for g in generations] == [len(shared), len(shared)]
    cold = combined.StackRunner(model, None, k=4).run(stack, prompts, 8)  # no shared prefix: the first misses
    assert [g.prefix_cached_tokens for g in cold] == [0, len(shared)]


def test_best_order_measures_only_new_stacks_and_pairs_what_it_can(model):
    setup = ce.Setup(combined.StackRunner(model, None, k=4, shared_prefix=[3, 4, 5, 6, 7, 8]),
                     ce.Workload([[3, 4, 5, 6, 7, 8, 9, 10, 3, 4]], 6, 4), [], "INT8")
    order = ["kv_cache", "prompt_caching", "flash_attention", "speculative_decoding"]
    stacks = combined.stacks_in_order(order)
    run = ce.measure_stacks(setup, stacks, {}, repeats=2, warmup=0)
    document = ce.steps(run, stacks, order)
    document["step_speedup"] = [1.0, 10.0, 2.0, 1.5, 5.0]  # speculative decoding now comes right after the cache
    best = ce.best_order(setup, run, stacks, document, 2, 0, "fp32")
    assert best.order[:2] == ["kv_cache", "speculative_decoding"]
    assert best.new == ["kv_cache + speculative_decoding", "kv_cache + prompt_caching + speculative_decoding"]
    assert set(best.run.configuration) == set(best.stacks) and len(best.rounds) == 2
    assert best.equivalence["tokens identical"].all()
    rounds = best.steps.set_index("optimization").cumulative_speedup_rounds
    assert rounds["kv_cache"] == 2 and rounds[best.order[-1]] == 2  # both arms in the first run's rounds
    assert rounds["speculative_decoding"] == 0  # a new stack against the first run's baseline: no pairing


def test_batching_on_a_quantized_stack_reports_agreement_and_asserts_identity_unquantized(monkeypatch):
    """Unquantized, continuous batching must give the sequential tokens (a mismatch raises); quantized, the two
    kernel paths are compared by the share of agreeing tokens, which the frame carries."""
    lm = SimpleNamespace(model=tiny_model("llama", seed=5, vocab_size=49152, max_position_embeddings=512),
                         tokenizer=AutoTokenizer.from_pretrained(default_checkpoint_dir()))
    setup = ce.prepare(lm, quantization_bits=8, speculative_k=2, requests=1, passage_tokens=4,
                       system_tokens=4, demonstration_tokens=4, new_tokens=2)
    frame, gain = ce.batching_on_stack(setup, {"quantization": 0.9}, 2, 3, "fp32")
    assert not frame.quantized.any() and (frame.token_agreement_with_sequential == 1.0).all() and gain > 0
    frame, _ = ce.batching_on_stack(setup, {"quantization": 1.5}, 2, 3, "fp32")
    assert frame.quantized.all() and 0 <= frame.token_agreement_with_sequential.iloc[0] <= 1
    real_run = ce.batching.run

    def broken(scheduler, *args, **kwargs):  # a continuous scheduler that changes one token
        result = real_run(scheduler, *args, **kwargs)
        if scheduler != "continuous":
            return result
        tokens = result.tokens
        first = min(tokens)
        tokens[first] = [t + 1 for t in tokens[first]]
        return SimpleNamespace(stats=result.stats, tokens=tokens)

    monkeypatch.setattr(ce.batching, "run", broken)
    with pytest.raises(AssertionError, match="continuous batching changed the tokens"):
        ce.batching_on_stack(setup, {"quantization": 0.9}, 2, 3, "fp32")
