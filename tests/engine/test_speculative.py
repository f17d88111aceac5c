"""Speculative decoding: greedy output is the target's own, sampled output has the target's distribution."""
import pytest
import torch
from scipy.stats import chisquare

from llmopt.bench import speculative_bench
from llmopt.engine import speculative
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.sampling import SamplingParams, probabilities
from llmopt.engine.speculative import (
    PromptLookupDrafter,
    SpeculativeDecoder,
    early_exit_model,
    expected_speedup,
    make_drafter,
    speculative_sample,
)
from llmopt.engine.testing import tiny_model
from llmopt.errors import InvalidParameterError

PROMPT = [5, 17, 23, 5, 17, 40, 41, 42, 5, 17]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine 2 threads make them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def reference(target):
    return Decoder(target, cache="static").generate(PROMPT, GenerationConfig(max_new_tokens=40, ignore_eos=True))


@pytest.fixture(scope="module")
def drafters(target):
    """Every drafter, built once (each `begin` resets its state)."""
    return {
        "draft_model (other weights)": make_drafter("draft_model", target, model=tiny_model(seed=1)),
        "draft_model (the target itself)": make_drafter("draft_model", target, model=target),
        "draft_model (larger vocab)": make_drafter("draft_model", target, model=tiny_model(seed=2, vocab_size=112)),
        "self_quantized (bf16 stand-in)": make_drafter("self_quantized", target),
        "self_quantized (given quantizer)": make_drafter("self_quantized", target,
                                                         quantize=lambda m: m.to(torch.float16)),
        "prompt_lookup": make_drafter("prompt_lookup", target),
        "early_exit": make_drafter("early_exit", target, num_layers=1),
    }


DRAFTER_NAMES = ["draft_model (other weights)", "draft_model (the target itself)", "draft_model (larger vocab)",
                 "self_quantized (bf16 stand-in)", "self_quantized (given quantizer)", "prompt_lookup", "early_exit"]


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("drafter", DRAFTER_NAMES)
def test_greedy_output_is_the_targets_own(target, reference, drafters, drafter, k):
    result = SpeculativeDecoder(target, drafter=drafters[drafter], k=k).generate(
        PROMPT, GenerationConfig(max_new_tokens=40, ignore_eos=True))
    assert result.token_ids == reference.token_ids
    stats = result.stats
    assert stats.target_passes == len(result.token_ids) - 1 - stats.accepted  # every pass adds accepted + 1
    if "itself" in drafter or "stand-in" in drafter:
        assert stats.acceptance_rate > 0.9  # the same model drafts: the test exercises multi-token acceptance


def test_dynamic_cache_and_stop_rules_match_the_plain_decoder(target, reference):
    eos = reference.token_ids[17]
    config = GenerationConfig(max_new_tokens=40)
    plain = Decoder(target, cache="dynamic", eos_token_ids=[eos]).generate(PROMPT, config)
    spec = SpeculativeDecoder(target, drafter=make_drafter("draft_model", target, model=target), k=5,
                              cache="dynamic", eos_token_ids=[eos]).generate(PROMPT, config)
    assert plain.finish_reason == spec.finish_reason == "eos"
    assert spec.token_ids == plain.token_ids


def test_prompt_lookup_copies_what_followed_the_latest_match():
    lookup = PromptLookupDrafter(max_ngram=2)
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3, 7, 1, 2, 3], 3).tokens == [7, 1, 2]  # bigram (2, 3): latest
    assert lookup.propose([1, 2, 3, 4, 1, 2], 10).tokens == [3, 4, 1, 2]  # stops at the end of the sequence
    assert lookup.propose([1, 2, 3, 4, 5], 3).tokens == []  # nothing matches


def test_early_exit_shares_the_targets_modules_without_changing_it(target):
    shallow = early_exit_model(target, 1)
    assert len(shallow.layers) == 1 and len(target.layers) == target.config.num_layers == 2
    assert shallow.layers[0] is target.layers[0] and shallow.lm_head is target.lm_head
    with pytest.raises(InvalidParameterError):
        early_exit_model(target, 2)


def test_bad_parameters_raise_readable_errors(target):
    with pytest.raises(InvalidParameterError):
        SpeculativeDecoder(target, drafter=PromptLookupDrafter(), cache="none")
    with pytest.raises(InvalidParameterError):
        SpeculativeDecoder(target, drafter=PromptLookupDrafter(), k=0)
    with pytest.raises(InvalidParameterError):
        make_drafter("medusa", target)


def test_expected_speedup_formula():
    assert expected_speedup(0.0, 5, 0.0) == pytest.approx(1.0)
    assert expected_speedup(1.0, 5, 0.1) == pytest.approx(6 / 1.5)
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx((1 - 0.8 ** 5) / 0.2)


