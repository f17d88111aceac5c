"""Agreement of two engines that compute the same function with different kernels (fused C step vs PyTorch
forward, our decoder vs transformers, one INT4 model on two kernel paths).

Bit-for-bit equal greedy tokens are the wrong test there: the engines sum in different orders, and which order
each one takes depends on the CPU's ISA (AVX2, AVX-512, AMX), so a near-tie between the two best tokens can
flip on one machine and not on another. What does not depend on the ISA is a bound on the logit error and what
it implies. Both engines are fed the reference's tokens (teacher forcing, so an early flip cannot compound), and:

- at every step, max |candidate logit - reference logit| <= tolerance * max |reference logit|;
- greedy tokens are identical up to the first step whose reference top-1/top-2 margin is under twice that
  bound (below it an error within the bound may flip the choice; above it, it cannot).

`TOLERANCE` is the worst-case relative error of an fp32 dot product of length K summed in any order, K * 2^-24
(Higham's bound, unit roundoff 2^-24), at K = 16384: wider than any reduction in these models (hidden and
intermediate sizes up to 8192 and 4864 in the families supported), so it holds whichever ISA's kernels sum.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .cpu_kernels import QuantizedGemvLinear
from .generate import Decoder, GenerationConfig
from .kv_cache import make_cache

TOLERANCE = 16384 * 2.0**-24  # ~9.8e-4, relative to the largest reference logit of the step

TokensFn = Callable[[list[int], int], list[int]]  # (prompt ids, n) -> n greedy tokens
LogitsFn = Callable[[list[int], list[int]], torch.Tensor]  # (prompt ids, forced tokens) -> [n, vocab] logits


@dataclass(frozen=True)
class Agreement:
    """How two engines' greedy decodes of one prompt compare."""
    steps: int
    identical_steps: int  # leading greedy tokens the two engines share
    first_near_tie: int | None  # first step whose reference margin is under 2x the bound (None: no such step)
    min_margin: float  # smallest reference top-1/top-2 logit margin over the steps
    max_relative_error: float  # max over steps of max |logit error| / max |reference logit|
    tolerance: float
    top1_agreement: float  # share of teacher-forced steps whose argmax is the same in both engines

    @property
    def within_bound(self) -> bool:
        return self.max_relative_error <= self.tolerance

    @property
    def tokens_explained(self) -> bool:
        """Identical tokens, or a divergence no earlier than the first near-tie."""
        return self.identical_steps == self.steps or (
            self.first_near_tie is not None and self.identical_steps >= self.first_near_tie)

    @property
    def agrees(self) -> bool:
        return self.within_bound and self.tokens_explained

    def text(self) -> str:
        tie = "no near-tie" if self.first_near_tie is None else f"first near-tie at step {self.first_near_tie}"
        return (f"{self.identical_steps}/{self.steps} tokens identical ({tie}; smallest margin "
                f"{self.min_margin:.3g}); max logit error {self.max_relative_error:.2e} of the largest logit "
                f"(bound {self.tolerance:.2e}); teacher-forced top-1 agreement {self.top1_agreement:.0%}")


def decoder_tokens(decoder: Decoder) -> TokensFn:
    config = lambda n: GenerationConfig(max_new_tokens=n, ignore_eos=True)  # noqa: E731
    return lambda prompt, n: decoder.generate(list(prompt), config(n)).token_ids


def decoder_logits(decoder: Decoder) -> LogitsFn:
    """Teacher-forced logits on `decoder`'s own path: its prefill, then its decode step (fused or not)."""

    def run(prompt: list[int], forced: list[int]) -> torch.Tensor:
        model, positions, length = decoder.model, decoder.positions, len(prompt)
        cache = make_cache(decoder.cache_kind, model.config, length + len(forced), 1, decoder.dtype, decoder.device)
        rows = []
        with torch.inference_mode():
            sequence = torch.tensor([prompt], device=decoder.device)
            logits = model(sequence, positions[:length], cache, last_only=True)
            rows.append(logits[0, -1].float())
            for i, token in enumerate(forced[:-1]):
                step = torch.tensor([[token]], device=decoder.device)
                if cache is None:
                    sequence = torch.cat([sequence, step], dim=1)
                    logits = model(sequence, positions[:length + i + 1], None, last_only=True)
                else:
                    logits = decoder.decode_forward(step, positions[length + i:length + i + 1], cache, last_only=True)
                rows.append(logits[0, -1].float())
        return torch.stack(rows).cpu()

    return run


