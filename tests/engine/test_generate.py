"""The generation loop: greedy equals transformers, sampling is seeded, stop rules, streaming, errors."""
import pytest
import torch

from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.sampling import SamplingParams, probabilities
from llmopt.engine.testing import tiny_pair
from llmopt.errors import ContextLengthError, InvalidParameterError


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2", seed=3)


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("cache", ["none", "static", "dynamic"])
def test_greedy_equals_transformers_generate(pair, cache):
    hf, ours = pair
    decoder = Decoder(ours, cache=cache, eos_token_ids=[])
    for prompt in ([5, 6, 7], [11, 3, 40, 41, 42, 9, 17, 80], list(range(10, 40))):
        got = decoder.generate(prompt, GenerationConfig(max_new_tokens=20)).token_ids
        assert got == hf_greedy(hf, prompt, 20)


def test_sampling_is_reproducible_with_a_seed(pair):
    decoder = Decoder(pair[1], cache="none", eos_token_ids=[])
    config = GenerationConfig(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    first = decoder.generate([1, 2, 3], config).token_ids
    assert decoder.generate([1, 2, 3], config).token_ids == first
    other = decoder.generate([1, 2, 3], GenerationConfig(max_new_tokens=16, temperature=0.9, seed=8)).token_ids
    assert other != first


def test_top_k_and_top_p_restrict_the_distribution():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (probabilities(logits, SamplingParams(1.0, top_k=2)) > 0).sum() == 2
    p = probabilities(logits, SamplingParams(1.0, top_p=0.5))
    assert (p > 0).sum() == 1 and p[0, 0] == 1.0  # the top token alone carries > 0.5
    p = probabilities(logits, SamplingParams(1.0, top_p=0.9))
    full = torch.softmax(logits, -1)[0]
    kept = int((p > 0).sum())
    assert full[:kept - 1].sum() < 0.9 <= full[:kept].sum()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))


def test_eos_stops_generation(pair):
    hf, ours = pair
    prompt = [5, 6, 7]
    reference = hf_greedy(hf, prompt, 12)
    eos = reference[4]
    result = Decoder(ours, cache="static", eos_token_ids=[eos]).generate(prompt, GenerationConfig(max_new_tokens=12))
    assert result.finish_reason == "eos"
    assert result.token_ids == reference[:reference.index(eos) + 1]
    ignored = Decoder(ours, cache="static", eos_token_ids=[eos]).generate(
        prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    assert ignored.token_ids == reference


def test_stream_yields_the_same_tokens_with_timings(pair):
    decoder = Decoder(pair[1], cache="static", eos_token_ids=[])
    config = GenerationConfig(max_new_tokens=10)
    events = list(decoder.stream([4, 5, 6], config))
    assert [e.token_id for e in events] == decoder.generate([4, 5, 6], config).token_ids
    times = [e.elapsed_s for e in events]
    assert times == sorted(times) and times[0] > 0


def test_timings_are_recorded(pair):
    result = Decoder(pair[1], cache="static", eos_token_ids=[]).generate([1, 2], GenerationConfig(max_new_tokens=8))
    assert len(result.token_times_s) == 8 and len(result.token_latencies_s) == 8
    assert 0 < result.time_to_first_token_s <= result.total_s
    assert sum(result.token_latencies_s) == pytest.approx(result.total_s)
    assert result.decode_tokens_per_s > 0


def test_bad_parameters_raise_clear_errors(pair):
    decoder = Decoder(pair[1], cache="static")
    with pytest.raises(InvalidParameterError, match="max_new_tokens must be positive"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(InvalidParameterError):
        GenerationConfig(temperature=-1)
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 512"):
        decoder.generate(list(range(90)) * 6, GenerationConfig(max_new_tokens=4))
    with pytest.raises(InvalidParameterError, match="unknown cache kind"):
        Decoder(pair[1], cache="paged")
    with pytest.raises(InvalidParameterError, match="empty"):
        decoder.generate([], GenerationConfig())


def test_lossless_check_asserts_in_fp32_and_reports_in_half_precision(capsys):
    from llmopt.bench.benchmark import check_lossless

    assert check_lossless(True, "fp32", "x") and check_lossless(True, "bf16", "x")
    with pytest.raises(AssertionError, match="tokens changed"):
        check_lossless(False, "fp32", "tokens changed")
    assert check_lossless(False, "bf16", "tokens changed") is False
    assert "tokens changed" in capsys.readouterr().out


def test_compare_spreads_each_conditions_repeats_over_the_whole_sweep():
    """Each repeat (a round of `run_rounds`) passes every (prompt length, engine) once, in a shuffled order, so a
    condition's repeats are a round apart and the host's drift shows in every condition's spread; warm-up runs
    happen first, at the first length."""
    from llmopt.bench import benchmark
    from llmopt.engine.generate import Generation

    class Words:  # a tokenizer stand-in: one id per character
        def __call__(self, text):
            return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

    calls = []

    def engine(name, step_s):
        def run(prompt_ids, new_tokens):
            calls.append((name, len(prompt_ids)))
            times = [step_s * (i + 1) * len(calls) for i in range(new_tokens)]  # slower with every call: drift
            return Generation(list(prompt_ids), list(range(new_tokens)), token_times_s=times)
        return run

    frame = benchmark.compare({"a": engine("a", 0.01), "b": engine("b", 0.02)}, [4, 8], 3, Words(), repeats=2,
                              warmup=1, progress=False)
    conditions = sorted([("a", 4), ("b", 4), ("a", 8), ("b", 8)])
    assert calls[:2] == [("a", 4), ("b", 4)] and [sorted(calls[2:6]), sorted(calls[6:])] == [conditions] * 2
    assert list(zip(frame.engine, frame.prompt_tokens)) == [("a", 4), ("b", 4), ("a", 8), ("b", 8)]
    assert (frame.repeats == 2).all()
    # a's runs at length 4 were calls n1 (round 0) and n2 (round 1): 1/(0.01*n) tokens/s, a round apart
    n1, n2 = [i + 1 for i, call in enumerate(calls) if call == ("a", 4)][1:]
    a4 = frame.set_index(["engine", "prompt_tokens"]).loc[("a", 4)]
    assert n2 - n1 >= 1 and a4.decode_tokens_per_s_spread == pytest.approx(1 / (0.01 * n1) - 1 / (0.01 * n2))