def test_sampling_is_seeded_and_a_perfect_drafter_is_accepted(target):
    config = GenerationConfig(max_new_tokens=30, temperature=0.9, top_k=40, seed=3, ignore_eos=True)
    decoder = SpeculativeDecoder(target, drafter=make_drafter("draft_model", target, model=target), k=4)
    first, second = decoder.generate(PROMPT, config), decoder.generate(PROMPT, config)
    assert first.token_ids == second.token_ids
    assert first.stats.acceptance_rate > 0.9  # p == q up to float rounding: min(1, p/q) ~ 1


# --- the statistical test -----------------------------------------------------------------------------------
# Tiny random target and draft over a vocabulary of 16. Exact next-token distributions after the prompt, after
# the prompt + x and after the prompt + x + y (every x, y) come from one batched forward pass. N independent
# speculative rounds are then run in batch through `speculative_sample` (the function the decoder uses), a second
# round where the first rejected at its first draft, and the joint distribution of the first two emitted tokens
# is compared with the target's own p(t1) p(t2 | t1) by a chi-square test.

VOCAB, SAMPLES, SEED = 16, 20_000, 0


@pytest.fixture(scope="module")
def exact_distributions():
    prompt = torch.tensor([3, 9, 4, 11, 5, 7])
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [V*V, 2]: (x, y)
    tokens = torch.cat([prompt.expand(len(pairs), -1), pairs], dim=1)
    positions = torch.arange(tokens.shape[1])
    out = {}
    for name, seed in (("p", 0), ("q", 5)):
        model = tiny_model(seed=seed, vocab_size=VOCAB, init_std=0.08)
        with torch.no_grad():
            logits = model(tokens, positions)
        L = len(prompt)
        out[name] = (logits[0, L - 1], logits[::VOCAB, L].clone(), logits[:, L + 1].reshape(VOCAB, VOCAB, VOCAB))
    return out


def two_emitted_tokens(dists, k: int, params: SamplingParams, generator: torch.Generator):
    """First two tokens of N independent speculative decodes (draft length k in the first round)."""
    p0, p1, p2 = (probabilities(x, params) for x in dists["p"])
    q0, q1, _ = (probabilities(x, params) for x in dists["q"])
    n_rows = SAMPLES

    def draw(dist):
        return torch.multinomial(dist, 1, generator=generator).squeeze(-1)

    d1 = draw(q0.expand(n_rows, -1))
    if k == 1:
        p = torch.stack([p0.expand(n_rows, -1), p1[d1]], dim=1)
        q, drafts = q0.expand(n_rows, -1)[:, None], d1[:, None]
    else:
        d2 = draw(q1[d1])
        p = torch.stack([p0.expand(n_rows, -1), p1[d1], p2[d1, d2]], dim=1)
        q, drafts = torch.stack([q0.expand(n_rows, -1), q1[d1]], dim=1), torch.stack([d1, d2], dim=1)
    n, extra = speculative_sample(p, q, drafts, generator)
    t1 = torch.where(n >= 1, d1, extra)
    # a second round (k = 1) after t1, used where the first emitted only t1
    d = draw(q1[t1])
    n2, extra2 = speculative_sample(torch.stack([p1[t1], p2[t1, d]], dim=1), q1[t1][:, None], d[:, None], generator)
    second_round = torch.where(n2 >= 1, d, extra2)
    t2 = torch.where(n == 0, second_round, extra)  # n == 1: the residual (k > 1) or bonus (k == 1) token
    if k > 1:
        t2 = torch.where(n >= 2, drafts[:, 1], t2)
    exact = (p0[:, None] * p1).reshape(-1)  # p(t1) p(t2 | t1)
    return t1 * VOCAB + t2, exact


def chi_square_p_value(cells: torch.Tensor, exact: torch.Tensor) -> float:
    observed = torch.bincount(cells, minlength=len(exact)).double()
    expected = exact.double() * len(cells)
    if observed[expected == 0].sum() > 0:  # a token pair the target can never produce
        return 0.0
    observed, expected = observed[expected > 0], expected[expected > 0]
    small = expected < 5  # pool rare cells so the chi-square approximation holds
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    expected *= observed.sum() / expected.sum()
    return chisquare(observed.numpy(), expected.numpy()).pvalue


SETTINGS = [(1, SamplingParams(temperature=1.0)), (2, SamplingParams(temperature=1.0)),
            (2, SamplingParams(temperature=0.8, top_k=10, top_p=0.95))]


@pytest.mark.parametrize("k,params", SETTINGS)
def test_speculative_sampling_preserves_the_target_distribution(exact_distributions, k, params):
    generator = torch.Generator().manual_seed(SEED)
    cells, exact = two_emitted_tokens(exact_distributions, k, params, generator)
    assert len(cells) >= 10_000
    assert chi_square_p_value(cells, exact) >= 0.01


