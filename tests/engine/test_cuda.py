"""The same equivalence checks on a CUDA GPU (skipped where there is none).

CI has no GPU; these run on a machine that has one (`pytest tests/test_cuda.py`). Lossless optimizations must give
the plain decoder's greedy tokens on the GPU too, and our model must match transformers there."""
import os

import pytest
import torch

from llmopt.bench import workload
from llmopt.engine import attention, batching, quantization
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.prefix_cache import PrefixCache
from llmopt.engine.quantization import quantize_model
from llmopt.engine.speculative import SpeculativeDecoder, make_drafter
from llmopt.engine.testing import tiny_pair

DEVICE = os.environ.get("LLMOPT_GPU_TEST_DEVICE", "cuda")  # "cpu" dry-runs these tests' logic without a GPU
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = GenerationConfig(max_new_tokens=24, ignore_eos=True)
PROMPTS = [[5, 17, 23, 5, 17, 40, 41, 42, 5, 17], list(range(3, 40)), [7] * 3]


@pytest.fixture(scope="module")
def pair():
    hf_model, ours = tiny_pair("llama", seed=0)
    return hf_model.to(DEVICE), ours.to(DEVICE)


def greedy(model, prompt, cache="static", **kwargs):
    return Decoder(model, cache=cache, eos_token_ids=[], **kwargs).generate(prompt, GREEDY).token_ids


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_logits_match_transformers_on_cuda(model_type):
    hf_model, ours = (m.to(DEVICE) for m in tiny_pair(model_type, seed=1))
    tokens = torch.randint(0, 96, (2, 33), device=DEVICE)
    with torch.inference_mode():
        expected = hf_model(tokens).logits
        got = ours(tokens, torch.arange(33, device=DEVICE))
    assert got.device.type == torch.device(DEVICE).type
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_cached_greedy_equals_no_cache_and_transformers_on_cuda(pair):
    hf_model, ours = pair
    for prompt in PROMPTS:
        plain = greedy(ours, prompt, cache="none")
        assert greedy(ours, prompt, cache="static") == plain
        assert greedy(ours, prompt, cache="dynamic") == plain
        ids = torch.tensor([prompt], device=DEVICE)
        hf_model.generation_config.eos_token_id = None  # never stop, never mask EOS: like eos_token_ids=[]
        hf = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                               pad_token_id=0)
        assert hf[0, len(prompt):].tolist() == plain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decoding_runs_on_cuda(dtype):
    _, ours = tiny_pair("llama", seed=0, dtype=dtype)
    ours = ours.to(DEVICE)
    tokens = greedy(ours, PROMPTS[0])
    assert len(tokens) == 24 and greedy(ours, PROMPTS[0], cache="dynamic") == tokens


