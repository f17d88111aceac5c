"""Prefix cache: lossless reuse (full hit, partial hit, miss), invalidation across models, LRU / TTL / byte limit."""
import collections
import random

import pytest
import torch

from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.prefix_cache import PrefixCache, model_fingerprint
from llmopt.engine.testing import tiny_model
from llmopt.errors import InvalidParameterError

GREEDY = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def plain(model, prompt, config=GREEDY, cache="static"):
    return Decoder(model, cache=cache, eos_token_ids=[]).generate(prompt, config).token_ids


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_tokens_identical_for_miss_partial_and_full_hits(tiny, cache):
    prefix_cache = PrefixCache(max_bytes=10**8)
    decoder = Decoder(tiny, cache=cache, eos_token_ids=[], prefix_cache=prefix_cache)
    system = list(range(10, 40))
    cases = [  # (prompt, tokens expected from the cache)
        (system + [50, 51, 52], 0),                       # miss: the cache is empty
        (system + [60, 61], 30),                          # partial hit: diverges after the shared system part
        (system + [50, 51, 52], 32),                      # full hit: everything but the last token is cached
        (system[:20] + [70, 71, 72, 73], 20),             # diverges inside a stored run (the node is split)
        (system[:10], 9),                                 # a prompt that is a prefix of a cached one
        ([5, 6, 7] + system, 0),                          # miss: another first token
    ]
    for prompt, expected_reused in cases:
        got = decoder.generate(prompt, GREEDY)
        assert got.prefix_cached_tokens == expected_reused, prompt
        assert got.token_ids == plain(tiny, prompt, cache=cache), prompt
    stats = prefix_cache.stats()
    assert stats["hits"] == 4 and stats["misses"] == 2 and stats["reused_tokens"] == 30 + 32 + 20 + 9


def test_loaded_kv_equals_recomputed_and_sampling_matches(tiny):
    prefix_cache = PrefixCache(max_bytes=10**8)
    prompt = list(range(3, 50))
    cached = Decoder(tiny, eos_token_ids=[], prefix_cache=prefix_cache)
    cached.generate(prompt[:30] + [90, 91], GREEDY)
    reference = Decoder(tiny, eos_token_ids=[])
    sampled = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=4)
    assert cached.generate(prompt, sampled).token_ids == reference.generate(prompt, sampled).token_ids
    assert cached.cache.length == reference.cache.length
    for ours, theirs in zip(cached.cache.keys + cached.cache.values, reference.cache.keys + reference.cache.values):
        torch.testing.assert_close(ours[:, :, :len(prompt)], theirs[:, :, :len(prompt)], rtol=1e-5, atol=1e-5)


def test_default_model_tokens_identical(default_model):
    model, tokenizer = default_model.model, default_model.tokenizer
    system = tokenizer("You are a concise assistant. Answer questions about Python with one short sentence, "
                       "and say so when you do not know.").input_ids
    users = ["What does the len function return?", "How do I open a file for reading?"]
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    prefix_cache = PrefixCache(max_bytes=10**9)
    decoder = Decoder(model, tokenizer, prefix_cache=prefix_cache)
    reference = Decoder(model, tokenizer)
    for user, expected_hit in [(users[0], False), (users[1], True), (users[0], True)]:
        prompt = system + tokenizer(" " + user).input_ids
        got = decoder.generate(prompt, config)
        assert (got.prefix_cached_tokens >= len(system)) == expected_hit
        assert got.token_ids == reference.generate(prompt, config).token_ids


def test_a_cache_filled_under_one_model_never_serves_another(tiny):
    prompt = list(range(5, 45))
    prefix_cache = PrefixCache(max_bytes=10**8)
    others = {
        "other weights": tiny_model("llama", seed=1),
        "other dtype": tiny_model("llama", seed=0, dtype=torch.bfloat16),
        "other architecture": tiny_model("qwen2", seed=0),
    }
    for name, other in others.items():
        Decoder(tiny, eos_token_ids=[], prefix_cache=prefix_cache).generate(prompt, GREEDY)
        assert prefix_cache.num_nodes > 0
        got = Decoder(other, eos_token_ids=[], prefix_cache=prefix_cache).generate(prompt, GREEDY)
        assert got.prefix_cached_tokens == 0, name
        assert got.token_ids == plain(other, prompt), name
    assert prefix_cache.invalidations == 2 * len(others) - 1  # every switch of model emptied the cache


def test_weights_changed_in_place_or_another_backend_invalidate():
    model = tiny_model("llama", seed=2)
    prompt = list(range(5, 45))
    prefix_cache = PrefixCache(max_bytes=10**8)
    decoder = Decoder(model, eos_token_ids=[], prefix_cache=prefix_cache)
    decoder.generate(prompt, GREEDY)
    assert decoder.generate(prompt, GREEDY).prefix_cached_tokens == len(prompt) - 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    got = decoder.generate(prompt, GREEDY)
    assert got.prefix_cached_tokens == 0 and got.token_ids == plain(model, prompt)
    model.set_attention("naive")
    assert decoder.generate(prompt, GREEDY).prefix_cached_tokens == 0
    assert model_fingerprint(model) == model_fingerprint(model)


