"""Attention backends: every one equals `naive` (fp32, max abs error <= 1e-5) with causal masks, GQA, a cache
offset and explicit masks; greedy generation is token-identical across backends; the benchmarks' rows."""
import functools

import pytest
import torch

from llmopt.bench import attention_bench
from llmopt.bench.harness import peak_memory_bytes
from llmopt.engine import attention
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.testing import tiny_model
from llmopt.errors import InvalidParameterError

TOLERANCE = 1e-5
CPU_BACKENDS = ["tiled", "sdpa"]
# tiled with blocks smaller than the sequences: many blocks, partial last blocks, blocks across the diagonal
SMALL_BLOCKS = functools.partial(attention.tiled, block_queries=16, block_keys=24)

# (batch, heads, kv_heads, query_length, key_length, head_dim)
SHAPES = [
    (1, 4, 4, 16, 16, 8),       # multi-head, prefill
    (2, 9, 3, 300, 300, 64),    # the default model's GQA layout; lengths not multiples of the blocks
    (1, 4, 2, 1, 700, 32),      # decode: one query against a cache
    (2, 6, 2, 37, 555, 16),     # cache offset: a chunk of 37 queries after 518 cached keys
    (1, 8, 1, 64, 64, 16),      # multi-query attention (one KV head)
]


def random_qkv(batch, heads, kv_heads, query_length, key_length, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, query_length, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, key_length, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, key_length, head_dim, generator=g)
    return q, k, v


def max_error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", CPU_BACKENDS + ["tiled-small-blocks"])
def test_causal_backend_matches_naive(backend, shape):
    q, k, v = random_qkv(*shape)
    attend = SMALL_BLOCKS if backend == "tiled-small-blocks" else attention.get_backend(backend)
    reference = attention.naive(q, k, v)
    out = attend(q, k, v)
    assert out.shape == q.shape
    assert max_error(out, reference) <= TOLERANCE


def test_causal_alignment_is_bottom_right():
    """With a cache offset, query i sees keys 0 .. S - T + i: the last query sees every key, the first does not
    see the last T - 1 keys (checked on naive itself, the reference the others are compared with)."""
    q, k, v = random_qkv(1, 2, 2, 4, 10, 8)
    out = attention.naive(q, k, v)
    for i in range(4):
        visible = 10 - 4 + i + 1
        weights = torch.softmax((q[:, :, i:i + 1] @ k[:, :, :visible].transpose(-2, -1)) / 8 ** 0.5, dim=-1)
        torch.testing.assert_close(out[:, :, i:i + 1], weights @ v[:, :, :visible])


def explicit_masks(batch, heads, query_length, key_length):
    g = torch.Generator().manual_seed(1)
    padding = torch.ones(batch, 1, 1, key_length, dtype=torch.bool)
    padding[0, ..., 1:4] = False  # batch row 0 hides three keys (every query still sees key 0)
    random_rows = torch.rand(batch, 1, query_length, key_length, generator=g) > 0.4
    random_rows[..., -1] = True  # every row sees at least one key
    per_head = torch.rand(batch, heads, query_length, key_length, generator=g) > 0.5
    per_head[..., 0] = True
    causal_and_padding = attention.causal_mask(query_length, key_length) & padding
    return {"padding": padding, "random": random_rows, "per_head": per_head,
            "causal_and_padding": causal_and_padding, "2d": attention.causal_mask(query_length, key_length)}


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["tiled-small-blocks"])
@pytest.mark.parametrize("shape", [(2, 9, 3, 40, 40, 16), (2, 4, 2, 20, 90, 8)], ids=["prefill", "offset"])
def test_explicit_masks_match_naive(backend, shape):
    q, k, v = random_qkv(*shape)
    attend = SMALL_BLOCKS if backend == "tiled-small-blocks" else attention.get_backend(backend)
    for name, mask in explicit_masks(shape[0], shape[1], shape[3], shape[4]).items():
        assert max_error(attend(q, k, v, mask), attention.naive(q, k, v, mask)) <= TOLERANCE, name


