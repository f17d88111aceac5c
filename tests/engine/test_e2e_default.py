"""End-to-end on the real default model (SmolLM2-135M-Instruct, dequantized Q4_1 GGUF)."""
import pytest
import torch

from llmopt.engine import fused_decode
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
def test_greedy_tokens_match_transformers(default_model, default_hf_model, prompt):
    ids = default_model.tokenizer(prompt, return_tensors="pt").input_ids
    ref = default_hf_model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    for cache, engine in (("none", "pytorch"), ("static", "pytorch"), ("static", "fused")):
        if engine == "fused" and fused_decode.supported(default_model.model):
            continue  # no CPU kernels here: the fused engine cannot run
        got = Decoder(default_model.model, default_model.tokenizer, cache=cache, engine=engine).generate(
            prompt, GenerationConfig(max_new_tokens=24)).token_ids
        assert got == ref, (cache, engine)


def test_chat_template_and_stop_strings(default_model):
    decoder = Decoder(default_model.model, default_model.tokenizer, cache="static")
    ids = decoder.encode("What is 2 + 2?", chat=True)
    assert default_model.tokenizer.decode(ids).count("<|im_start|>") >= 2
    result = decoder.generate("Count: one, two, three,", GenerationConfig(max_new_tokens=30, stop_strings=(",",)))
    assert result.finish_reason in ("stop", "eos") and "," not in result.text


@pytest.mark.parametrize("form", ["fp32", "int4"])
def test_fused_engine_generates_the_pytorch_engines_tokens_on_the_default_model(default_model, form):
    """The fused decode step (one C call per token) against the model's own forward on the real weights: the
    same greedy tokens, fp32 and INT4 (RTN g64, lm_head INT8, the 03 headline row)."""
    import copy

    from llmopt.engine import cpu_kernels, quantization

    if not cpu_kernels.available():
        pytest.skip(f"llmopt CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    model = default_model.model
    if form == "int4":
        model = copy.deepcopy(model)
        quantization.quantize_model(model, "rtn", 4, 64, lm_head_bits=8)
    config = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    prompt = "The history of the printing press begins"
    expected = Decoder(model, default_model.tokenizer).generate(prompt, config)
    fused = Decoder(model, default_model.tokenizer, engine="fused").generate(prompt, config)
    assert fused.token_ids == expected.token_ids, (fused.text, expected.text)
