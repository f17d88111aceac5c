"""Our AVX2 GEMV kernels (llmopt.engine.cpu_kernels) against the dequantized reference matmul, batch invariance, the
fallbacks, and a decoder on them that generates the same tokens as on PyTorch's matmul."""
import copy

import pytest
import torch
from torch import nn

from llmopt.engine import agreement, cpu_kernels, quantization
from llmopt.engine.generate import Decoder
from llmopt.engine.testing import tiny_model
from llmopt.errors import InvalidParameterError

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"llmopt CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual.float() - expected.float()) / torch.linalg.norm(expected.float()))


@pytest.mark.parametrize("rows", [1, 3, cpu_kernels.MAX_ROWS, cpu_kernels.MAX_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 96), (37, 100)])  # 37 rows: a partial row block; 100: a scalar tail
def test_dense_gemv_equals_matmul(shape, dtype, rows):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=True).to(dtype)
    gemv = copy.deepcopy(nn.Sequential(linear))
    cpu_kernels.use_gemv(gemv)
    assert type(gemv[0]) is cpu_kernels.GemvLinear
    x = torch.randn(rows, shape[1]).to(dtype)
    with torch.no_grad():
        actual, expected = gemv(x), x.float() @ linear.weight.float().t() + linear.bias.float()
    assert actual.dtype == dtype and actual.shape == (rows, shape[0])
    assert relative_error(actual, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("group_size", [16, 32, 64, None])  # None: one scale per row
def test_int8_kernel_equals_dequantized_matmul(group_size):
    torch.manual_seed(0)
    q = quantization.rtn(torch.randn(40, 128), bits=8, group_size=group_size, symmetric=True)
    bias = torch.randn(40)
    layer = quantization.gemv_linear(q, bias)
    assert layer.kernel == "llmopt AVX2 gemv_q8"
    for rows in (1, 5, cpu_kernels.MAX_ROWS + 3):  # the last one dequantizes and runs PyTorch's GEMM
        x = torch.randn(2, rows, 128)
        assert relative_error(layer(x), x @ q.dequantize().t() + bias) < 1e-6
    assert torch.equal(layer.dequantize(), q.dequantize())


def reference_q8_activations(x: torch.Tensor) -> torch.Tensor:
    """Blocks of 32: d = max|x| / 127, round(x / d) * d (round half to even), written independently of the C."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(d > 0, torch.round(blocks / d), torch.zeros_like(blocks))
    return (codes * d).reshape(x.shape)


def test_activation_quantization_matches_its_definition():
    torch.manual_seed(0)
    x = torch.randn(3, 256) * torch.logspace(-3, 2, 256)
    x[1, :32] = 0  # an all-zero block
    x[2, 32:64] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])  # d = 1: ties round to even
    assert torch.equal(cpu_kernels.quantize_activations(x), reference_q8_activations(x))
    assert relative_error(cpu_kernels.quantize_activations(x), x) < 1e-2


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_dequantized_matmul(group_size, symmetric):
    """The int4 kernel computes W x^ (x quantized to int8 blocks): equal to that matmul in float tolerance,
    and within activation-quantization error of W x."""
    torch.manual_seed(0)
    q = quantization.rtn(torch.randn(36, 256), bits=4, group_size=group_size, symmetric=symmetric)
    layer = quantization.gemv_linear(q)
    assert layer.kernel == "llmopt AVX2 gemv_q4"
    assert torch.allclose(layer.dequantize(), q.dequantize(), atol=1e-6)
    for rows in (1, 4, cpu_kernels.MAX_ROWS + 1):  # the last one takes the many-row (prefill) path
        x = torch.randn(rows, 256)
        assert relative_error(layer(x), reference_q8_activations(x) @ q.dequantize().t()) < 1e-5
        assert relative_error(layer(x), x @ q.dequantize().t()) < 2e-2


def test_int4_kernel_takes_act_order_and_fractional_zero_points():
    """GPTQ act-order (g_idx not sorted) permutes x; GGUF Q4_1 zero points are not integers."""
    torch.manual_seed(0)
    q = quantization.rtn(torch.randn(16, 64), bits=4, group_size=32)
    perm = torch.randperm(64)
    shuffled = quantization.QuantizedWeight(q.codes[:, perm], q.scales, q.zeros + 0.37, 4, 32, q.g_idx[perm])
    layer = quantization.gemv_linear(shuffled)
    assert layer.input_order is not None
    x = torch.randn(3, 64)
    x_hat = reference_q8_activations(x[:, layer.input_order])  # blocks are formed in the kernel's column order
    expected = x_hat @ shuffled.dequantize()[:, layer.input_order].t()
    assert relative_error(layer(x), expected) < 1e-5


def test_quantized_layers_compute_the_same_off_the_kernels():
    """Where the library cannot run (a model moved to CUDA, no gcc), the PyTorch definitions of the
    dequantization and of the activation quantization give the same numbers as the C ones."""
    torch.manual_seed(0)
    q4 = quantization.gemv_linear(quantization.rtn(torch.randn(16, 128), 4, 64))
    q8 = quantization.gemv_linear(quantization.rtn(torch.randn(16, 128), 8, 32, True))
    x = torch.randn(2, 128)
    kernels = (q4.dequantize(), q8.dequantize(), cpu_kernels.quantize_activations(x))
    load = cpu_kernels._load
    try:
        cpu_kernels._load = lambda: (None, "pretend")
        plain = (q4.dequantize(), q8.dequantize(), cpu_kernels.quantize_activations(x))
    finally:
        cpu_kernels._load = load
    for a, b in zip(kernels, plain):
        assert torch.equal(a, b)


def test_kernels_are_batch_invariant():
    """A row's output does not depend on how many rows share the call (what lets batching stay exact)."""
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    q4 = quantization.gemv_linear(quantization.rtn(weight, 4, 32))
    q8 = quantization.gemv_linear(quantization.rtn(weight, 8, None, True))
    x = torch.randn(9, 96)
    for fn in (lambda t: cpu_kernels.gemv(t, weight), q4, q8):
        together = fn(x)
        alone = torch.cat([fn(x[i:i + 1]) for i in range(9)])
        assert torch.equal(together, alone)


def test_use_gemv_keeps_tied_weights_and_quantization_still_finds_the_layers():
    model = tiny_model(tie_word_embeddings=True)
    cpu_kernels.use_gemv(model)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert all(type(model.get_submodule(n)) is cpu_kernels.GemvLinear for n in quantization.linear_names(model))
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_decoder_on_our_kernels_agrees_with_pytorchs():
    """Our fp32 GEMV against PyTorch's matmul, cached and uncached: one function, two summation orders, so the
    ISA-independent agreement rule (llmopt.engine.agreement), not bit-equal tokens."""
    reference = tiny_model("qwen2")  # q/k/v biases too
    ours = cpu_kernels.use_gemv(copy.deepcopy(reference))
    for prompt in ([1, 5, 9], list(range(3, 40))):
        for cache in ("static", "none"):
            result = agreement.greedy_agreement(agreement.of_decoder(Decoder(reference)),
                                                agreement.of_decoder(Decoder(ours, cache=cache)), prompt, 12)
            assert result.agrees, (cache, result.text())


def test_switched_off_falls_back_to_pytorch():
    torch.manual_seed(0)
    linear = cpu_kernels.use_gemv(nn.Sequential(nn.Linear(32, 16)))[0]
    q = quantization.gemv_linear(quantization.rtn(torch.randn(16, 32), 4, 32))
    x = torch.randn(1, 32)
    with cpu_kernels.switched_off():
        assert not cpu_kernels.available() and "switched off" in cpu_kernels.unavailable_reason()
        assert isinstance(quantization.quantized_linear(quantization.rtn(torch.randn(16, 32), 8, None, True)),
                          quantization.Int8Linear)
        assert torch.allclose(linear(x), nn.functional.linear(x, linear.weight, linear.bias))
        assert torch.allclose(q(x), reference_q8_activations(x) @ q.dequantize().t(), atol=1e-5)
    assert cpu_kernels.available()


def test_layers_our_kernels_cannot_take_say_why():
    with pytest.raises(InvalidParameterError, match="multiple of 32"):
        quantization.gemv_linear(quantization.rtn(torch.randn(8, 64), 4, 16))
    with pytest.raises(InvalidParameterError, match="multiple of 16"):
        quantization.gemv_linear(quantization.rtn(torch.randn(8, 72), 8, 24, True))
    with pytest.raises(InvalidParameterError, match="symmetric"):
        quantization.gemv_linear(quantization.rtn(torch.randn(8, 64), 8, None, False))


@pytest.mark.parametrize("group_size, symmetric, act_order",
                         [(32, False, True), (64, True, False), (128, False, False)])
def test_gptq_column_loop_in_c_equals_the_pytorch_loop(group_size, symmetric, act_order):
    """csrc/gptq.c runs the same float operations as gptq.py's per-column loop: on one thread (where the block
    updates between them use the same GEMM) codes, scales and zero points are bit-identical."""
    from llmopt.engine import gptq

    torch.manual_seed(0)
    weight = torch.randn(200, 384)  # three blocks of 128 columns
    inputs = torch.randn(1024, 384) @ torch.randn(384, 384) * 0.1 + torch.randn(1024, 384)
    inputs[:, 7] = 0  # an input that is always zero: its weights do not matter
    hessian = 2 * inputs.t() @ inputs / len(inputs)
    with gptq.one_thread():
        in_c = gptq.gptq_quantize(weight, hessian, 4, group_size, symmetric, act_order, use_kernel=True)
        in_torch = gptq.gptq_quantize(weight, hessian, 4, group_size, symmetric, act_order, use_kernel=False)
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(in_c, field), getattr(in_torch, field)), field