def test_tiled_in_bf16_stays_close_to_fp32_naive():
    q, k, v = random_qkv(1, 9, 3, 100, 100, 64)
    out = attention.tiled(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert max_error(out.float(), attention.naive(q, k, v)) < 3e-2


@pytest.mark.slow
def test_tiled_never_materializes_the_score_matrix():
    q, k, v = random_qkv(1, 9, 3, 2048, 2048, 64)
    _, tiled_bytes = peak_memory_bytes(lambda: attention.tiled(q, k, v))
    _, naive_bytes = peak_memory_bytes(lambda: attention.naive(q, k, v))
    score_matrix_bytes = 9 * 2048 * 2048 * 4
    assert tiled_bytes < score_matrix_bytes / 4
    assert naive_bytes >= 2 * score_matrix_bytes  # scores and their softmax are alive together


def test_peak_memory_projection_matches_measurement_for_naive():
    q, k, v = random_qkv(1, 9, 3, 512, 512, 64)
    _, measured = peak_memory_bytes(lambda: attention.naive(q, k, v))
    projected = attention_bench.projected_peak_bytes("naive", 512, 512, 9, 3, 64)
    assert 0.8 * projected <= measured <= 1.2 * projected


def test_sdpa_kernel_used_reports_what_ran():
    q, k, v = random_qkv(1, 9, 3, 64, 64, 64)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        assert attention.sdpa_kernel_used(q, k, v) == "aten::_scaled_dot_product_attention_math"
    if q.device.type == "cpu":  # enable_gqa=True keeps PyTorch's CPU flash kernel
        assert attention.sdpa_kernel_used(q, k, v) == "aten::_scaled_dot_product_flash_attention_for_cpu"
        assert attention.sdpa_kernel_used(q[:, :, -1:], k, v) == "aten::_scaled_dot_product_flash_attention_for_cpu"


def test_unknown_and_unavailable_backends_raise_clear_errors():
    with pytest.raises(InvalidParameterError, match="unknown attention backend"):
        attention.get_backend("nope")
    if attention.unavailable_reason("flash_attn") is not None:
        with pytest.raises(InvalidParameterError, match="flash_attn"):
            attention.get_backend("flash_attn")
        assert "flash_attn" not in attention.available_backends()
        with pytest.raises(InvalidParameterError):
            tiny_model().set_attention("flash_attn")


@pytest.mark.skipif(attention.unavailable_reason("flash_attn") is not None,
                    reason=str(attention.unavailable_reason("flash_attn")))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attn_matches_naive_in_half_precision(shape):
    q, k, v = (t.cuda() for t in random_qkv(*shape))
    out = attention.get_backend("flash_attn")(q.half(), k.half(), v.half())
    assert max_error(out.float(), attention.naive(q, k, v)) < 5e-3
    with pytest.raises(InvalidParameterError, match="fp16/bf16"):
        attention.flash_attn(q, k, v)


def run_model(model, backend, tokens, chunks):
    """Logits of `tokens` fed in `chunks` through a static cache (chunks after the first: T < S prefill)."""
    from llmopt.engine.kv_cache import make_cache

    model.set_attention(backend)
    cache = make_cache("static", model.config, tokens.shape[1])
    logits, start = [], 0
    with torch.inference_mode():
        for size in chunks:
            logits.append(model(tokens[:, start:start + size], torch.arange(start, start + size), cache))
            start += size
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_logits_match_naive_with_chunked_prefill(backend):
    model = tiny_model("llama", seed=2)
    tokens = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(0))
    reference = run_model(model, "naive", tokens, [50])
    assert max_error(run_model(model, backend, tokens, [20, 1, 29]), reference) <= 1e-4
    model.set_attention("sdpa")


@pytest.mark.parametrize("cache", ["none", "static", "dynamic"])
def test_greedy_tokens_identical_across_backends_tiny(cache):
    model = tiny_model("qwen2", seed=5)
    decoder = Decoder(model, cache=cache, eos_token_ids=[])
    results = {}
    for backend in attention.available_backends():
        model.set_attention(backend)
        results[backend] = decoder.generate(list(range(3, 40)), GenerationConfig(max_new_tokens=24)).token_ids
    model.set_attention("sdpa")
    assert all(ids == results["naive"] for ids in results.values()), results


def test_greedy_tokens_identical_across_backends_default_model(default_model):
    model = default_model.model
    decoder = Decoder(model, default_model.tokenizer, cache="static")
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    prompt = "Explain in two sentences why the sky is blue."
    results = {}
    try:
        for backend in attention.available_backends():
            model.set_attention(backend)
            results[backend] = decoder.generate(prompt, config, chat=True).token_ids
    finally:
        model.set_attention("sdpa")
    assert len(results["naive"]) == 16
    assert all(ids == results["naive"] for ids in results.values()), results


