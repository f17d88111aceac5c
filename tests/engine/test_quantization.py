"""Quantization: packed kernels against the dequantized reference, RTN error bounds, GPTQ against RTN,
GPTQ-format round trips, GGUF blocks, and quantized models that still generate."""
import copy

import numpy as np
import pytest
import torch

from llmopt.bench import bandwidth, evaluation
from llmopt.engine import cpu_kernels, gguf_formats, gptq, gptq_format, quantization
from llmopt.engine.generate import Decoder, GenerationConfig
from llmopt.engine.testing import tiny_hf_config, tiny_model
from llmopt.errors import InvalidParameterError


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(actual.float() - expected.float()) / torch.linalg.norm(expected.float()))


def kernel_reference(q: quantization.QuantizedWeight, dtype=torch.bfloat16) -> torch.Tensor:
    """The weight the int4 kernel holds: scale and (8 - zero) * scale rounded to the activation dtype."""
    g = q.g_idx.long()
    scale = q.scales.to(dtype).float()
    kernel_zero = ((8 - q.zeros) * q.scales).to(dtype).float()
    return (q.codes.float() - 8) * scale[:, g] + kernel_zero[:, g]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_kernel_equals_dequantized_matmul(group_size, symmetric):
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * 0.05
    q = quantization.rtn(weight, 4, group_size, symmetric)
    layer = quantization.Int4Linear.from_quantized(q)
    x = torch.randn(5, 256).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 48)
    assert relative_error(y, x.float() @ kernel_reference(q).t()) < 1e-2  # bf16 output rounding only
    assert relative_error(y, x.float() @ q.dequantize().t()) < 2e-2


def test_int8_kernel_equals_dequantized_matmul():
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    q = quantization.rtn(weight, bits=8, group_size=None, symmetric=True)
    layer = quantization.Int8Linear.from_quantized(q, bias=torch.randn(64))
    x = torch.randn(3, 7, 96).to(torch.bfloat16)
    expected = x.float() @ q.dequantize().t() + layer.bias.float()
    assert layer(x).shape == (3, 7, 64)
    assert relative_error(layer(x), expected) < 1e-2


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, True), (8, None, True)])
def test_rtn_round_trip_error_is_at_most_half_a_step(bits, group_size, symmetric):
    torch.manual_seed(1)
    weight = torch.randn(32, 128) * torch.rand(32, 1)  # rows of different magnitude
    q = quantization.rtn(weight, bits, group_size, symmetric)
    step = q.scales[:, q.g_idx.long()]
    error = (q.dequantize() - weight).abs()
    assert (error <= 0.5 * step * (1 + 1e-5)).all()
    assert q.codes.max() <= 2**bits - 1
    assert relative_error(q.dequantize(), weight) < (0.02 if bits == 8 else 0.15)


def test_quantized_weights_reject_impossible_shapes():
    with pytest.raises(InvalidParameterError):
        quantization.rtn(torch.randn(16, 100), 4, 64)
    with pytest.raises(InvalidParameterError):
        quantization.Int4Linear.from_quantized(quantization.rtn(torch.randn(10, 64), 4, 32))  # 10 rows, not 16k
    model = tiny_model()
    with pytest.raises(InvalidParameterError):
        quantization.quantize_model(model, bits=3)
    with pytest.raises(InvalidParameterError):
        quantization.quantize_model(model, method="gptq", bits=4, group_size=32)  # no calibration data


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and a few large ones, like a transformer's activations."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    x = (torch.randn(rows, features, generator=generator) @ mixing
         + 0.1 * torch.randn(rows, features, generator=generator))
    x[:, :4] *= 10
    return x


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_rtn_at_the_same_bits_and_groups(act_order):
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    inputs = correlated_inputs(1536, 128)
    calibration, held_out = inputs[:1024], inputs[1024:]
    accumulator = gptq.HessianAccumulator(128)
    accumulator.add(calibration)
    q_gptq = gptq.gptq_quantize(weight, accumulator.hessian, bits=4, group_size=32, act_order=act_order)
    q_rtn = quantization.rtn(weight, bits=4, group_size=32)
    assert q_gptq.codes.max() <= 15 and torch.equal(q_gptq.zeros, q_gptq.zeros.round())
    assert gptq.output_error(weight, q_gptq, held_out) < 0.8 * gptq.output_error(weight, q_rtn, held_out)
    layer = quantization.Int4Linear.from_quantized(q_gptq)  # act-order: the kernel permutes its inputs
    x = held_out[:4].to(torch.bfloat16)
    assert relative_error(layer(x), x.float() @ q_gptq.dequantize().t()) < 2e-2