def test_prefix_cache_needs_a_kv_cache_and_a_positive_limit(tiny):
    with pytest.raises(InvalidParameterError):
        Decoder(tiny, cache="none", prefix_cache=PrefixCache(max_bytes=10**6))
    with pytest.raises(InvalidParameterError):
        PrefixCache(max_bytes=0)
    with pytest.raises(InvalidParameterError):
        PrefixCache(max_bytes=10, ttl_s=0)


# ---- the manager alone, with synthetic KV whose values identify the prefix they belong to -------------------

LAYERS, HEADS, DIM = 2, 1, 2
BYTES_PER_TOKEN = 2 * LAYERS * HEADS * DIM * 4


def synthetic_kv(tokens):
    """KV whose value at position i depends on tokens[:i+1] (as real KV does): per layer [1, 1, n, 2]."""
    codes, code = [], 0
    for token in tokens:  # a running hash of the prefix
        code = hash((code, token)) % 1_000_003
        codes.append(float(code))
    base = torch.tensor(codes).view(1, 1, -1, 1).expand(1, HEADS, -1, DIM)
    keys = [base + layer for layer in range(LAYERS)]
    values = [-base - layer for layer in range(LAYERS)]
    return keys, values


class Clock:
    def __init__(self):
        self.now_s = 0.0

    def __call__(self):
        return self.now_s


def stored_bytes(cache):
    """Bytes of every KV tensor reachable from the root (independent of the cache's own count)."""
    total, stack = 0, [cache.root]
    while stack:
        node = stack.pop()
        total += node.kv_bytes
        stack.extend(node.children.values())
    return total


def test_lru_evicts_the_least_recently_used_and_refuses_oversized_entries():
    clock = Clock()
    cache = PrefixCache(max_bytes=2 * 10 * BYTES_PER_TOKEN, clock=clock)
    a, b, c = [1] * 10, [2] * 10, [3] * 10
    for seq in (a, b):
        assert cache.insert(seq, *synthetic_kv(seq), "m") == 10
    assert cache.used_bytes == cache.max_bytes  # exactly at the limit fits
    clock.now_s = 1
    assert cache.lookup(a, "m").length == 10  # a is now more recent than b
    assert cache.insert(c, *synthetic_kv(c), "m") == 10
    assert cache.lookup(b, "m") is None and cache.lookup(a, "m").length == 10
    too_big = [4] * 21
    assert cache.insert(too_big, *synthetic_kv(too_big), "m") == 0
    assert cache.rejected == 1 and cache.lookup(a, "m").length == 10  # nothing was evicted for it
    assert stored_bytes(cache) == cache.used_bytes <= cache.max_bytes


def test_insertion_evicts_before_it_copies(monkeypatch):
    import llmopt.engine.prefix_cache as module

    cache = PrefixCache(max_bytes=2 * 10 * BYTES_PER_TOKEN, clock=Clock())
    for seq in ([1] * 10, [2] * 10):
        cache.insert(seq, *synthetic_kv(seq), "m")
    real_stack, seen = torch.stack, []

    def checked_stack(tensors, *args, **kwargs):
        out = real_stack(tensors, *args, **kwargs)
        seen.append(cache.used_bytes + out.numel() * out.element_size())
        return out

    monkeypatch.setattr(module.torch, "stack", checked_stack)
    seq = [3] * 8 + [1, 1]
    assert cache.insert(seq, *synthetic_kv(seq), "m") == 10
    assert seen and max(seen) <= cache.max_bytes  # at the moment of the copy the old entry was already gone


def test_ttl_expires_unused_entries():
    clock = Clock()
    cache = PrefixCache(max_bytes=10**6, ttl_s=10, clock=clock)
    seq = [7, 8, 9, 10]
    cache.insert(seq, *synthetic_kv(seq), "m")
    clock.now_s = 9.5
    assert cache.lookup(seq, "m").length == 4  # refreshes it
    clock.now_s = 19.4
    assert cache.lookup(seq[:2] + [0], "m").length == 2  # a use of part of the run does not refresh all of it
    clock.now_s = 19.6
    assert cache.lookup(seq, "m") is None and cache.used_bytes == 0 and cache.expired_tokens == 4


