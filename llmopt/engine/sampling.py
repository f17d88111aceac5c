"""Turning logits into the next token: greedy, or sampling with temperature, top-k and top-p, seeded."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import InvalidParameterError


def _finite(value, integral: bool = False) -> bool:
    """A finite real (or integral) number, not a bool."""
    kind = numbers.Integral if integral else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0

    def __post_init__(self):
        """Refuse what would fail or sample noise later: NaN, infinity, wrong types (bool is not a number here)."""
        if not (_finite(self.temperature) and self.temperature >= 0):
            raise InvalidParameterError(f"temperature must be a finite number >= 0 (0 = greedy), "
                                        f"got {self.temperature!r}")
        if not (_finite(self.top_k, integral=True) and self.top_k >= 0):
            raise InvalidParameterError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (_finite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidParameterError(f"top_p must be a number with 0 < top_p <= 1, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T) restricted to top-k and top-p, [..., V] fp32."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first over p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
