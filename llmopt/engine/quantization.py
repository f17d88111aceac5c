"""Weight-only quantization of the decoder's linear layers, run on PyTorch's packed kernels (after gpt-fast).

Every method (round-to-nearest here, GPTQ in `llmopt.engine.gptq`, GGUF blocks in `llmopt.engine.gguf_formats`,
GPTQ-format checkpoints in `llmopt.engine.gptq_format`) produces the same integer representation, a
`QuantizedWeight`:

    weight[n, k] ~= (codes[n, k] - zeros[n, group(k)]) * scales[n, group(k)]

with unsigned codes in [0, 2**bits - 1] and one (scale, zero) per output row and group of `group_size` input
columns (the convention of the GPTQ reference code and of the auto-gptq / gptqmodel checkpoints). That is then
swapped into the model in place of its `nn.Linear` (model.py is never edited) as one of two modules that call
real packed kernels, never a Python dequantization:

- `Int8Linear`: 8 bits, one scale per output channel, symmetric -> `torch._weight_int8pack_mm`.
- `Int4Linear`: 4 bits, group-wise (32 / 64 / 128 / 256) -> on CPU `torch._convert_weight_to_int4pack_for_cpu`
  + `torch._weight_int4pack_mm_for_cpu`; on CUDA `torch._convert_weight_to_int4pack` + `torch._weight_int4pack_mm`
  (tinygemm). The kernel dequantizes as `(code - 8) * scale + zero`, so our zero point maps to
  `kernel_zero = (8 - zero) * scale`; symmetric and asymmetric grids both fit.

Assumptions: the kernels are fast only with bf16 activations (measured on this CPU: 576x49152 at batch 1, fp32
2.56 ms, int8pack 0.90 ms, int4pack g64 0.79 ms; with fp32 activations they are several times slower than a
dense fp32 matmul), so a quantized model runs its activations, embedding and norms in bf16. The int4 kernels
need out_features % 16 == 0 and in_features % group_size == 0. The tied lm_head (it shares the embedding
matrix) is quantized as its own copy when `include_lm_head=True`; the embedding stays dense for lookups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError
from . import gptq
from .quantized_weight import QuantizedWeight, group_params, quantize_codes, round_up_to_fp16, rtn  # noqa: F401 (re-exported)

INT4_GROUP_SIZES = (32, 64, 128, 256)


def group_size_for(model: nn.Module, preferred: int = 64, include_lm_head: bool = True) -> int | None:
    """The largest INT4 group size up to `preferred` that every linear layer's input width takes (a width 64
    does not divide, such as 352, takes 32), or None when none does (a width not a multiple of 32)."""
    widths = {model.get_submodule(n).weight.shape[1] for n in linear_names(model, include_lm_head)}
    fitting = [g for g in INT4_GROUP_SIZES if g <= preferred and all(w % g == 0 for w in widths)]
    return max(fitting, default=None)


def int4_supported(out_features: int, in_features: int, group_size: int) -> str | None:
    """None if the int4 kernels take this shape, else the reason they do not."""
    if group_size not in INT4_GROUP_SIZES:
        return f"group_size {group_size} is not one of {INT4_GROUP_SIZES}"
    if in_features % group_size:
        return f"in_features {in_features} is not divisible by group_size {group_size}"
    if out_features % 16:
        return f"out_features {out_features} is not divisible by 16"
    return None


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * per-channel scale)^T + bias, by `torch._weight_int8pack_mm`."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight", weight_int8.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", bias)
        self.kernel = "torch._weight_int8pack_mm"
        if weight_int8.device.type != "cpu" and not _int8_kernel_runs(weight_int8.device, scales.dtype):
            self.kernel = "dequantize + F.linear (no int8pack kernel on this device)"

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias=None, dtype=torch.bfloat16, device=None) -> "Int8Linear":
        if q.bits != 8 or q.scales.shape[1] != 1 or not q.symmetric:
            raise InvalidParameterError("Int8Linear needs 8-bit, per-channel (one group per row), symmetric codes")
        device = device or q.codes.device
        weight = (q.codes.to(torch.int16) - 128).to(torch.int8).to(device)
        bias = None if bias is None else bias.detach().to(dtype=dtype, device=device)
        return cls(weight, q.scales[:, 0].to(dtype=dtype, device=device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "torch._weight_int8pack_mm":
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x @ dequant(int4 packed weight)^T + bias, by PyTorch's int4pack kernels (tinygemm layout).

    `input_order` (optional) permutes the input columns first, which makes GPTQ act-order groups contiguous."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, out_features: int, in_features: int,
                 group_size: int, bias: torch.Tensor | None = None, input_order: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("input_order", input_order)
        self.kernel = ("torch._weight_int4pack_mm" if packed.device.type == "cuda"
                       else "torch._weight_int4pack_mm_for_cpu")

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias=None, dtype=torch.bfloat16, device=None) -> "Int4Linear":
        if q.bits != 4:
            raise InvalidParameterError(f"Int4Linear needs 4-bit codes, got {q.bits}")
        n, k = q.shape
        reason = int4_supported(n, k, q.group_size)
        if reason:
            raise InvalidParameterError(f"int4 kernel cannot take this layer: {reason}")
        device = torch.device(device or q.codes.device)
        codes, scales, zeros, order = q.codes, q.scales, q.zeros, None
        expected = torch.arange(k, device=q.g_idx.device) // q.group_size
        if not torch.equal(q.g_idx.long(), expected):  # act-order: sort columns by group, permute x to match
            order = torch.argsort(q.g_idx.long(), stable=True)
            if not torch.equal(q.g_idx.long()[order], expected):
                raise InvalidParameterError("g_idx groups are not all of size group_size")
            codes = codes[:, order]
        kernel_zeros = (8 - zeros) * scales  # (code - zero) * scale == (code - 8) * scale + kernel_zero
        scales_and_zeros = torch.stack([scales.t(), kernel_zeros.t()], dim=-1).contiguous()
        if device.type == "cuda":
            dtype = torch.bfloat16  # tinygemm takes bf16 only
            packed_bytes = (codes[:, ::2].to(torch.uint8) << 4 | codes[:, 1::2].to(torch.uint8)).to(device)
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            packed = torch._convert_weight_to_int4pack(packed_bytes, inner_k_tiles)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).to(device), 2)
        bias = None if bias is None else bias.detach().to(dtype=dtype, device=device)
        order = None if order is None else order.to(device)
        return cls(packed, scales_and_zeros.to(dtype=dtype, device=device), n, k, q.group_size, bias, order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.input_order is not None:
            x2 = x2.index_select(1, self.input_order)
        if self.weight.device.type == "cuda":
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16), self.weight, self.group_size,
                                          self.scales_and_zeros).to(x.dtype)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def _int8_kernel_runs(device, dtype) -> bool:
    try:
        torch._weight_int8pack_mm(torch.zeros(1, 32, dtype=dtype, device=device),
                                  torch.zeros(16, 32, dtype=torch.int8, device=device),
                                  torch.ones(16, dtype=dtype, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def default_activation_dtype(device=None) -> torch.dtype:
    """fp32 on our CPU kernels (they take fp32 activations); bf16 on PyTorch's packed kernels (fast only so)."""
    from . import cpu_kernels

    return torch.float32 if cpu_kernels.runs_on(device) else torch.bfloat16


