"""The ISA-independent agreement rule for two engines that compute one function with different kernels."""
import pytest
import torch

from llmopt.engine import agreement
from llmopt.engine.generate import Decoder
from llmopt.engine.testing import tiny_pair


def logits(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_identical_tracks_agree():
    ref = logits([[10.0, 1.0, 0.0], [0.0, 9.0, 1.0]])
    result = agreement.compare_logits(ref, ref.clone(), [0, 1], [0, 1])
    assert result.agrees and result.max_relative_error == 0 and result.first_near_tie is None
    assert result.top1_agreement == 1.0


def test_a_divergence_is_explained_only_at_or_after_a_near_tie():
    tolerance = 1e-3
    # step 1's margin (0.005) is under 2 x 1e-3 x 10 = 0.02: a near-tie
    ref = logits([[10.0, 1.0, 0.0], [10.0, 9.995, 0.0], [0.0, 1.0, 10.0]])
    cand = ref + 1e-3  # a shift of every logit keeps the error well inside the bound
    after_tie = agreement.compare_logits(ref, cand, [0, 0, 2], [0, 1, 2], tolerance)
    assert after_tie.first_near_tie == 1 and after_tie.identical_steps == 1 and after_tie.agrees
    before_tie = agreement.compare_logits(ref, cand, [0, 0, 2], [1, 0, 2], tolerance)
    assert before_tie.identical_steps == 0 and not before_tie.agrees


def test_a_logit_error_beyond_the_bound_fails_even_with_equal_tokens():
    ref = logits([[10.0, 1.0, 0.0]])
    cand = logits([[10.0, 1.5, 0.0]])  # 0.5 / 10 = 5e-2 relative
    result = agreement.compare_logits(ref, cand, [0], [0])
    assert abs(result.max_relative_error - 0.05) < 1e-6 and not result.within_bound and not result.agrees
    assert "bound" in result.text()


def test_the_fp32_bound_is_the_summation_error_of_the_longest_reduction():
    assert agreement.TOLERANCE == 16384 * 2.0**-24


@pytest.mark.slow
def test_our_decoder_agrees_with_transformers_on_each_family():
    for family in ("llama", "qwen2", "mistral"):
        hf, ours = tiny_pair(family)
        result = agreement.greedy_agreement(agreement.of_transformers(hf), agreement.of_decoder(Decoder(ours)),
                                            [1, 5, 9, 12], 12)
        assert result.agrees and result.max_relative_error < 1e-5, (family, result.text())


def test_activation_quantization_twin_removes_only_the_activation_rounding():
    from llmopt.engine import cpu_kernels, quantization

    _, model = tiny_pair("llama")
    if not cpu_kernels.available():
        pytest.skip("PyTorch's int4 layers quantize no activations: nothing to remove")
    quantization.quantize_model(model, "rtn", 4, 32)
    prompt, tokens = [1, 5, 9], [3, 4, 5, 6]
    error = agreement.activation_quantization_error(model, prompt, tokens)
    assert 0 < error < 0.5
    twin = agreement.activation_quantization_twin(model)
    assert not any(isinstance(m, cpu_kernels.QuantizedGemvLinear) and m.bits == 4 for m in twin.modules())
