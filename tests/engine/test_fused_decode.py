"""The fused decode step (llmopt.engine.fused_decode): the same logits, cache contents and greedy tokens as the PyTorch
model for every weight format it takes, the model itself for every step it does not take, and clear errors."""
import copy

import pytest
import torch

from llmopt.engine import agreement, cpu_kernels, quantization
from llmopt.engine.fused_decode import FusedDecodeStep, engine_for, supported
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.kv_cache import DynamicCache, StaticCache
from llmopt.engine.testing import tiny_model
from llmopt.errors import InvalidParameterError

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"llmopt CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def prefilled(model, prompt, max_length=64):
    cache = StaticCache(model.config, max_length)
    with torch.inference_mode():
        model(torch.tensor([prompt]), torch.arange(len(prompt)), cache, last_only=True)
    return cache


@pytest.mark.parametrize("model_type,overrides", [("llama", {}), ("qwen2", {}),  # qwen2: q/k/v biases
                                                  ("llama", {"tie_word_embeddings": True})])
def test_fp32_steps_match_the_model_logits_and_cache(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    step = FusedDecodeStep(model)
    prompt = [3, 17, 5, 60, 8, 9, 41]
    ours, theirs = prefilled(model, prompt), prefilled(model, prompt)
    token = torch.tensor([[11]])
    with torch.inference_mode():
        for i in range(6):
            position = torch.tensor([len(prompt) + i])
            expected = model(token, position, theirs, last_only=True)
            actual = step(token, position, ours, last_only=True)
            assert actual.shape == expected.shape
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
            token = expected[:, -1].argmax(-1, keepdim=True)
    assert ours.lengths == theirs.lengths == [len(prompt) + 6] * model.config.num_layers
    for layer in range(model.config.num_layers):
        torch.testing.assert_close(ours.keys[layer], theirs.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values[layer], theirs.values[layer], rtol=1e-5, atol=1e-5)


def quantized(model, form):
    model = copy.deepcopy(model)
    if form == "bf16 weights":  # bf16 weights, fp32 activations (llama.cpp's F16 way)
        cpu_kernels.use_gemv(model)
        for name in quantization.linear_names(model):
            model.get_submodule(name).weight.data = model.get_submodule(name).weight.data.to(torch.bfloat16)
    elif form == "gptq act-order":
        calibration = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(0))
        quantization.quantize_model(model, method="gptq", bits=4, group_size=32, calibration_ids=calibration,
                                    act_order=True)
    elif form != "fp32":
        bits = {"int8": 8, "int4": 4}[form]
        quantization.quantize_model(model, "rtn", bits, 32 if bits == 4 else None)
    return model


ACTIVATION_QUANTIZED = ("int4", "gptq act-order")  # Q4 x Q8: activations rounded to int8 blocks


def tolerance_for(model, form: str, prompt: list[int], tokens: list[int]) -> float:
    """The agreement bound (see llmopt.engine.agreement): fp32 summation error, or, where both engines quantize
    activations, twice what that quantization perturbs the model on this prompt."""
    if form in ACTIVATION_QUANTIZED:
        return 2 * agreement.activation_quantization_error(model, prompt, tokens)
    return agreement.TOLERANCE