def transformers_tokens(hf_model) -> TokensFn:
    """Greedy tokens from transformers' own forward (EOS not special: both engines decode `n` tokens)."""

    def run(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt], device=hf_model.device)
        past, tokens = None, []
        with torch.inference_mode():
            for _ in range(n):
                out = hf_model(ids, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
                tokens.append(token)
                ids = torch.tensor([[token]], device=hf_model.device)
        return tokens

    return run


def transformers_logits(hf_model) -> LogitsFn:
    """Teacher-forced logits from one transformers forward over prompt + forced tokens."""

    def run(prompt: list[int], forced: list[int]) -> torch.Tensor:
        ids = torch.tensor([list(prompt) + list(forced[:-1])], device=hf_model.device)
        with torch.inference_mode():
            logits = hf_model(ids).logits[0, len(prompt) - 1:]
        return logits.float().cpu()

    return run


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, reference_tokens: Sequence[int],
                   candidate_tokens: Sequence[int], tolerance: float = TOLERANCE) -> Agreement:
    """The agreement of two teacher-forced logit tracks [n, vocab] and the two engines' own greedy tokens."""
    scale = reference.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    errors = (candidate - reference).abs().amax(dim=-1) / scale
    top2 = reference.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    near = (margins < 2 * tolerance * scale).nonzero()
    identical = next((i for i, (a, b) in enumerate(zip(reference_tokens, candidate_tokens)) if a != b),
                     min(len(reference_tokens), len(candidate_tokens)))
    return Agreement(steps=len(reference_tokens), identical_steps=identical,
                     first_near_tie=int(near[0]) if len(near) else None, min_margin=float(margins.min()),
                     max_relative_error=float(errors.max()), tolerance=tolerance,
                     top1_agreement=float((candidate.argmax(-1) == reference.argmax(-1)).float().mean()))


@dataclass(frozen=True)
class Reference:
    """One engine's greedy tokens for a prompt and its teacher-forced logits on them, to compare others with."""
    prompt: list[int]
    tokens: list[int]
    logits: torch.Tensor

    @classmethod
    def of(cls, engine: tuple[TokensFn, LogitsFn], prompt: Sequence[int], new_tokens: int) -> "Reference":
        tokens = engine[0](list(prompt), new_tokens)
        return cls(list(prompt), tokens, engine[1](list(prompt), tokens))

    def against(self, candidate: tuple[TokensFn, LogitsFn], tolerance: float = TOLERANCE) -> Agreement:
        """The candidate's own greedy tokens, and its logits teacher-forced on the reference's tokens."""
        tokens = candidate[0](self.prompt, len(self.tokens))
        return compare_logits(self.logits, candidate[1](self.prompt, self.tokens), self.tokens, tokens, tolerance)


def greedy_agreement(reference: tuple[TokensFn, LogitsFn], candidate: tuple[TokensFn, LogitsFn],
                     prompt: Sequence[int], new_tokens: int, tolerance: float = TOLERANCE) -> Agreement:
    """Greedy-decode `prompt` with both engines, then teacher-force both on the reference's tokens."""
    return Reference.of(reference, prompt, new_tokens).against(candidate, tolerance)


def of_decoder(decoder: Decoder) -> tuple[TokensFn, LogitsFn]:
    return decoder_tokens(decoder), decoder_logits(decoder)


def of_transformers(hf_model) -> tuple[TokensFn, LogitsFn]:
    return transformers_tokens(hf_model), transformers_logits(hf_model)


class _DenseTwin(torch.nn.Module):
    """A quantized linear layer's weights, dequantized, applied to unquantized fp32 activations."""

    def __init__(self, layer):
        super().__init__()
        self.weight = torch.nn.Parameter(layer.dequantize(), requires_grad=False)
        self.bias, self.input_order = layer.bias, layer.input_order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.input_order is not None:
            x = x.index_select(-1, self.input_order)
        y = torch.nn.functional.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def activation_quantization_twin(model):
    """A copy of `model` whose int4 layers take fp32 activations instead of int8-quantized ones.

    Engines that quantize activations (llama.cpp's Q4 x Q8 scheme, our int4 kernels) compute a function with
    steps: a difference of one ulp upstream can move an activation across a rounding boundary, a whole quantum.
    Two such engines then differ by a few flipped roundings, never by more than quantizing the activations at
    all perturbs the model; the logit error between the model and this twin is that perturbation, measured."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantizedGemvLinear) and module.bits == 4:
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, _DenseTwin(module))
    return twin


def activation_quantization_error(model, prompt: Sequence[int], tokens: Sequence[int]) -> float:
    """Max over steps of the relative logit error that int8 activation quantization introduces in `model`
    (teacher-forced on `tokens`): the tolerance for comparing two engines that both quantize activations."""
    reference = decoder_logits(Decoder(model))(list(prompt), list(tokens))
    twin = decoder_logits(Decoder(activation_quantization_twin(model)))(list(prompt), list(tokens))
    return compare_logits(reference, twin, tokens, tokens).max_relative_error