def test_gptq_on_a_tiny_model_quantizes_every_projection_and_generates(kernels):
    model = tiny_model(tie_word_embeddings=True)
    embedding = model.embed_tokens.weight.detach().clone()
    calibration = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    weights = quantization.quantize_model(model, method="gptq", bits=4, group_size=32, calibration_ids=calibration)
    assert set(weights) == set(quantization.linear_names(tiny_model()))
    expected = cpu_kernels.QuantizedGemvLinear if kernels == "llmopt" else quantization.Int4Linear
    assert all(isinstance(model.get_submodule(n), expected) for n in weights)
    activation_dtype = quantization.default_activation_dtype()
    assert activation_dtype == (torch.float32 if kernels == "llmopt" else torch.bfloat16)
    assert torch.equal(model.embed_tokens.weight, embedding.to(activation_dtype))  # the tied lm_head was copied first
    generation = Decoder(model, cache="static").generate([1, 5, 9], GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert len(generation.token_ids) == 6


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tiny_model_generates_like_the_full_precision_one(bits, kernels):
    reference = tiny_model()
    model, dequantized = copy.deepcopy(reference), copy.deepcopy(reference)
    weights = quantization.quantize_model(model, bits=bits, group_size=32)
    assert model.embed_tokens.weight.dtype == quantization.default_activation_dtype()
    for name, q in weights.items():  # the same model with the quantized weights as dense fp32 matrices
        dequantized.get_submodule(name).weight.data = q.dequantize()
    tokens, positions = torch.tensor([[1, 5, 9, 13, 17, 21]]), torch.arange(6)
    with torch.no_grad():
        actual = model(tokens, positions)
        # ours: fp32 activations (int8 blocks into the int4 kernel); PyTorch's kernels: bf16 activations
        tolerance = (1e-5 if bits == 8 else 0.03) if kernels == "llmopt" else 0.03
        assert relative_error(actual, dequantized(tokens, positions)) < tolerance
        if bits == 8:
            assert relative_error(actual, reference(tokens, positions)) < 0.05
    generation = Decoder(model, cache="static").generate([1, 5, 9], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    assert len(generation.token_ids) == 8
    assert (quantization.bytes_read_per_token(model)
            < quantization.bytes_read_per_token(reference) / (3 if bits == 8 else 5))


def test_pack_int32_matches_the_gptq_bit_layout():
    codes = torch.arange(1, 9).reshape(8, 1)  # eight 4-bit codes along the packed dimension
    assert gptq_format.pack_int32(codes, 4, dim=0).item() == 0x87654321 - 2**32  # lowest nibble first, int32
    values = torch.randint(0, 256, (16, 24))
    for bits in (4, 8):
        v = values % 2**bits
        assert torch.equal(gptq_format.unpack_int32(gptq_format.pack_int32(v, bits, dim=0), bits, dim=0), v)
        assert torch.equal(gptq_format.unpack_int32(gptq_format.pack_int32(v, bits, dim=1), bits, dim=1), v)


@pytest.mark.parametrize("model_type,options", [
    ("llama", dict(method="rtn", bits=4, group_size=32)),
    ("qwen2", dict(method="rtn", bits=8)),  # q/k/v biases travel with the packed layers
    ("llama", dict(method="gptq", bits=4, group_size=32, symmetric=True, act_order=True)),
    ("llama", dict(method="gptq", bits=4, group_size=64, lm_head_bits=8)),  # mixed bits: a `dynamic` override
])
def test_gptq_format_checkpoint_reloads_bit_exactly(model_type, options, tmp_path, kernels):
    model = tiny_model(model_type)
    calibration = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    weights = quantization.quantize_model(model, calibration_ids=calibration if options["method"] == "gptq" else None,
                                          **options)
    gptq_format.save_checkpoint(tmp_path / "a", model, weights, tiny_hf_config(model_type),
                                desc_act=options.get("act_order", False))
    loaded, loaded_weights, config = gptq_format.load_checkpoint(tmp_path / "a")
    assert config["quant_method"] == "gptq" and config["bits"] == options["bits"]
    for name, q in weights.items():
        r = loaded_weights[name]
        assert torch.equal(q.codes, r.codes) and torch.equal(q.zeros, r.zeros) and torch.equal(q.g_idx, r.g_idx)
        assert torch.equal(q.scales, r.scales)  # scales are fp16 values from the start
    tokens, positions = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]), torch.arange(8)
    with torch.no_grad():
        assert torch.equal(model(tokens, positions), loaded(tokens, positions))
    gptq_format.save_checkpoint(tmp_path / "b", loaded, loaded_weights, tiny_hf_config(model_type),
                                desc_act=options.get("act_order", False))
    first, second = (p / gptq_format.WEIGHTS_FILE for p in (tmp_path / "a", tmp_path / "b"))
    assert first.read_bytes() == second.read_bytes()