@pytest.mark.slow
def test_churn_never_exceeds_the_limit_never_serves_expired_entries_and_counts_add_up():
    rng = random.Random(0)
    clock = Clock()
    ttl_s = 5.0
    cache = PrefixCache(max_bytes=120 * BYTES_PER_TOKEN, ttl_s=ttl_s, clock=clock)
    systems = [tuple(rng.randrange(1, 8) for _ in range(rng.randint(3, 30))) for _ in range(40)]
    weights = [1 / (rank + 1) for rank in range(len(systems))]  # Zipf popularity
    recent = collections.deque()  # (time, token sequence used): what may legitimately be served
    served = reused = 0
    for _ in range(10_000):
        clock.now_s += rng.expovariate(2.0)
        while recent and clock.now_s - recent[0][0] >= ttl_s:
            recent.popleft()
        system = rng.choices(systems, weights)[0]
        prompt = system + tuple(rng.randrange(1, 8) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.05:
            prompt = tuple(rng.randrange(1, 8) for _ in range(rng.randint(60, 130)))  # some do not fit
        fingerprint = "m" if rng.random() < 0.995 else "other"  # an occasional model switch
        if fingerprint != cache.fingerprint:
            recent.clear()
        keys, values = synthetic_kv(prompt)
        hit = cache.lookup(prompt, fingerprint)
        if hit is not None:
            served += 1
            reused += hit.length
            used = prompt[:hit.length]
            assert any(seq[:hit.length] == used for _, seq in recent), "served a prefix unused for ttl_s"
            for got, want in zip(hit.keys + hit.values, keys + values):
                assert torch.equal(got, want[:, :, :hit.length])  # the KV of exactly this prefix
        cache.insert(prompt, keys, values, fingerprint)
        recent.append((clock.now_s, prompt))
        assert stored_bytes(cache) == cache.used_bytes <= cache.max_bytes
    stats = cache.stats()
    assert stats["requests"] == 10_000 and stats["hits"] + stats["misses"] == 10_000
    assert stats["hits"] == served and stats["reused_tokens"] == reused
    assert stats["evicted_tokens"] > 0 and stats["expired_tokens"] > 0 and stats["rejected"] > 0
    assert stats["invalidations"] > 0 and 0.2 < stats["hits"] / 10_000 < 1


# ---- the notebook's workloads, on a tiny model with the default tokenizer's vocabulary ------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from llmopt.engine.loading import default_checkpoint_dir

    return AutoTokenizer.from_pretrained(default_checkpoint_dir())


@pytest.fixture(scope="module")
def tiny_wide():
    return tiny_model("llama", seed=5, vocab_size=49152, max_position_embeddings=1024)


def test_scenario_has_the_documents_token_counts(tokenizer):
    from llmopt.bench.prefix_workload import scenario

    first, same_tenant, other_tenant = scenario(tokenizer, 0, 0), scenario(tokenizer, 0, 1), scenario(tokenizer, 1, 0)
    assert (len(first.system_ids), len(first.demonstration_ids), len(first.user_ids)) == (50, 200, 20)
    assert first.prefix_ids == same_tenant.prefix_ids and first.user_ids != same_tenant.user_ids
    assert first.prefix_ids != other_tenant.prefix_ids


def test_cold_vs_warm_rows_equivalence_and_document_table(tiny_wide, tokenizer):
    from llmopt.bench import prefix_workload as w

    frame = w.cold_vs_warm(tiny_wide, tokenizer, [50, 250], new_tokens=3, repeats=2, warmup=1)
    assert len(frame) == 3 * 2 * 2  # the warm-up round is not a row
    # each repeat passes every prefix length, so a length's repeats are a whole pass apart (drift lands in spreads)
    assert list(frame.prefix_tokens) == [50] * 3 + [250] * 3 + [50] * 3 + [250] * 3
    assert list(frame.repeat) == [0] * 6 + [1] * 6
    warm, cold = frame[frame.engine == "warm (hit)"], frame[frame.engine == "cold (miss)"]
    assert (warm.processed_tokens == 20).all() and (cold.cached_tokens == 0).all()
    plain = frame[frame.engine == "no prefix cache"]
    assert (plain.processed_tokens == plain.prefix_tokens + 20).all()
    assert w.equivalence(frame).all().all()
    table = w.summarize(frame)
    assert set(table.engine) == {"no prefix cache", "cold (miss)", "warm (hit)"}
    assert (table[table.engine == "no prefix cache"]["end_to_end_s / no cache"] == 1).all()
    versus = w.versus_document(table)
    assert len(versus) == 5 and versus.measured.notna().all()
    assert versus.set_index("condition").loc["scenario", "measured"] == 270 / 20


def test_multi_tenant_replay_respects_the_limit_and_counts(tiny_wide, tokenizer):
    from llmopt.bench.prefix_workload import multi_tenant
    from llmopt.engine.kv_cache import kv_bytes_per_token

    limit = 600 * kv_bytes_per_token(tiny_wide.config, torch.float32)
    frame = multi_tenant(tiny_wide, tokenizer, requests=40, tenants=5, users=6, max_bytes=limit, ttl_s=20)
    assert (frame.cache_bytes <= limit).all() and frame.prefix_hit.any() and not frame.prefix_hit.all()
    assert frame.cache_hit_rate_so_far.iloc[-1] == pytest.approx(frame.any_reuse.mean())
    assert (frame[frame.prefix_hit].cached_tokens >= 250).all()
    assert frame.evicted_tokens.iloc[-1] > 0
    assert (frame.processed_tokens == frame.prompt_tokens - frame.cached_tokens).all()