def gemv_linear(q: QuantizedWeight, bias=None) -> nn.Module:
    """Our kernels' module (`cpu_kernels.QuantizedGemvLinear`) for a quantized weight: int8 (symmetric, any group
    size) or int4 (group-wise, symmetric or not); act-order columns are sorted by group and x permuted to match."""
    from . import cpu_kernels

    n, k = q.shape
    reason = cpu_kernels.quantized_supported(n, k, q.group_size, q.bits)
    if reason:
        raise InvalidParameterError(f"our kernels cannot take this layer: {reason}")
    codes, order = q.codes, None
    expected = torch.arange(k, device=q.g_idx.device) // q.group_size
    if not torch.equal(q.g_idx.long(), expected):
        order = torch.argsort(q.g_idx.long(), stable=True)
        if not torch.equal(q.g_idx.long()[order], expected):
            raise InvalidParameterError("g_idx groups are not all of size group_size")
        codes = codes[:, order]
    bias = None if bias is None else bias.detach().to(torch.float32).cpu()
    if q.bits == 8:
        if not q.symmetric:
            raise InvalidParameterError("the int8 kernel takes symmetric codes (zero point 128)")
        weight = (codes.to(torch.int16) - 128).to(torch.int8)
        return cpu_kernels.QuantizedGemvLinear(8, weight, q.scales, None, k, q.group_size, bias, order)
    packed = cpu_kernels.pack_int4(codes, q.group_size)
    return cpu_kernels.QuantizedGemvLinear(4, packed, q.scales, -q.zeros * q.scales, k, q.group_size, bias, order)


