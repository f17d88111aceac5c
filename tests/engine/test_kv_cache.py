"""KV cache: lossless against the no-cache decoder, exact byte accounting, GQA stores only KV heads."""
import pytest
import torch

from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.kv_cache import DynamicCache, StaticCache, kv_bytes_per_token, make_cache
from llmopt.engine.testing import tiny_pair
from llmopt.errors import ContextLengthError

PROMPTS = [[5, 6, 7], [11, 3, 40, 41, 42, 9, 17, 80], list(range(10, 60)), [90]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_pair(request.param, seed=11)[1]


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_cached_greedy_equals_no_cache(model, kind):
    config = GenerationConfig(max_new_tokens=24)
    for prompt in PROMPTS:
        plain = Decoder(model, cache="none", eos_token_ids=[]).generate(prompt, config).token_ids
        assert Decoder(model, cache=kind, eos_token_ids=[]).generate(prompt, config).token_ids == plain


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_seeded_sampling_equal_with_and_without_cache(model, kind):
    config = GenerationConfig(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=1234)
    for prompt in PROMPTS[:3]:
        plain = Decoder(model, cache="none", eos_token_ids=[]).generate(prompt, config).token_ids
        assert Decoder(model, cache=kind, eos_token_ids=[]).generate(prompt, config).token_ids == plain


def test_cached_logits_equal_full_forward(model):
    tokens = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        full = model(tokens, torch.arange(20))
        cache = StaticCache(model.config, 32)
        first = model(tokens[:, :12], torch.arange(12), cache)
        rest = [model(tokens[:, i:i + 1], torch.arange(i, i + 1), cache) for i in range(12, 20)]
    stepwise = torch.cat([first] + rest, dim=1)
    torch.testing.assert_close(stepwise, full, rtol=1e-5, atol=1e-5)


def test_cache_holds_only_kv_heads_and_counts_bytes_exactly(model):
    cfg = model.config
    assert cfg.num_kv_heads < cfg.num_heads
    cache = StaticCache(cfg, 40, dtype=torch.float32)
    assert cache.keys[0].shape == (1, cfg.num_kv_heads, 40, cfg.head_dim)
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    assert kv_bytes_per_token(cfg, torch.float32) == per_token
    assert kv_bytes_per_token(cfg, torch.bfloat16) == per_token // 2
    assert cache.allocated_bytes == 40 * per_token
    Decoder(model, cache="dynamic", eos_token_ids=[]).generate([1, 2, 3], GenerationConfig(max_new_tokens=5))
    dynamic = DynamicCache(cfg)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), torch.arange(7), dynamic)
    assert dynamic.length == 7
    assert dynamic.allocated_bytes == dynamic.used_bytes == 7 * per_token


def test_decoder_cache_length_after_generation(model):
    decoder = Decoder(model, cache="static", eos_token_ids=[])
    decoder.generate([1, 2, 3, 4], GenerationConfig(max_new_tokens=6))
    # the last sampled token is never fed back, so the cache holds prompt + new - 1 positions
    assert decoder.cache.length == 4 + 6 - 1
    assert decoder.cache.used_bytes == 9 * decoder.cache.bytes_per_token


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_crop_and_reset(model, kind):
    cache = make_cache(kind, model.config, 16)
    tokens = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        model(tokens, torch.arange(10), cache)
        cache.crop(6)
        assert cache.length == 6
        after_crop = model(tokens[:, 6:], torch.arange(6, 10), cache)
        fresh = make_cache(kind, model.config, 16)
        reference = model(tokens, torch.arange(10), fresh)[:, 6:]
    torch.testing.assert_close(after_crop, reference, rtol=1e-5, atol=1e-5)
    cache.reset()
    assert cache.length == 0


def test_static_cache_overflow_is_a_clear_error(model):
    cache = StaticCache(model.config, 4)
    with pytest.raises(ContextLengthError, match="KV cache full"), torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), torch.arange(5), cache)
