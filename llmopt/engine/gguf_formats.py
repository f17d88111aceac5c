"""GGUF's block formats (llama.cpp's Q8_0, Q4_0, Q4_1) run on our packed kernels: the document's "built-in
quantized formats" and "pre-quantized GGUF" routes.

A block holds 32 consecutive weights of one row and an fp16 scale `d` (Q4_1 adds an fp16 offset `m`):
- Q4_0: 18 bytes = d + 16 bytes of nibbles, w = (q - 8) * d
- Q4_1: 20 bytes = d + m + 16 bytes of nibbles, w = q * d + m
- Q8_0: 34 bytes = d + 32 signed bytes, w = q * d
Nibble j of a block's byte i is element i (low nibble) or i + 16 (high nibble), as in ggml-quants.c.

Which kernel runs (said plainly, since that decides the speed):
- Q4_0 and Q4_1 are group-wise 4-bit with group 32, the form of our int4 kernel (`llmopt.engine.cpu_kernels`, fp32
  scale and offset) and of PyTorch's int4pack kernels: a block becomes a group
  with scale d and zero point -m/d in code units (Q4_1) or 8 (Q4_0), i.e. the kernel's `(q - 8) * d + (8d + m)`.
  PyTorch's kernel holds d and 8d + m in bf16.
- Q8_0 has a scale per 32 weights: our CPU int8 kernel (`llmopt.engine.cpu_kernels`) takes it as it is; PyTorch's
  only int8 kernel takes one scale per output channel, so without ours Q8_0 layers are dequantized once to bf16
  and run as dense bf16 matmuls (Q8_0's accuracy, bf16's speed).

The default model's GGUF stores the linear layers as Q4_1 and the (tied) embedding as Q8_0, which also serves as
the output matrix (the file has none), so the lm_head is read as those Q8_0 blocks; llama.cpp converts
Llama checkpoints with the rows of attn_q / attn_k permuted for its RoPE layout, which we undo as transformers does.
Q8_0 / Q4_0 versions are made with the `gguf` package's reference quantizers (`gguf.quants.quantize`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InvalidParameterError
from . import cpu_kernels
from .quantization import QuantizedWeight, apply_quantized, default_activation_dtype, linear_names, replace_module

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def decode_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> QuantizedWeight:
    """A [rows, cols] weight from its GGUF blocks (uint8 bytes, rows x cols/32 blocks) as a QuantizedWeight."""
    if kind not in BLOCK_BYTES:
        raise InvalidParameterError(f"unsupported GGUF block type {kind!r} (Q4_0, Q4_1, Q8_0)")
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, BLOCK_BYTES[kind])
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).astype(np.int16) + 128)
        return QuantizedWeight(q.reshape(rows, cols).to(torch.uint8), d, torch.full_like(d, 128.0), 8, BLOCK)
    nibbles = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # element i low nibble, i + 16 high nibble
    codes = torch.from_numpy(q.reshape(rows, cols).astype(np.uint8))
    if kind == "Q4_0":
        return QuantizedWeight(codes, d, torch.full_like(d, 8.0), 4, BLOCK)
    m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    d = torch.where(d == 0, torch.finfo(torch.float16).tiny, d)  # a constant block: any tiny step works
    return QuantizedWeight(codes, d, -m / d, 4, BLOCK)  # q*d + m == (q - (-m/d)) * d


def reverse_rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's permutation of attn_q / attn_k (transformers' _reverse_permute_weights)."""
    dim = rows // heads // 2
    return torch.arange(rows).reshape(heads, dim, 2).transpose(1, 2).reshape(rows)


