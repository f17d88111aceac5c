"""The integer form every quantization method produces: `(codes - zeros[group]) * scales[group]`, with the
round-to-nearest quantizer and the grid helpers GPTQ shares (kept apart from the modules that run it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError


@dataclass
class QuantizedWeight:
    """An integer weight: `(codes - zeros[group]) * scales[group]`, groups along the input dimension.

    codes: uint8 [N, K] in [0, 2**bits - 1]; scales, zeros: float32 [N, K // group_size] (zeros in code units,
    integers for RTN / GPTQ, fractional for GGUF Q4_1); g_idx: int32 [K], the group of each input column
    (k // group_size unless GPTQ's act-order reordered the columns)."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def __post_init__(self):
        if self.g_idx is None:
            k = self.codes.shape[1]
            self.g_idx = torch.arange(k, dtype=torch.int32, device=self.codes.device) // self.group_size

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 2 ** (self.bits - 1)).all())

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight the codes stand for (the reference every kernel is checked against)."""
        g = self.g_idx.long()
        return ((self.codes.to(torch.float32) - self.zeros[:, g]) * self.scales[:, g]).to(dtype)


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of `w` [N, group] (the GPTQ reference's Quantizer.find_params).

    The range always includes 0; symmetric grids put the zero point at the middle code. Scales are rounded up to
    fp16 values here (up, so the grid still spans the range), so a model saved in the GPTQ format (fp16 scales)
    reloads exactly as it was quantized."""
    max_code = 2 ** bits - 1
    w_min = w.min(dim=1).values.clamp(max=0)
    w_max = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        w_max = torch.maximum(w_min.abs(), w_max)
        w_min = -w_max
    empty = (w_min == 0) & (w_max == 0)
    w_min, w_max = torch.where(empty, -1.0, w_min), torch.where(empty, 1.0, w_max)
    scale = ((w_max - w_min) / max_code).clamp(min=torch.finfo(torch.float16).tiny)
    scale = round_up_to_fp16(scale)
    if symmetric:
        zero = torch.full_like(scale, (max_code + 1) / 2)
    else:
        zero = torch.round(-w_min / scale)
    return scale, zero


def round_up_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x, as float32."""
    half = x.to(torch.float16)
    half = torch.where(half.to(torch.float32) < x, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half.to(torch.float32)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `w` [N, m] to codes on the grid of per-row `scale`, `zero` [N]."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)


def rtn(weight: torch.Tensor, bits: int = 4, group_size: int | None = 64, symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest: each group gets its own scale/zero from its min and max; no data needed."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    group_size = group_size or k
    if k % group_size:
        raise InvalidParameterError(f"in_features {k} is not divisible by group_size {group_size}")
    groups = w.reshape(n * (k // group_size), group_size)
    scale, zero = group_params(groups, bits, symmetric)
    codes = quantize_codes(groups, scale, zero, bits).reshape(n, k)
    return QuantizedWeight(codes.to(torch.uint8), scale.reshape(n, -1), zero.reshape(n, -1), bits, group_size)
