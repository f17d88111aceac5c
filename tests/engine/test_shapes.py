"""Named model shapes (`-p model=shape:NAME`): seeded random weights with a known architecture."""
import json

import pytest
import torch

from llmopt.engine import shapes
from llmopt.engine.config import ModelConfig
from llmopt.engine.loading import default_checkpoint_dir, load_model
from llmopt.errors import InvalidParameterError

# A Qwen2-style shape small enough for unit tests: q/k/v biases, GQA, tied embeddings, and a vocabulary larger
# than the tokenizer's 49152 (as Qwen2.5's 151936 is).
TINY = shapes.Shape("Tiny-Qwen2", dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=160,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=50000,
    max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    use_sliding_window=False, sliding_window=1024, max_window_layers=2, hidden_act="silu"))


@pytest.fixture
def tiny_shape(tmp_path, monkeypatch):
    """`shape:tiny` registered, its checkpoints written under a temporary cache (the default model stays put)."""
    monkeypatch.setitem(shapes.SHAPES, "tiny", TINY)
    monkeypatch.setattr(shapes, "cache_dir", lambda: tmp_path / "cache")
    return "shape:tiny"


def test_registry_configs():
    for key in shapes.SHAPES:
        cfg = ModelConfig.from_hf(shapes.hf_config(key))
        assert cfg.model_type in ("llama", "qwen2")
    qwen = ModelConfig.from_hf(shapes.hf_config("qwen2.5-0.5b"))
    assert (qwen.hidden_size, qwen.num_layers, qwen.num_heads, qwen.num_kv_heads, qwen.head_dim) == (896, 24, 14, 2, 64)
    assert (qwen.intermediate_size, qwen.vocab_size, qwen.rope_theta, qwen.rms_norm_eps) == (4864, 151936, 1e6, 1e-6)
    assert qwen.tie_word_embeddings and qwen.qkv_bias and qwen.max_position_embeddings == 32768
    assert qwen.num_params == 494_032_768
    smol = ModelConfig.from_hf(shapes.hf_config("smollm2-135m"))
    assert (smol.hidden_size, smol.num_layers, smol.num_kv_heads, smol.vocab_size) == (576, 30, 3, 49152)
    llama = ModelConfig.from_hf(shapes.hf_config("llama-3.2-1b"))
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_theta == 500000.0
    text = shapes.describe(qwen)
    assert "hidden 896, 24 layers, 14 heads / 2 KV heads, head_dim 64, intermediate 4864, vocab 151936" in text
    assert "tied embeddings" in text and "q/k/v bias" in text


def test_weights_are_seeded(tiny_shape):
    cfg = ModelConfig.from_hf(shapes.hf_config("tiny"))
    a, b, c = (shapes.random_state_dict(cfg, seed) for seed in (0, 0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert "lm_head.weight" not in a  # tied: the embedding is the head
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert torch.equal(a["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    assert not a["model.layers.0.self_attn.q_proj.bias"].any()
    std = a["model.layers.1.mlp.up_proj.weight"].float().std().item()
    assert 0.019 < std < 0.021


@pytest.mark.slow
def test_load_shape(tiny_shape, tmp_path):
    lm = load_model(tiny_shape, "fp32")
    assert lm.name == "Tiny-Qwen2 shape (random weights)"
    assert lm.source_note.startswith("random weights (seed 0) with the shape of Tiny-Qwen2 (hidden 64, 2 layers")
    assert "meaningless" in lm.source_note
    assert lm.checkpoint == tmp_path / "cache" / "shapes" / "tiny-seed0"
    assert lm.model.config.vocab_size == 50000 and lm.model.config.model_type == "qwen2"
    assert len(lm.tokenizer) == 49152 and lm.tokenizer.eos_token == "<|im_end|>"
    assert lm.model.config.eos_token_ids == (lm.tokenizer.eos_token_id,)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids, torch.arange(ids.shape[1]))
    assert torch.isfinite(logits).all() and logits.std() > 0.05
    assert logits[0].argmax(-1).unique().numel() > 1  # not one token everywhere
    # the same weights again, from the checkpoint written once; bf16 is those weights rounded (they are bf16 already)
    again = load_model(tiny_shape, "bf16")
    assert again.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(again.model.embed_tokens.weight.float(), lm.model.embed_tokens.weight)
    seeded = load_model(tiny_shape + "@3")
    assert seeded.name == "Tiny-Qwen2 shape (random weights, seed 3)" and seeded.checkpoint.name == "tiny-seed3"
    assert not torch.equal(seeded.model.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_checkpoint_written_once_and_rewritten_on_change(tiny_shape, monkeypatch):
    path = shapes.checkpoint_dir(tiny_shape, default_checkpoint_dir())
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert shapes.checkpoint_dir(tiny_shape, default_checkpoint_dir()) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written
    source = json.loads((path / "llmopt_source.json").read_text())
    assert source["fingerprint"]["shape"] == "tiny" and "random weights" in source["note"]
    assert not list(path.parent.glob(".staging-*"))
    changed = shapes.Shape(TINY.title, {**TINY.config, "intermediate_size": 96})
    monkeypatch.setitem(shapes.SHAPES, "tiny", changed)
    shapes.checkpoint_dir(tiny_shape, default_checkpoint_dir())
    assert json.loads((path / "config.json").read_text())["intermediate_size"] == 96


def test_matches_transformers(tiny_shape):
    """transformers peers load the very checkpoint: same weights, same logits."""
    from transformers import AutoModelForCausalLM

    lm = load_model(tiny_shape, "fp32", kernels="torch")
    hf = AutoModelForCausalLM.from_pretrained(lm.checkpoint, dtype=torch.float32).eval()
    assert hf.config.vocab_size == 50000
    ids = lm.tokenizer("def fibonacci(n): return n if n < 2 else", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(ids).logits
        ours = lm.model(ids, torch.arange(ids.shape[1]))
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("name", ["shape:nope", "shape:", "SHAPE:qwen2.5-0.5", "shape:tiny@x", "shape:tiny@-1"])
def test_bad_names(tiny_shape, name):
    with pytest.raises(InvalidParameterError) as err:
        load_model(name)
    assert "shape:qwen2.5-0.5b" in str(err.value) or "seed" in str(err.value)


def test_unknown_shape_lists_known(tiny_shape):
    with pytest.raises(InvalidParameterError, match="known shapes: shape:qwen2.5-0.5b, shape:smollm2-135m"):
        load_model("shape:qwen-0.5b")


def test_model_parameter_checks_shapes_up_front():
    from llmopt.report.parameters import COMMON

    model = COMMON["model"]
    for ok in (None, "shape:qwen2.5-0.5b", "shape:llama-3.2-1b@2", "/path/to/ckpt", "owner/name", "default"):
        assert model.accepts(ok), ok
    for bad in ("shape:nope", "shape:qwen2.5-0.5b@x"):
        assert not model.accepts(bad), bad
    assert "shape:qwen2.5-0.5b" in model.describe()


@pytest.mark.e2e
def test_qwen_shape_bf16():
    """The design document's model, built for real (once; the checkpoint stays in the cache)."""
    lm = load_model("shape:qwen2.5-0.5b", "bf16")
    cfg = lm.model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == ("qwen2", 896, 24, 151936)
    params = sum(p.numel() for p in lm.model.parameters())  # tied: the head is the embedding, counted once
    assert params == cfg.num_params == 494_032_768
    assert lm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert lm.name == "Qwen2.5-0.5B shape (random weights)"
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids, torch.arange(ids.shape[1])).float()
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 100
    assert logits[0].argmax(-1).unique().numel() > 1