def permute_rows(q: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(q.codes[order], q.scales[order], q.zeros[order], q.bits, q.group_size, q.g_idx)


def read_gguf_linears(path: str | Path, num_heads: int, num_kv_heads: int,
                      only: set[str] | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """The block-quantized linear layers of a GGUF file by our module names (all, or those in `only`), and
    {tensor name: block type} of every tensor in the file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    weights, kinds = {}, {}
    names = {t.name for t in reader.tensors}
    for tensor in reader.tensors:
        kinds[tensor.name] = tensor.tensor_type.name
        parts = tensor.name.split(".")
        if tensor.tensor_type.name not in BLOCK_BYTES:
            continue
        if tensor.name == "output.weight" or (tensor.name == "token_embd.weight" and "output.weight" not in names):
            name = "lm_head"  # a file without an output matrix multiplies by its embedding, as llama.cpp does
        elif parts[0] == "blk" and parts[2] in GGUF_NAMES:
            name = f"layers.{parts[1]}.{GGUF_NAMES[parts[2]]}"
        else:
            continue
        if only is not None and name not in only:
            continue
        cols, rows = (int(n) for n in tensor.shape[:2])  # GGUF lists the fastest-varying dimension first
        q = decode_blocks(tensor.data, tensor.tensor_type.name, rows, cols)
        if name != "lm_head" and parts[2] in ("attn_q", "attn_k"):
            q = permute_rows(q, reverse_rope_permutation(rows, num_heads if parts[2] == "attn_q" else num_kv_heads))
        weights[name] = q
    return weights, kinds


def quantize_blocks(weight: torch.Tensor, kind: str) -> QuantizedWeight:
    """Quantize a weight with the gguf package's reference quantizer, then decode its blocks."""
    import gguf.quants

    rows, cols = weight.shape
    if cols % BLOCK:
        raise InvalidParameterError(f"in_features {cols} is not a multiple of the GGUF block size {BLOCK}")
    raw = gguf.quants.quantize(weight.detach().to(torch.float32).cpu().numpy(), gguf.GGMLQuantizationType[kind])
    return decode_blocks(raw, kind, rows, cols)


def block_bytes(q: QuantizedWeight, kind: str) -> int:
    """Bytes the weight takes in a GGUF file."""
    rows, cols = q.shape
    return rows * cols // BLOCK * BLOCK_BYTES[kind]


def apply_gguf(model: nn.Module, weights: dict[str, QuantizedWeight],
               activation_dtype: torch.dtype | None = None) -> dict[str, str]:
    """Swap in the GGUF layers: 4-bit blocks on an int4 kernel; Q8_0 on our int8 kernel (group 32) where it
    runs, else dequantized to dense. Returns the kernel each layer runs on."""
    device = next(model.parameters()).device
    activation_dtype = activation_dtype or default_activation_dtype(device)
    ours = cpu_kernels.runs_on(device)
    packed = {name: q for name, q in weights.items() if q.bits == 4 or ours}
    dense = {name: q for name, q in weights.items() if name not in packed}
    kernels = {}
    for name, q in dense.items():
        linear = model.get_submodule(name)
        layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=activation_dtype)
        with torch.no_grad():
            layer.weight.copy_(q.dequantize(activation_dtype))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        replace_module(model, name, layer)
        kernels[name] = f"dense {activation_dtype} (Q8_0 dequantized)"
    apply_quantized(model, packed, activation_dtype)
    kernels.update({name: model.get_submodule(name).kernel for name in packed})
    return kernels


def quantize_model_gguf(model: nn.Module, kind: str = "Q4_0", include_lm_head: bool = True,
                        activation_dtype: torch.dtype | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize the model's linear layers to a GGUF block type (Q8_0 / Q4_0 / Q4_1) and swap them in place."""
    weights = {name: quantize_blocks(model.get_submodule(name).weight, kind)
               for name in linear_names(model, include_lm_head)}
    if "lm_head" in weights and model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return weights, apply_gguf(model, weights, activation_dtype)


def load_gguf_layers(model: nn.Module, path: str | Path,
                     activation_dtype: torch.dtype | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Put a GGUF file's own quantized blocks into `model` (which must hold the same architecture): the
    pre-quantized route, no re-quantization. Tensors the file stores otherwise (F32 norms, the embedding)
    keep the model's values."""
    cfg = model.config
    weights, _ = read_gguf_linears(path, cfg.num_heads, cfg.num_kv_heads, only=set(linear_names(model)))
    for name, q in weights.items():
        linear = model.get_submodule(name)
        if tuple(linear.weight.shape) != q.shape:
            raise InvalidParameterError(
                f"{name}: GGUF shape {q.shape} does not fit the model's {tuple(linear.weight.shape)}")
    return weights, apply_gguf(model, weights, activation_dtype)
