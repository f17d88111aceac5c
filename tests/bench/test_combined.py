"""The stacked configurations of notebook 07: lossless stacks reproduce the baseline's tokens."""
import pytest
import torch

from llmopt.bench import combined
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.prefix_cache import PrefixCache
from llmopt.engine.speculative import PromptLookupDrafter, SpeculativeDecoder
from llmopt.engine.testing import tiny_pair
from llmopt.errors import InvalidParameterError


@pytest.fixture(scope="module")
def model():
    return tiny_pair("llama", seed=5)[1]


def test_speculative_decoding_with_a_prefix_cache_is_lossless(model):
    prompts = [[3, 4, 5, 6, 7, 8, 3, 4, 5, 9], [3, 4, 5, 6, 7, 8, 3, 4, 5, 10, 11]]
    config = GenerationConfig(max_new_tokens=12)
    plain = [Decoder(model, cache="none", eos_token_ids=[]).generate(p, config).token_ids for p in prompts]
    decoder = SpeculativeDecoder(model, drafter=PromptLookupDrafter(), k=4, eos_token_ids=[],
                                 prefix_cache=PrefixCache(2**24))
    results = [decoder.generate(p, config) for p in prompts]
    assert [r.token_ids for r in results] == plain
    assert results[1].prefix_cached_tokens > 0


def test_every_lossless_stack_in_both_orders_equals_the_baseline(model):
    runner = combined.StackRunner(model, None, quantize=None, k=4)
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [1, 2, 3, 4, 5, 6, 7]]
    baseline = [g.token_ids for g in runner.run(combined.Stack(), prompts, 10)]
    lossless = [n for n in combined.DOCUMENT_ORDER if n != "quantization"] + list(combined.EXTENSIONS)
    reordered = combined.best_order({"speculative_decoding": 3.0, "flash_attention": 2.0, "kv_cache": 1.5,
                                     "prompt_caching": 1.2, "fused_decode": 2.5})
    for stacks in (combined.stacks_in_order(lossless), combined.stacks_in_order(reordered)):
        for name, stack in stacks.items():
            assert [g.token_ids for g in runner.run(stack, prompts, 10)] == baseline, name


def test_stack_rules_and_best_order():
    with pytest.raises(InvalidParameterError, match="need the KV cache"):
        combined.Stack(prompt_caching=True)
    with pytest.raises(InvalidParameterError, match="need the KV cache"):
        combined.Stack(fused_decode=True)
    order = combined.best_order({"speculative_decoding": 3.0, "kv_cache": 2.0, "quantization": 1.5,
                                 "flash_attention": 1.1, "prompt_caching": 1.2})
    assert order.index("kv_cache") < order.index("speculative_decoding")
    assert order.index("kv_cache") < order.index("prompt_caching")
    assert order[0] == "kv_cache" and order[1] == "speculative_decoding"
    # the cache's own large gain keeps its rank: a smaller gain that needs no cache does not jump ahead of it
    assert combined.best_order({"kv_cache": 7.7, "quantization": 1.4, "prompt_caching": 1.5}) == [
        "kv_cache", "prompt_caching", "quantization"]


def test_cumulative_and_agreement():
    import pandas as pd

    frame = pd.DataFrame({"configuration": ["baseline", "a", "a + b"], "workload_s": [8.0, 4.0, 2.0],
                          "decode_tokens_per_s": [1, 2, 4], "time_to_first_token_s": [1, 1, 1]})
    steps = combined.cumulative(frame, ["a", "a + b"])
    assert steps.cumulative_speedup.tolist() == [1.0, 2.0, 4.0]
    assert steps.step_speedup.tolist() == [1.0, 2.0, 2.0]
    assert combined.tokens_agree([[1, 2, 3]], [[1, 2, 4]]) == pytest.approx(2 / 3)
    assert combined.module_lines("kv_cache") > 50


def test_measure_warms_up_on_one_short_request_and_times_whole_workloads():
    from llmopt.bench import combined
    from llmopt.engine.generate import Generation

    calls = []

    def config(prompts, new_tokens):
        calls.append((len(prompts), new_tokens))
        gens = []
        for p in prompts:
            g = Generation(list(p))
            g.token_ids, g.token_times_s = [1] * new_tokens, [0.01 * (i + 1) for i in range(new_tokens)]
            gens.append(g)
        return gens

    frame = combined.measure({"a": config}, [[1, 2], [3, 4], [5, 6]], 12, repeats=2, warmup=1, progress=False)
    assert calls == [(1, combined.WARMUP_TOKENS), (3, 12), (3, 12)]
    assert frame.repeats.iloc[0] == 2 and frame.requests.iloc[0] == 3


def test_format_engines_and_table_without_llama_cpp():
    import pandas as pd

    _, model = tiny_pair("llama", seed=2, hidden_size=128, intermediate_size=256)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    engines = combined.format_engines(model, None)
    assert list(engines) == [f"llmopt {ours}" for ours, _ in combined.FORMAT_PAIRS]
    for name, engine in engines.items():
        assert len(engine([5, 6, 7, 8], 4).token_ids) == 4, name
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())  # copies, base untouched
    frame = combined.format_table(pd.DataFrame([
        {"engine": "llmopt bf16 weights", "decode_tokens_per_s": 20.0, "prompt_tokens": 100,
         "time_to_first_token_s": 0.5},
        {"engine": "llama.cpp F16", "decode_tokens_per_s": 40.0, "prompt_tokens": 100, "time_to_first_token_s": 0.25},
        {"engine": "llmopt INT8", "decode_tokens_per_s": 30.0, "prompt_tokens": 100, "time_to_first_token_s": 0.5}]))
    assert frame.ours.tolist() == ["bf16 weights", "INT8"]
    assert frame.loc[0, "decode_ours_over_llama_cpp"] == 0.5 and frame.loc[0, "prefill_ours_over_llama_cpp"] == 0.5
    assert pd.isna(frame.loc[1, "decode_ours_over_llama_cpp"])  # no llama.cpp row: no ratio
    with pytest.raises(InvalidParameterError):
        combined.our_format(model, "INT3")


def test_llama_cpp_format_keeps_a_file_already_in_that_format(tmp_path):
    from llmopt.bench import peers

    shipped = tmp_path / "Model.Q4_1.gguf"
    assert peers.llama_cpp_format(shipped, "Q4_1", tmp_path / "out") == shipped  # no re-encoding, no llama.cpp call
    with pytest.raises(InvalidParameterError):
        peers.llama_cpp_format(shipped, "Q3_K", tmp_path / "out")
