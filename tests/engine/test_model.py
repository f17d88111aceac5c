"""Our decoder's logits against transformers' on the same random weights."""
import pytest
import torch

from llmopt.engine.config import ModelConfig, truncated_hf_config
from llmopt.engine.kv_cache import make_cache
from llmopt.engine.testing import tiny_hf_config, tiny_pair
from llmopt.errors import UnsupportedModelError

ROPE_VARIANTS = {
    "default": {},
    "linear": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 128}},
}


def max_relative_error(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_logits_match_transformers(model_type):
    hf, ours = tiny_pair(model_type)
    tokens = torch.randint(0, 96, (2, 33))
    with torch.no_grad():
        assert max_relative_error(ours(tokens, torch.arange(33)), hf(tokens).logits) <= 1e-4


def test_sliding_window_matches_transformers_past_the_window():
    """Mistral's sliding window (8 keys here) on 33 tokens: prefill, then cached decode steps past the window."""
    hf, ours = tiny_pair("mistral", sliding_window=8)
    assert ours.config.sliding_window == 8
    tokens = torch.randint(0, 96, (1, 33))
    with torch.no_grad():
        assert max_relative_error(ours(tokens, torch.arange(33)), hf(tokens).logits) <= 1e-4
        cache = make_cache("static", ours.config, 40)
        ours(tokens[:, :20], torch.arange(20), cache)
        for position in range(20, 33):
            step = ours(tokens[:, position:position + 1], torch.arange(position, position + 1), cache)
            reference = hf(tokens[:, :position + 1]).logits[:, -1:]
            assert max_relative_error(step, reference) <= 1e-4, position


def test_truncated_hf_config_keeps_per_layer_lists_consistent():
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config("qwen2", num_hidden_layers=3)
    config.layer_types = ["full_attention"] * 3
    cut = truncated_hf_config(config, 2)
    assert cut.num_hidden_layers == 2 and len(cut.layer_types) == 2 and config.num_hidden_layers == 3
    AutoModelForCausalLM.from_config(cut)  # transformers 5 validates the lists against the layer count


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_variants_match_transformers(variant):
    hf, ours = tiny_pair("llama", **ROPE_VARIANTS[variant])
    assert ours.config.rope_scaling["rope_type"] == variant
    tokens = torch.randint(0, 96, (1, 300))  # past original_max_position_embeddings
    with torch.no_grad():
        assert max_relative_error(ours(tokens, torch.arange(300)), hf(tokens).logits) <= 1e-4


def test_qwen2_has_qkv_bias_and_untied_head():
    _, ours = tiny_pair("qwen2", tie_word_embeddings=False)
    assert ours.layers[0].self_attn.q_proj.bias is not None
    assert ours.lm_head.weight.data_ptr() != ours.embed_tokens.weight.data_ptr()


def test_tied_embeddings_share_storage():
    _, ours = tiny_pair("llama", tie_word_embeddings=True)
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()


def test_per_row_positions_equal_shared_positions():
    _, ours = tiny_pair("llama")
    tokens = torch.randint(0, 96, (3, 10))
    with torch.no_grad():
        shared = ours(tokens, torch.arange(10))
        per_row = ours(tokens, torch.arange(10).expand(3, 10))
    torch.testing.assert_close(shared, per_row)


def test_last_only_equals_last_position():
    _, ours = tiny_pair("llama")
    tokens = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, torch.arange(12), last_only=True)[:, -1],
                                   ours(tokens, torch.arange(12))[:, -1])


def test_logits_at_equals_those_positions():
    _, ours = tiny_pair("llama")
    tokens = torch.randint(0, 96, (2, 12))
    at = torch.tensor([3, 7, 11])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, torch.arange(12), logits_at=at), ours(tokens, torch.arange(12))[:, at])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_with_signed_sin_is_transformers_rotate_half_bit_for_bit(dtype):
    from transformers.models.llama.modeling_llama import rotate_half

    from llmopt.engine.model import apply_rope

    _, ours = tiny_pair("llama")
    positions = torch.arange(40)
    x = torch.randn(2, 4, 40, ours.config.head_dim).to(dtype)
    cos, signed_sin = ours.rope(positions, dtype)
    half = ours.config.head_dim // 2
    sin = torch.cat((-signed_sin[..., :half], signed_sin[..., half:]), dim=-1)  # the plain table, exactly
    angles = positions[:, None].float() * (ours.config.rope_theta ** (-torch.arange(0, 2 * half, 2) / (2 * half)))
    torch.testing.assert_close(sin.float(), torch.cat((angles, angles), -1).sin(), atol=1e-2, rtol=0)
    assert torch.equal(apply_rope(x, cos, signed_sin), x * cos + rotate_half(x) * sin)


def test_rms_norm_fused_path_is_the_formula_bit_for_bit():
    from llmopt.engine.model import RMSNorm

    norm = RMSNorm(64, 1e-6)
    norm.weight.data = torch.randn(64)
    x = torch.randn(3, 17, 64) * 5
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), norm.weight * x32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    hf, ours32 = tiny_pair("llama")
    _, ours16 = tiny_pair("llama", dtype=dtype)
    tokens = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ref, low = ours32(tokens, torch.arange(16)), ours16(tokens, torch.arange(16))
    assert low.dtype == dtype
    assert max_relative_error(low.float(), ref) < 5e-2


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_hf(GPT2Config())


def test_num_params_matches_transformers():
    hf, ours = tiny_pair("qwen2", tie_word_embeddings=False)
    assert ours.config.num_params == sum(p.numel() for p in hf.parameters())
    assert ModelConfig.from_hf(tiny_hf_config("llama")).num_kv_heads == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_awkward_checkpoints_on_disk_match_transformers(family, tmp_path):
    """The random checkpoints the notebooks' smoke runs use (widths 64 does not divide, odd head counts, GQA 1
    and 4, tied and untied heads, a sliding window), loaded by path as a user's checkpoint is."""
    from transformers import AutoModelForCausalLM

    from llmopt.engine.loading import default_checkpoint_dir, load_model
    from llmopt.engine.testing import AWKWARD, save_random_checkpoint

    path = save_random_checkpoint(tmp_path / family, family, default_checkpoint_dir())
    lm = load_model(str(path))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert lm.model.config.hidden_size == AWKWARD[family]["hidden_size"]
    tokens = torch.tensor([lm.tokenizer("The history of the printing press begins in").input_ids])
    with torch.no_grad():
        ours = lm.model(tokens, torch.arange(tokens.shape[1]))
        assert max_relative_error(ours, hf(tokens).logits) <= 1e-4