def test_op_benchmark_rows_and_skips():
    frame = attention_bench.op_benchmark(["naive", "tiled", "sdpa"], lengths=(64, 200), repeats=2,
                                         max_projected_bytes=4_000_000, progress=False)
    assert len(frame) == 6
    assert (frame.skipped == (frame.projected_bytes > 4_000_000)).all()
    ran, skipped = frame[~frame.skipped], frame[frame.skipped]
    assert list(ran.context_tokens) == [64, 64, 64, 200] and ran.backend.iloc[-1] == "sdpa"
    assert list(skipped.backend) == ["naive", "tiled"] and skipped.skip_reason.str.contains("GiB > limit").all()
    at_64 = ran[ran.context_tokens == 64]
    assert (at_64.max_abs_error_vs_naive <= TOLERANCE).all()
    assert ran.max_abs_error_vs_naive.isna().iloc[-1]  # no naive reference at 200
    assert (ran.repeats == 2).all() and (ran.time_median_s > 0).all() and (ran.peak_bytes > 0).all()
    # every backend of a length in the same paired rounds (rounds.run_rounds): naive / backend with its interval
    assert (at_64.speedup_vs_naive_rounds == 2).all() and (at_64.speedup_vs_naive_low > 0).all()
    assert {"cpu_wall_ratio", "contended"} <= set(frame.columns)
    assert ran[ran.backend == "sdpa"].kernel.str.startswith("aten::_scaled_dot_product").all()
    speedups = attention_bench.op_speedups(frame)
    assert list(speedups.index) == [64] and "speedup sdpa" in speedups and "memory ratio tiled" in speedups


def test_adaptive_repeats():
    assert attention_bench._adaptive_repeats(3, 0.1, 20) == 3
    assert attention_bench._adaptive_repeats(3, 8.0, 20) == 2
    assert attention_bench._adaptive_repeats(3, 30.0, 20) == 1
    assert attention_bench._adaptive_repeats(3, 30.0, None) == 3


def test_model_benchmark_rows(default_model):
    model = default_model.model
    frame = attention_bench.model_benchmark(model, default_model.tokenizer, ["naive", "tiled", "sdpa"],
                                            lengths=(24, 8190), new_tokens=3, repeats=1, warmup=0, progress=False)
    ran, skipped = frame[~frame.skipped], frame[frame.skipped]
    assert sorted(ran.backend) == ["naive", "sdpa", "tiled"] and (ran.context_tokens == 24).all()
    assert (ran.prefill_s > 0).all() and (ran.decode_tokens_per_s > 0).all()
    assert len(skipped) == 3 and skipped.skip_reason.str.contains("8192 positions").all()
    identical = attention_bench.tokens_identical(frame)
    assert identical["identical_to_naive"].all() and len(identical) == 3
    assert model.attention_backend == "sdpa"  # restored


def test_sdpa_dispatch_and_equivalence_tables():
    dispatch = attention_bench.sdpa_dispatch_table(64)
    assert len(dispatch) == 5 and (dispatch.kernel != "unknown").all()
    if torch.__version__ >= "2.5":  # enable_gqa exists; on CPU it keeps the flash kernel
        assert dispatch.kernel.iloc[0] == dispatch.kernel.iloc[1]
    table = attention_bench.equivalence_table(["naive", "tiled", "sdpa"], length=64)
    assert set(table.backend) == {"tiled", "sdpa"} and len(table) == 8
    assert table.within_tolerance.all() and (table.max_abs_error > 0).any()


def test_estimate_table_puts_verdicts_beside_measured_speedups():
    import pandas as pd

    nan = float("nan")  # naive rows carry no interval against themselves
    op = pd.DataFrame({"backend": ["naive", "sdpa", "naive", "sdpa"], "context_tokens": [512, 512, 2048, 2048],
                       "time_median_s": [1.0, 0.5, 10.0, 1.0], "peak_bytes": [100, 10, 1000, 10],
                       "skipped": False, "speedup_vs_naive_geomean": [nan, 2.0, nan, 10.0],
                       "speedup_vs_naive_low": [nan, 1.9, nan, 9.0], "speedup_vs_naive_high": [nan, 2.1, nan, 11.0],
                       "speedup_vs_naive_rounds": [nan, 5, nan, 5]})
    model = pd.DataFrame({"backend": ["naive", "sdpa"], "context_tokens": [512, 512], "prefill_s": [2.0, 1.6],
                          "skipped": False})
    estimates = pd.DataFrame({"condition": ["512 tokens", "2048 tokens"], "low": [1.5, 2.5], "high": [1.5, 2.5],
                              "document_text": ["1.5x", "2.5x"]})
    table = attention_bench.estimate_table(op, model, estimates, backends=("sdpa",))
    assert list(table.scope) == ["attention op", "whole-model prefill", "attention op"]
    assert table["measured speedup vs naive"].tolist() == pytest.approx([2.0, 1.25, 10.0])
    # the op rows carry 5-round intervals wholly above the estimate; the prefill row has one round: no verdict
    assert table.verdict.iloc[0].startswith("refuted (better)") and table.verdict.iloc[2].startswith("refuted (better)")
    assert table.verdict.iloc[1].startswith("inconclusive")