def test_gptq_format_writes_v2_when_a_zero_point_is_zero(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[:, :32] = torch.rand(128, 32)  # an all-positive group: zero point 0
    weights = quantization.quantize_model(model, bits=4, group_size=32)
    assert (weights["layers.0.mlp.up_proj"].zeros == 0).any()
    gptq_format.save_checkpoint(tmp_path, model, weights, tiny_hf_config())
    loaded, loaded_weights, config = gptq_format.load_checkpoint(tmp_path)
    assert config["checkpoint_format"] == "gptq_v2"
    assert torch.equal(loaded_weights["layers.0.mlp.up_proj"].zeros, weights["layers.0.mlp.up_proj"].zeros)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_like_the_gguf_package(kind):
    import gguf.quants

    torch.manual_seed(0)
    weight = torch.randn(32, 128) * 0.1
    raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[kind])
    expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).astype(np.float32))
    q = gguf_formats.decode_blocks(raw, kind, 32, 128)
    assert torch.allclose(q.dequantize(), expected, atol=1e-6)
    if q.bits == 4:
        x = torch.randn(2, 128).to(torch.bfloat16)
        layer = quantization.Int4Linear.from_quantized(q)
        assert relative_error(layer(x), x.float() @ expected.t()) < 2e-2


def test_gguf_model_quantization_runs_each_format(kernels):
    for kind in ("Q8_0", "Q4_0", "Q4_1"):
        model = tiny_model()
        _, layer_kernels = gguf_formats.quantize_model_gguf(model, kind)
        if kernels == "llmopt":
            expected = "gemv_q8" if kind == "Q8_0" else "gemv_q4"
        else:
            expected = "dense" if kind == "Q8_0" else "int4pack"
        assert all(expected in k for k in layer_kernels.values())
        assert len(Decoder(model, cache="static").generate([1, 2], GenerationConfig(max_new_tokens=3)).token_ids) >= 1


def test_default_gguf_blocks_are_the_default_checkpoint(default_model):
    """The Q4_1 blocks of the shipped GGUF, un-permuted, are exactly the weights our checkpoint holds; its Q8_0
    embedding (the file has no output matrix) is read as the lm_head's blocks."""
    from llmopt.engine.loading import default_gguf_path

    cfg = default_model.model.config
    names = {"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.29.mlp.down_proj", "lm_head"}
    weights, kinds = gguf_formats.read_gguf_linears(default_gguf_path(), cfg.num_heads, cfg.num_kv_heads, only=names)
    assert sum(kind == "Q4_1" for kind in kinds.values()) == 7 * cfg.num_layers
    assert weights["lm_head"].bits == 8 and weights["lm_head"].group_size == 32
    for name in names:
        dense = default_model.model.get_submodule(name).weight.detach()
        assert torch.allclose(weights[name].dequantize(), dense, atol=1e-6)


def test_int8_default_model_agrees_with_fp32(default_model):
    model = copy.deepcopy(default_model.model)
    quantization.quantize_model(model, bits=8)
    windows = torch.tensor(default_model.tokenizer("def add(a, b):\n    return a + b\n\nclass Point:\n    "
                                                   "x: int\n    y: int\n\nfor i in range(10): print(i)").input_ids)
    windows = windows[None, :32]
    agreement = evaluation.compare(evaluation.log_probs(default_model.model, windows),
                                   evaluation.log_probs(model, windows), windows)
    assert agreement.top1_agreement >= 0.8
    assert abs(agreement.perplexity / agreement.reference_perplexity - 1) < 0.1


def test_evaluation_compare_on_known_distributions():
    windows = torch.tensor([[0, 1, 2]])
    uniform = [torch.full((3, 4), 0.25).log()]
    peaked = [torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.25] * 4]).log()]
    same = evaluation.compare(uniform, uniform, windows)
    assert same.perplexity == pytest.approx(4.0) and same.kl_divergence == pytest.approx(0.0, abs=1e-7)
    result = evaluation.compare(uniform, peaked, windows)
    assert result.perplexity == pytest.approx(1 / 0.7)
    assert result.kl_divergence == pytest.approx(float((0.25 * (np.log(0.25) - np.log([0.1, 0.7, 0.1, 0.1]))).sum()))
    with pytest.raises(InvalidParameterError):
        evaluation.token_windows(lambda text: None, "text", max_tokens=4, window=8)


def test_bytes_read_per_token_counts_weights_once_and_one_embedding_row():
    model = tiny_model()
    cfg = model.config
    dense = sum(p.numel() for n, p in model.named_parameters() if n != "embed_tokens.weight") * 4
    tied_head = cfg.vocab_size * cfg.hidden_size * 4 if cfg.tie_word_embeddings else 0
    assert quantization.bytes_read_per_token(model) == dense + tied_head + cfg.hidden_size * 4


def test_read_bandwidth_probe_reports_a_positive_rate():
    result = bandwidth.read_bandwidth(probe_bytes=8 * 2**20, repeats=2)
    assert result.best_bytes_per_s >= result.median_bytes_per_s > 0
    assert bandwidth.decode_limit_tokens_per_s(10**6, 10**9) == 1000