@pytest.mark.parametrize("form", ["fp32", "bf16 weights", "int8", "int4", "gptq act-order"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fused_engine_agrees_with_the_pytorch_engine(model_type, form):
    """Two kernels for one function: agreement by the ISA-independent rule, not bit-equal tokens."""
    model = quantized(tiny_model(model_type), form)
    assert supported(model) is None
    reference, fused = agreement.of_decoder(Decoder(model)), agreement.of_decoder(Decoder(model, engine="fused"))
    for prompt in ([1, 5, 9], list(range(3, 40))):
        tolerance = tolerance_for(model, form, prompt, reference[0](prompt, 16))
        result = agreement.greedy_agreement(reference, fused, prompt, 16, tolerance=tolerance)
        assert result.agrees, result.text()


def test_several_tokens_at_once_match_the_model_at_every_position():
    model = tiny_model("qwen2")
    step = FusedDecodeStep(model)
    block = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.inference_mode():
        for last_only in (False, True):
            ours, theirs = prefilled(model, [1, 2, 3]), prefilled(model, [1, 2, 3])
            actual = step(block, torch.arange(3, 8), ours, last_only=last_only)
            expected = model(block, torch.arange(3, 8), theirs, last_only=last_only)
            assert actual.shape == expected.shape
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
            assert ours.lengths == theirs.lengths == [8] * model.config.num_layers
            torch.testing.assert_close(ours.keys[1][:, :, :8], theirs.keys[1][:, :, :8], rtol=1e-5, atol=1e-5)


def test_speculative_decoding_on_the_fused_engine_keeps_the_plain_tokens():
    """Lossless within one engine: speculative decoding on the fused step gives the fused plain decoder's tokens."""
    from llmopt.engine.speculative import PromptLookupDrafter, SpeculativeDecoder

    model = quantized(tiny_model(), "int4")
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]  # something for prompt lookup to find
    expected = Decoder(model, engine="fused").generate(prompt, config).token_ids
    for k in (1, 4, 8):
        fused = SpeculativeDecoder(model, drafter=PromptLookupDrafter(), k=k, engine="fused")
        assert fused.generate(prompt, config).token_ids == expected, k


def test_steps_it_does_not_take_go_to_the_model_unchanged():
    model = tiny_model()
    step = FusedDecodeStep(model)
    with torch.inference_mode():
        many = torch.arange(1, cpu_kernels.MAX_ROWS + 2)[None]  # more tokens than the kernels' rows
        for cache in (prefilled(model, [1, 2]), DynamicCache(model.config)):  # and another kind of cache
            tokens = many if isinstance(cache, StaticCache) else many[:, :3]
            positions = torch.arange(2, 2 + tokens.shape[1])
            reference = copy.deepcopy(cache)
            assert torch.equal(step(tokens, positions, cache), model(tokens, positions, reference))
        batch = StaticCache(model.config, 16, batch_size=2)  # batch of two rows
        tokens = torch.tensor([[4], [8]])
        assert torch.equal(step(tokens, torch.tensor([0]), batch), model(tokens, torch.tensor([0]),
                                                                          StaticCache(model.config, 16, 2)))
        cache, reference = prefilled(model, [1, 2]), prefilled(model, [1, 2])
        with cpu_kernels.switched_off():  # the kernels switched off: the model on PyTorch's matmul
            assert torch.equal(step(torch.tensor([[3]]), torch.tensor([2]), cache),
                               model(torch.tensor([[3]]), torch.tensor([2]), reference))


def test_weights_moved_after_the_step_was_built_are_followed():
    model = tiny_model()
    step = FusedDecodeStep(model)
    expected_cache, cache = prefilled(model, [1, 2, 3]), prefilled(model, [1, 2, 3])
    with torch.inference_mode():
        expected = model(torch.tensor([[4]]), torch.tensor([3]), expected_cache)
        model.to(torch.float64).to(torch.float32)  # new storage for every weight: the old pointers are stale
        torch.testing.assert_close(step(torch.tensor([[4]]), torch.tensor([3]), cache), expected, rtol=1e-4, atol=1e-4)
        model.to(torch.bfloat16)
        with pytest.raises(InvalidParameterError, match="any more"):
            step(torch.tensor([[5]]), torch.tensor([4]), cache)


def test_a_full_cache_raises_the_models_error():
    model = tiny_model()
    step = FusedDecodeStep(model)
    cache = prefilled(model, [1, 2, 3], max_length=3)
    with torch.inference_mode(), pytest.raises(Exception, match="KV cache full"):
        step(torch.tensor([[4]]), torch.tensor([3]), cache)


def test_models_it_cannot_run_say_why():
    with pytest.raises(InvalidParameterError, match="bf16/fp16"):
        Decoder(tiny_model(dtype=torch.bfloat16), engine="fused")
    with pytest.raises(InvalidParameterError, match="static cache"):
        Decoder(tiny_model(), cache="dynamic", engine="fused")
    with pytest.raises(InvalidParameterError, match="unknown engine"):
        Decoder(tiny_model(), engine="turbo")
    with cpu_kernels.switched_off():
        assert "kernels" in supported(tiny_model())
        assert engine_for(tiny_model()) == "pytorch"
    assert supported(tiny_model()) is None
    assert engine_for(tiny_model()) == "fused" and engine_for(tiny_model(), "pytorch") == "pytorch"
    assert engine_for(tiny_model(dtype=torch.bfloat16)) == "pytorch"

