"""End-to-end on the real default model (SmolLM2-135M-Instruct, dequantized Q4_1 GGUF)."""
import pytest
import torch

from llmopt.generate import Decoder, GenerationConfig

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
    for cache in ("none", "static"):
        got = Decoder(default_model.model, default_model.tokenizer, cache=cache).generate(
            prompt, GenerationConfig(max_new_tokens=24)).token_ids
        assert got == ref


def test_chat_template_and_stop_strings(default_model):
    decoder = Decoder(default_model.model, default_model.tokenizer, cache="static")
    ids = decoder.encode("What is 2 + 2?", chat=True)
    assert default_model.tokenizer.decode(ids).count("<|im_start|>") >= 2
    result = decoder.generate("Count: one, two, three,", GenerationConfig(max_new_tokens=30, stop_strings=(",",)))
    assert result.finish_reason in ("stop", "eos") and "," not in result.text
