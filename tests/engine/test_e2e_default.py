"""End-to-end on the real default model (SmolLM2-135M-Instruct, dequantized Q4_1 GGUF)."""
import copy

import pytest
import torch

from llmopt.engine import agreement, cpu_kernels, fused_decode, quantization
from llmopt.engine.generate import Decoder, GenerationConfig

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea."]


def test_default_model_config(default_model):
    cfg = default_model.model.config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == ("llama", 30, 576, 3)
    assert "dequantized from the Q4_1 GGUF" in default_model.source_note


def test_logits_match_transformers(default_model, default_hf_model):
    ids = default_model.tokenizer(" ".join(PROMPTS), return_tensors="pt").input_ids
    with torch.no_grad():
        ref = default_hf_model(ids).logits
        ours = default_model.model(ids, torch.arange(ids.shape[1]))
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_decoding_agrees_with_transformers(default_model, default_hf_model, prompt):
    """Our decoder (no cache, static cache, fused step) against transformers on the real weights: two different
    kernels for one function, so agreement is the ISA-independent rule of `llmopt.engine.agreement` (logit error
    within the fp32 summation bound at every teacher-forced step; greedy tokens identical up to the first
    near-tie under that bound), not bit-equal tokens."""
    ids = default_model.tokenizer(prompt).input_ids
    reference = agreement.Reference.of(agreement.of_transformers(default_hf_model), ids, 24)
    for cache, engine in (("none", "pytorch"), ("static", "pytorch"), ("static", "fused")):
        if engine == "fused" and fused_decode.supported(default_model.model):
            continue  # no CPU kernels here: the fused engine cannot run
        decoder = Decoder(default_model.model, default_model.tokenizer, cache=cache, engine=engine)
        result = reference.against(agreement.of_decoder(decoder))
        print(f"{cache}/{engine} vs transformers: {result.text()}")
        assert result.agrees, (cache, engine, result.text())


def test_chat_template_and_stop_strings(default_model):
    decoder = Decoder(default_model.model, default_model.tokenizer, cache="static")
    ids = decoder.encode("What is 2 + 2?", chat=True)
    assert default_model.tokenizer.decode(ids).count("<|im_start|>") >= 2
    result = decoder.generate("Count: one, two, three,", GenerationConfig(max_new_tokens=30, stop_strings=(",",)))
    assert result.finish_reason in ("stop", "eos") and "," not in result.text


@pytest.mark.parametrize("form", ["fp32", "int4"])
def test_fused_engine_agrees_with_the_pytorch_engine_on_the_default_model(default_model, form):
    """The fused decode step (one C call per token) against the model's own forward on the real weights, fp32
    and INT4 (RTN g64, lm_head INT8, the 03 headline row).

    fp32: the two sum in different orders, so the bound is `agreement.TOLERANCE` (fp32 summation error).
    INT4: both quantize activations to int8 blocks (the Q4 x Q8 scheme), a function with steps, so an ulp of
    difference upstream can flip a rounding by a whole quantum and the flips compound over 30 layers: the
    engines may differ by as much as quantizing the activations at all perturbs the model. The bound is twice
    that perturbation, measured on the same prompt (each engine's flips are at most one such perturbation)."""
    if not cpu_kernels.available():
        pytest.skip(f"llmopt CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    model = default_model.model
    if form == "int4":
        model = copy.deepcopy(model)
        quantization.quantize_model(model, "rtn", 4, 64, lm_head_bits=8)
    reference = agreement.of_decoder(Decoder(model, default_model.tokenizer))
    fused = agreement.of_decoder(Decoder(model, default_model.tokenizer, engine="fused"))
    for prompt in ("The history of the printing press begins", "def fibonacci(n):"):
        ids = default_model.tokenizer(prompt).input_ids
        expected = agreement.Reference.of(reference, ids, 24)
        tolerance = agreement.TOLERANCE
        if form == "int4":
            tolerance = 2 * agreement.activation_quantization_error(model, ids, expected.tokens)
        result = expected.against(fused, tolerance)
        print(f"{form} fused vs pytorch, {prompt!r}: {result.text()}")
        assert result.agrees, result.text()