BROKEN = {
    "always accept": ("acceptance_mask", lambda p, q, u: torch.ones_like(u, dtype=torch.bool)),
    "accept with probability p": ("acceptance_mask", lambda p, q, u: u < p),
    "resample from p, not p - q": ("residual_distribution", lambda p, q: p),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_acceptance_rule_fails_the_same_test(exact_distributions, monkeypatch, broken):
    name, replacement = BROKEN[broken]
    monkeypatch.setattr(speculative, name, replacement)
    for k, params in SETTINGS:
        generator = torch.Generator().manual_seed(SEED)
        cells, exact = two_emitted_tokens(exact_distributions, k, params, generator)
        assert chi_square_p_value(cells, exact) < 0.01, (broken, k, params)


def test_the_exact_distribution_is_not_degenerate(exact_distributions):
    """Guards the statistical test's power: the draft differs from the target and neither is one-hot."""
    p0 = torch.softmax(exact_distributions["p"][0], -1)
    q0 = torch.softmax(exact_distributions["q"][0], -1)
    assert p0.max() < 0.6 and (p0 - q0).abs().sum() > 0.3



# --- the benchmark sweep and the document comparison the notebook uses ----------------------------------------

def test_sweep_rows_compare_every_drafter_with_the_plain_decoder(target):
    drafters = {"prompt_lookup": (PromptLookupDrafter(), [2]),
                "itself": (make_drafter("draft_model", target, model=target), [3])}
    rows = speculative_bench.sweep(target, None, drafters, {"w": PROMPT}, new_tokens=12, repeats=1, warmup_tokens=2,
                             progress=False)
    assert list(rows.drafter) == [speculative_bench.PLAIN, "prompt_lookup", "itself"] and list(rows.k) == [0, 2, 3]
    assert rows.tokens_identical.all()
    assert rows.speedup.iloc[0] == pytest.approx(1.0)
    itself = rows.iloc[2]
    assert itself.alpha == 1.0 and itself.tokens_per_pass == pytest.approx(11 / 3)  # 11 tokens after the first
    assert itself.expected_speedup == pytest.approx(expected_speedup(1.0, 3, itself.draft_cost_ratio))


def test_document_comparison_picks_the_nearest_measured_acceptance():
    import pandas as pd

    from llmopt.bench import datasets

    results = pd.DataFrame({"workload": ["a", "b", "c"], "drafter": ["x", "y", "z"], "k": [5, 5, 2],
                            "alpha": [0.52, 0.93, 0.7], "speedup": [1.2, 3.5, 9.0],
                            "speedup_geomean": [1.2, 3.5, 9.0], "speedup_low": [1.1, 3.3, 8.0],
                            "speedup_high": [1.3, 3.7, 10.0], "speedup_rounds": [5, 5, 5]})
    table = speculative_bench.document_comparison(results, datasets.estimates("speculative_decoding"), k=5)
    assert list(table.measured_speedup.fillna(-1)) == [1.2, -1, 3.5]  # k=2 row ignored, 70% unmeasured
    assert table.verdict.iloc[2].startswith("confirmed") and table.verdict.iloc[1] == "not measured"
    assert table.verdict.iloc[0].startswith("refuted")


def test_self_quantizer_names_what_it_applies(target):
    quantize, scheme = speculative.self_quantizer("int8")
    drafted = make_drafter("self_quantized", target, quantize=quantize)
    assert scheme.startswith(("int8", "bf16 (stand-in"))
    assert next(target.parameters()).dtype == torch.float32  # the target itself is untouched
    assert drafted.model is not target
    with pytest.raises(InvalidParameterError):
        speculative.self_quantizer("int3")


# --- the real default model --------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_default_model_greedy_speculation_is_exact(default_model):
    model, tokenizer = default_model.model, default_model.tokenizer
    prompts = speculative_bench.workload_prompts(tokenizer, ["repeat"])
    passage_start = " ".join(speculative_bench.grounded_passage().split()[:5])
    assert tokenizer.decode(prompts["repeat"]).endswith(passage_start)
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    reference = Decoder(model, tokenizer).generate(prompts["repeat"], config).token_ids
    quantize, _ = speculative.self_quantizer("int8")
    for kind, k, options in [("prompt_lookup", 4, {}), ("early_exit", 2, {"num_layers": 10}),
                             ("self_quantized", 3, {"quantize": quantize})]:
        drafter = make_drafter(kind, model, tokenizer, **options)
        result = SpeculativeDecoder(model, tokenizer, drafter, k).generate(prompts["repeat"], config)
        assert result.token_ids == reference, kind
        if kind == "prompt_lookup":
            assert result.stats.accepted > 0  # the passage is copied: multi-token acceptance is exercised