def quantized_linear(q: QuantizedWeight, bias=None, dtype=torch.bfloat16, device=None) -> nn.Module:
    """The kernel module for a quantized weight: on the CPU our AVX2 kernels where they build (any group size
    that is a multiple of 16), else PyTorch's packed kernels: Int8Linear (8 bits per channel) or Int4Linear."""
    from . import cpu_kernels

    device = device or q.codes.device
    if cpu_kernels.runs_on(device) and not cpu_kernels.quantized_supported(*q.shape, q.group_size, q.bits):
        return gemv_linear(q, bias)
    if q.bits == 8:
        return Int8Linear.from_quantized(q, bias, dtype, device)
    if q.bits == 4:
        return Int4Linear.from_quantized(q, bias, dtype, device)
    raise InvalidParameterError(f"no packed kernel for {q.bits}-bit weights (8 or 4)")


def linear_names(model: nn.Module, include_lm_head: bool = True) -> list[str]:
    """Names of the model's `nn.Linear` modules that quantization replaces (all projections, lm_head optional)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (include_lm_head or name != "lm_head")]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_quantized(model: nn.Module, weights: dict[str, QuantizedWeight],
                    activation_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap each named `nn.Linear` for its kernel module; the rest of the model goes to `activation_dtype`
    (default: `default_activation_dtype`, fp32 on our CPU kernels, bf16 on PyTorch's)."""
    device = next(model.parameters()).device
    activation_dtype = activation_dtype or default_activation_dtype(device)
    biases = {name: model.get_submodule(name).bias for name in weights}
    if "lm_head" in weights and model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie before the swap
    for name, q in weights.items():
        replace_module(model, name, quantized_linear(q, biases[name], activation_dtype, device))
    model.to(activation_dtype)  # embedding, norms, remaining dense layers; quantized buffers keep their dtypes
    return model


def quantize_model(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int | None = 64,
                   symmetric: bool = False, include_lm_head: bool = True, lm_head_bits: int | None = None,
                   activation_dtype: torch.dtype | None = None, calibration_ids: torch.Tensor | None = None,
                   **gptq_options) -> dict[str, QuantizedWeight]:
    """Quantize `model`'s linear layers in place (gpt-fast style) and return the integer weights (for saving).

    method: 'rtn' (round-to-nearest, no data) or 'gptq' (needs `calibration_ids` [n, T], see `llmopt.engine.gptq`).
    bits=8 is per output channel and symmetric (the int8 kernel's form); bits=4 is group-wise.
    lm_head: quantized when `include_lm_head`, at `lm_head_bits` (default `bits`); a head at other bits than the
    rest is rounded to nearest (llama.cpp's 4-bit files likewise keep the output matrix at higher precision)."""
    head_bits = (lm_head_bits or bits) if include_lm_head else None
    for b in (bits, head_bits):
        if b not in (8, 4, None):
            raise InvalidParameterError(f"bits must be 8 or 4, got {b}")
    plan = {name: bits for name in linear_names(model, include_lm_head=False)}
    if head_bits:
        plan["lm_head"] = head_bits
    for name, b in plan.items():
        out_features, in_features = model.get_submodule(name).weight.shape
        reason = int4_supported(out_features, in_features, group_size) if b == 4 else None
        if reason:
            raise InvalidParameterError(f"cannot quantize {name} to int4 with group_size {group_size}: {reason}")

    def round_to_nearest(name: str) -> QuantizedWeight:
        b = plan[name]
        return rtn(model.get_submodule(name).weight, b, None if b == 8 else group_size, True if b == 8 else symmetric)

    if method == "rtn":
        weights = {name: round_to_nearest(name) for name in plan}
    elif method == "gptq":
        if calibration_ids is None:
            raise InvalidParameterError("GPTQ needs calibration_ids (token ids [n_samples, length])")
        same_bits = [name for name, b in plan.items() if b == bits]
        weights = gptq.quantize_weights(model, calibration_ids, same_bits, bits=bits,
                                        group_size=None if bits == 8 else group_size,
                                        symmetric=True if bits == 8 else symmetric, **gptq_options)
        weights.update({name: round_to_nearest(name) for name in plan if name not in weights})
    else:
        raise InvalidParameterError(f"unknown quantization method {method!r}; use 'rtn' or 'gptq'")
    apply_quantized(model, weights, activation_dtype)
    return weights


def bytes_read_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter and buffer except the embedding table (one row of
    it is read), tied weights counted once, quantized buffers at their packed size."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        if name == "":
            continue  # the root holds only the RoPE frequencies
        if isinstance(module, nn.Embedding):
            total += module.weight.shape[1] * module.weight.element_size()
            continue
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is None or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
