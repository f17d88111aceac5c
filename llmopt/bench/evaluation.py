"""How much a changed model (quantized, approximated) departs from the reference one, on held-out text.

Three numbers, all computed on the same windows of token ids:
- perplexity: exp of the mean next-token cross-entropy (the usual language-model quality figure);
- top-1 agreement: share of positions where the model's most likely next token equals the reference's;
- KL divergence KL(reference || model) of the next-token distributions, mean over positions (nats).
The text is split into non-overlapping windows of `window` tokens (each scored from its own start, no carried
context), so the numbers compare models with each other, not with published perplexities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError


def token_windows(tokenizer, text: str, max_tokens: int = 1024, window: int = 512) -> torch.Tensor:
    """The first `max_tokens` ids of `text` as windows [n, window] (`max_tokens` rounded down to whole windows)."""
    if window < 2 or max_tokens < window:
        raise InvalidParameterError(f"need window >= 2 and max_tokens >= window, got {window}, {max_tokens}")
    ids = tokenizer(text).input_ids
    n = min(max_tokens, len(ids)) // window
    if n == 0:
        raise InvalidParameterError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[:n * window]).reshape(n, window)


@torch.inference_mode()
def log_probs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Next-token log-probabilities (fp32) per window: [window, vocab] each, one forward pass per window."""
    device = next(model.parameters()).device
    positions = torch.arange(windows.shape[1], device=device)
    return [F.log_softmax(model(row[None].to(device), positions)[0].float(), dim=-1).cpu() for row in windows]


@dataclass
class Agreement:
    perplexity: float
    reference_perplexity: float
    top1_agreement: float
    kl_divergence: float
    tokens: int

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "reference_perplexity": self.reference_perplexity,
                "perplexity_ratio": self.perplexity / self.reference_perplexity,
                "top1_agreement": self.top1_agreement, "kl_divergence": self.kl_divergence,
                "scored_tokens": self.tokens}


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], windows: torch.Tensor) -> Agreement:
    """Perplexity of both, top-1 agreement and KL(reference || candidate) over every predicted position."""
    nll_ref = nll = kl = agree = count = 0.0
    for ref, cand, ids in zip(reference, candidate, windows):
        targets = ids[1:]
        ref, cand = ref[:-1], cand[:-1]  # the last position predicts a token outside the window
        nll_ref += -ref.gather(1, targets[:, None]).sum().item()
        nll += -cand.gather(1, targets[:, None]).sum().item()
        kl += (ref.exp() * (ref - cand)).sum().item()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        count += len(targets)
    return Agreement(math.exp(nll / count), math.exp(nll_ref / count), agree / count, kl / count, int(count))