def test_sampling_is_seeded_on_cuda(pair):
    _, ours = pair
    config = GenerationConfig(max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    runs = [Decoder(ours, cache=c, eos_token_ids=[]).generate(PROMPTS[0], config).token_ids
            for c in ("none", "static", "static")]
    assert runs[0] == runs[1] == runs[2]


def test_attention_backends_agree_on_cuda():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 64, 32, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 64, 32, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    reference = attention.naive(q.float(), k.float(), v.float(), None)
    for name in attention.available_backends():
        got = attention.get_backend(name)(q, k, v, None).float()
        assert (got - reference).abs().max().item() < 3e-2, name
    kernel = attention.sdpa_kernel_used(q, k, v)
    if DEVICE == "cuda":
        assert "(CUDA)" in attention.SDPA_KERNELS.get(kernel, ""), kernel  # a fused GPU kernel, not the math path


@pytest.mark.parametrize("backend", ["naive", "tiled", "sdpa"])
def test_every_attention_backend_keeps_the_tokens_on_cuda(pair, backend):
    _, ours = pair
    expected = greedy(ours, PROMPTS[1])
    try:
        assert greedy(ours.set_attention(backend), PROMPTS[1]) == expected
    finally:
        ours.set_attention("sdpa")


def test_batching_schedulers_keep_the_tokens_on_cuda(pair):
    _, ours = pair
    pool = workload.random_pool(ours.config.vocab_size, n_prompts=12, min_tokens=1, max_tokens=30, seed=5)
    wl = workload.make_workload(pool, 8, seed=2, min_new_tokens=1, max_new_tokens=12)
    decoder = Decoder(ours, cache="static", eos_token_ids=[])
    expected = {r.request_id: decoder.generate(list(r.prompt_ids), GenerationConfig(
        max_new_tokens=r.max_new_tokens)).token_ids for r in wl.requests}
    for scheduler in batching.SCHEDULERS:
        result = batching.run(scheduler, ours, wl.requests, max_batch=4, timeout_ms=5, eos_token_ids=[])
        assert result.tokens == expected, scheduler


def test_prefix_cache_keeps_the_tokens_on_cuda(pair):
    _, ours = pair
    prefix_cache = PrefixCache(max_bytes=10**8)
    system = list(range(10, 40))
    for suffix in ([50, 51], [60, 61, 62], [50, 51]):
        prompt = system + suffix
        got = Decoder(ours, eos_token_ids=[], prefix_cache=prefix_cache).generate(prompt, GREEDY)
        assert got.token_ids == greedy(ours, prompt)
    assert prefix_cache.stats()["hits"] >= 2


@pytest.mark.parametrize("kind", ["prompt_lookup", "early_exit", "self_quantized"])
def test_greedy_speculative_decoding_keeps_the_tokens_on_cuda(pair, kind):
    _, ours = pair
    options = {"num_layers": 1} if kind == "early_exit" else {}
    drafter = make_drafter(kind, ours, **options)
    for prompt in PROMPTS:
        got = SpeculativeDecoder(ours, drafter=drafter, k=4, eos_token_ids=[]).generate(prompt, GREEDY)
        assert got.token_ids == greedy(ours, prompt), kind


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 128)])
def test_quantized_kernels_equal_the_dequantized_matmul_on_cuda(bits, group_size):
    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.05
    q = quantization.rtn(weight, bits, group_size, symmetric=bits == 8)
    layer = quantization.quantized_linear(q, device=DEVICE)
    x = torch.randn(3, 5, 512).to(torch.bfloat16).to(DEVICE)
    expected = x.float() @ q.dequantize().t().to(DEVICE)
    got = layer(x).float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_generates_on_cuda(bits):
    _, model = tiny_pair("llama", seed=4, hidden_size=128, intermediate_size=256)
    model = model.to(DEVICE)
    quantize_model(model, "rtn", bits=bits, group_size=None if bits == 8 else 32)
    assert len(greedy(model, PROMPTS[0])) == 24


def test_gptq_runs_on_cuda():
    _, model = tiny_pair("llama", seed=4, hidden_size=128, intermediate_size=256)
    model = model.to(DEVICE)
    calibration = torch.randint(0, 96, (4, 32), device=DEVICE)
    weights = quantize_model(model, "gptq", bits=4, group_size=32, calibration_ids=calibration)
    assert weights and len(greedy(model, PROMPTS[0])) == 24


@pytest.fixture(scope="module")
def default_on_device():
    """The real default model on the GPU, fp32, beside transformers' on the same weights (skipped without it)."""
    from transformers import AutoModelForCausalLM

    from llmopt.engine.loading import load_model
    from llmopt.errors import ModelNotFoundError

    try:
        lm = load_model(None, "fp32", DEVICE)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    hf_model = AutoModelForCausalLM.from_pretrained(lm.checkpoint, dtype=torch.float32).to(DEVICE).eval()
    return lm, hf_model


def test_default_model_matches_transformers_on_cuda(default_on_device):
    lm, hf_model = default_on_device
    ids = lm.tokenizer("The capital of France is Paris. def fibonacci(n):", return_tensors="pt").input_ids.to(DEVICE)
    with torch.inference_mode():
        expected = hf_model(ids).logits
        got = lm.model(ids, torch.arange(ids.shape[1], device=DEVICE))
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-4
    for prompt in ("The capital of France is", "Write a haiku about the sea."):
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(DEVICE)
        reference = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                      do_sample=False)[0, ids.shape[1]:].tolist()
        for cache in ("none", "static"):
            got = Decoder(lm.model, lm.tokenizer, cache=cache).generate(prompt, GenerationConfig(max_new_tokens=24))
            assert got.token_ids == reference, cache
