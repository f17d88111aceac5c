"""Speculative decoding: a cheap drafter proposes k tokens, the target checks all of them in one forward pass.

The loop (gpt-fast's `speculative_decode`; Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"):
1. the drafter proposes d_1..d_k after the sequence so far (and, when sampling, its distributions q_1..q_k);
2. the target runs [last token, d_1..d_k] through its KV cache in one pass: k + 1 next-token distributions
   p_0..p_k (the model's mask=None is causal aligned bottom-right, so a [1, k+1] step after L cached tokens
   needs nothing special);
3. d_i is accepted with probability min(1, p(d_i) / q(d_i)) (greedy: iff d_i is the target's argmax); at the
   first rejection the next token is drawn from normalize(max(0, p - q)) instead; if all k are accepted a
   bonus token is drawn from p_k;
4. the target's cache is cropped to the accepted tokens (`cache.crop`); a model drafter crops its own cache
   to the longest prefix it shares with the sequence the next time it drafts.
Greedy output is therefore the target's own greedy output, and sampled output has exactly the target's
distribution (the rule in `speculative_sample`, shared by the decoder and the statistical test).

Drafters (one interface, `Drafter`): `ModelDrafter` (any smaller model with the same vocabulary; also the
target quantized, `self_quantized`, or its first layers, `early_exit`) and `PromptLookupDrafter` (n-gram
match against the prompt and the text so far, no model: Saxena 2023, transformers' prompt lookup decoding).

Assumes batch 1 and a target with a KV cache (static or dynamic); `cache="none"` is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from ..errors import InvalidParameterError
from .generate import Decoder, Generation, GenerationConfig
from .kv_cache import make_cache
from .sampling import SamplingParams, probabilities

# ----------------------------------------------------------------------------------------------------------
# The acceptance rule (batched, so the statistical test runs many independent draws through the same code)
# ----------------------------------------------------------------------------------------------------------

def acceptance_mask(p_draft: torch.Tensor, q_draft: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Accept each drafted token with probability min(1, p/q): u < p/q, written u * q < p (no division)."""
    return uniform * q_draft < p_draft


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where to resample after a rejection: normalize(max(0, p - q)) (falls back to p where p <= q everywhere)."""
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(1e-30), p)


def speculative_sample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sample k drafted tokens against the target, for B independent rows at once.

    p: target distributions [B, k+1, V] (p[:, i] is the distribution of the token after draft[:, :i]);
    q: drafter distributions [B, k, V] the drafts were drawn from (one-hot for a deterministic drafter);
    draft: drafted ids [B, k]. Returns (accepted counts n [B], next token [B]): the first n drafts are kept,
    then the next token (from the residual at the first rejection, or from p[:, k] if all were accepted).
    """
    batch, k = draft.shape
    if k == 0:
        return (torch.zeros(batch, dtype=torch.long, device=p.device),
                torch.multinomial(p[:, 0], 1, generator=generator).squeeze(-1))
    p_draft = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)
    q_draft = q.gather(-1, draft[..., None]).squeeze(-1)
    uniform = torch.rand(p_draft.shape, generator=generator, device=p.device)
    accepted = acceptance_mask(p_draft, q_draft, uniform)
    n = accepted.long().cumprod(-1).sum(-1)  # leading accepted drafts
    q_padded = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # after k accepted drafts: residual of p_k - 0 = p_k
    rows = torch.arange(batch, device=p.device)
    final = residual_distribution(p[rows, n], q_padded[rows, n])
    return n, torch.multinomial(final, 1, generator=generator).squeeze(-1)


def greedy_accept(target_argmax: Sequence[int], draft: Sequence[int]) -> int:
    """Greedy verification: the number of leading drafts equal to the target's own argmax choices."""
    n = 0
    while n < len(draft) and draft[n] == target_argmax[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------------
# Drafters
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [len(tokens), V] the tokens were drawn from; None = deterministic


class Drafter(Protocol):
    name: str

    def begin(self, prompt_ids: list[int], max_length: int) -> None:
        """A new request: forget the last one (a model drafter prefills the prompt here)."""

    def propose(self, tokens: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        """Up to k tokens to follow `tokens` (the prompt and everything accepted so far)."""


class ModelDrafter:
    """A small causal LM with the target's vocabulary, drafting autoregressively with its own KV cache.

    The drafter keeps the ids its cache holds; before drafting it crops the cache to the longest prefix they
    share with the sequence (rolling back its rejected drafts) and feeds the rest in one pass.
    """

    def __init__(self, model: nn.Module, name: str = "draft_model", cache: str = "static",
                 vocab_size: int | None = None):
        self.model, self.name, self.cache_kind = model, name, cache
        self.vocab_size = vocab_size  # the target's, when it differs from the drafter's
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.positions = torch.arange(model.config.max_position_embeddings, device=self.device)
        self.cache, self.cached_ids, self.logits = None, [], None

    def begin(self, prompt_ids: list[int], max_length: int) -> None:
        self.cache = make_cache(self.cache_kind, self.model.config, max_length, 1, self.dtype, self.device)
        self.cached_ids, self.logits = [], None
        with torch.inference_mode():
            self._feed(list(prompt_ids))

    def _feed(self, ids: list[int]) -> None:
        start = len(self.cached_ids)
        tokens = torch.tensor([ids], device=self.device)
        self.logits = self.model(tokens, self.positions[start:start + len(ids)], self.cache, last_only=True)[0, -1]
        self.cached_ids.extend(ids)

    def _next_logits(self) -> torch.Tensor:
        logits = self.logits
        if self.vocab_size is not None and logits.shape[-1] != self.vocab_size:  # align to the target's vocab
            pad = self.vocab_size - logits.shape[-1]
            logits = logits[:self.vocab_size] if pad < 0 else torch.cat([logits, logits.new_full((pad,), -torch.inf)])
        return logits

    def propose(self, tokens: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        shared = common_prefix_length(self.cached_ids, tokens)
        shared = min(shared, len(tokens) - 1)  # always feed at least the last token, to get fresh logits
        if shared < len(self.cached_ids):
            self.cache.crop(shared)
            del self.cached_ids[shared:]
        drafted, probs = [], []
        with torch.inference_mode():
            self._feed(list(tokens[shared:]))
            for i in range(k):
                logits = self._next_logits()
                if params.greedy:
                    token = int(logits.argmax())
                else:
                    q = probabilities(logits, params)
                    token = int(torch.multinomial(q, 1, generator=generator))
                    probs.append(q)
                drafted.append(token)
                if i < k - 1:
                    self._feed([token])
        return Draft(drafted, torch.stack(probs) if probs else None)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class PromptLookupDrafter:
    """Draft by copying: find the latest earlier occurrence of the sequence's last n tokens (n from
    `max_ngram` down to `min_ngram`) and propose the tokens that followed it (Saxena 2023's prompt lookup
    decoding; transformers' `prompt_lookup_num_tokens` takes the first occurrence, we take the latest).
    No model, no cache; proposes nothing when there is no match (the target then takes a plain step)."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidParameterError("prompt lookup needs 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def begin(self, prompt_ids: list[int], max_length: int) -> None:
        pass

    def propose(self, tokens: list[int], k: int, params: SamplingParams = SamplingParams(),
                generator: torch.Generator | None = None) -> Draft:
        sequence = torch.tensor(tokens)
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            windows = sequence[:length - 1].unfold(0, n, 1)  # every earlier n-gram (not the last one itself)
            hits = (windows == sequence[length - n:]).all(-1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                return Draft(tokens[start:start + k])
        return Draft([])


def early_exit_model(target: nn.Module, num_layers: int) -> nn.Module:
    """The target's first `num_layers` blocks followed by its own final norm and head (shared modules, no
    copy): a shallow Transformer that runs model.py's own forward (after LayerSkip / Draft&Verify's
    self-speculation, here without any training, so acceptance is whatever the early layers give)."""
    total = target.config.num_layers
    if not 1 <= num_layers < total:
        raise InvalidParameterError(f"early exit needs 1 <= num_layers < {total}, got {num_layers}")
    shallow = copy.copy(target)
    shallow._modules = dict(target._modules)
    shallow.layers = nn.ModuleList(list(target.layers)[:num_layers])
    shallow.config = dataclasses.replace(target.config, num_layers=num_layers)
    return shallow


def cast_model(target: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A copy of the target in a lower-precision dtype: the stand-in quantizer for `self_quantized`."""
    return copy.deepcopy(target).to(dtype)


def self_quantizer(scheme: str = "int8") -> tuple[Callable[[nn.Module], nn.Module], str]:
    """(function model -> quantized model, the scheme it applies) for the `self_quantized` drafter.

    'int8' / 'int4' use this project's quantization (`llmopt.engine.quantization.quantize_model`, round-to-nearest, on
    the kernels `quantization.quantized_linear` picks); where that module is not installed the bf16 cast stands in
    and the returned scheme says 'bf16 (stand-in: llmopt.engine.quantization missing)'. 'bf16' / 'fp16' cast the
    weights."""
    if scheme in ("bf16", "fp16"):
        dtype = torch.bfloat16 if scheme == "bf16" else torch.float16
        return (lambda m: m.to(dtype)), scheme
    if scheme not in ("int8", "int4"):
        raise InvalidParameterError(f"unknown self-quantization scheme {scheme!r}; use int8, int4, bf16 or fp16")
    try:
        from .quantization import quantize_model
    except ImportError:
        return (lambda m: m.to(torch.bfloat16)), "bf16 (stand-in: llmopt.engine.quantization missing)"
    bits = 8 if scheme == "int8" else 4

    def quantize(model: nn.Module) -> nn.Module:
        quantize_model(model, "rtn", bits=bits, group_size=None if bits == 8 else 64)
        return model
    return quantize, f"{scheme} (RTN)"


def make_drafter(kind: str, target: nn.Module, tokenizer=None, *, model: str | nn.Module | None = None,
                 quantize: Callable[[nn.Module], nn.Module] | None = None, num_layers: int | None = None,
                 max_ngram: int = 3, dtype="fp32", cache: str = "static") -> Drafter:
    """A drafter by name.

    - 'draft_model': `model` is a smaller model (our Transformer) or a path / id for `load_model`; its
      tokenizer must match the target's.
    - 'self_quantized': the target passed through `quantize` (a function model -> model, applied to a deep
      copy); without one, the target cast to bf16 stands in.
    - 'prompt_lookup': n-gram copying from the prompt and the text so far (up to `max_ngram` tokens).
    - 'early_exit': the target's first `num_layers` layers (default: a third) plus its norm and head.
    """
    vocab = target.config.vocab_size
    if kind == "draft_model":
        if model is None:
            raise InvalidParameterError("the draft_model drafter needs a model (a path, an id or a Transformer)")
        if not isinstance(model, nn.Module):
            from .loading import load_model

            loaded = load_model(model, dtype, next(target.parameters()).device)
            check_same_vocabulary(tokenizer, loaded.tokenizer)
            model = loaded.model
        return ModelDrafter(model, "draft_model", cache, vocab)
    if kind == "self_quantized":
        if quantize is None:
            return ModelDrafter(cast_model(target), "self_quantized", cache, vocab)
        return ModelDrafter(quantize(copy.deepcopy(target)), "self_quantized", cache, vocab)
    if kind == "prompt_lookup":
        return PromptLookupDrafter(max_ngram)
    if kind == "early_exit":
        layers = num_layers or max(1, target.config.num_layers // 3)
        return ModelDrafter(early_exit_model(target, layers), "early_exit", cache, vocab)
    raise InvalidParameterError(
        f"unknown drafter {kind!r}; use draft_model, self_quantized, prompt_lookup or early_exit")


def check_same_vocabulary(target_tokenizer, draft_tokenizer) -> None:
    """Draft and target must map text to the same ids, or the target verifies the wrong tokens."""
    if target_tokenizer is None or draft_tokenizer is None:
        return
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise InvalidParameterError("the draft model's tokenizer differs from the target's: they must share "
                                    "a vocabulary for speculative decoding")


# ----------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------

@dataclass
class SpeculativeStats:
    """What one request's speculation did. Times in seconds (drafting, target verification passes)."""
    k: int
    target_passes: int = 0  # verification passes (the prefill is not counted)
    drafted: int = 0  # drafted tokens sent to the target
    accepted: int = 0  # of which the target kept
    rejections: int = 0  # passes that ended at a rejected draft
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_steps: int = 0  # drafter forward passes while drafting (model drafters)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (vLLM's "draft acceptance rate"); drafts after a rejection count as drafted."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def alpha(self) -> float:
        """Per-token acceptance probability under Leviathan's i.i.d. model: accepted / (accepted + rejections)
        (drafts after the first rejection are never judged, so they do not count here)."""
        judged = self.accepted + self.rejections
        return self.accepted / judged if judged else float("nan")

    @property
    def accepted_per_pass(self) -> float:
        return self.accepted / self.target_passes if self.target_passes else float("nan")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "acceptance_rate": self.acceptance_rate, "alpha": self.alpha,
                "accepted_per_pass": self.accepted_per_pass}


@dataclass
class SpeculativeGeneration(Generation):
    stats: SpeculativeStats | None = None

    @property
    def tokens_per_pass(self) -> float:
        """Tokens produced per target verification pass (the first token, from the prefill, excluded)."""
        passes = self.stats.target_passes if self.stats else 0
        return (len(self.token_ids) - 1) / passes if passes else float("nan")


class SpeculativeDecoder(Decoder):
    """Our `Decoder` with speculation: same prompts, configs, stop rules and `Generation` records."""

    def __init__(self, model, tokenizer=None, drafter: Drafter | None = None, k: int = 4, cache: str = "static",
                 eos_token_ids: Sequence[int] | None = None, prefix_cache=None, engine: str = "pytorch"):
        if cache in (None, "none"):
            raise InvalidParameterError("speculative decoding verifies drafts through a KV cache: use "
                                        "cache='static' or 'dynamic'")
        if k < 1:
            raise InvalidParameterError(f"k (drafted tokens per pass) must be >= 1, got {k}")
        if drafter is None:
            raise InvalidParameterError("speculative decoding needs a drafter (see make_drafter)")
        super().__init__(model, tokenizer, cache, eos_token_ids, prefix_cache=prefix_cache, engine=engine)
        self.drafter, self.k = drafter, k

    def generate(self, prompt, config: GenerationConfig = GenerationConfig(), chat: bool = False
                 ) -> SpeculativeGeneration:
        record = SpeculativeGeneration(self.encode(prompt, chat))
        for _ in self._steps(record, config):
            pass
        if self.tokenizer is not None:
            record.text = self._final_text(record, config)
        return record

    def _steps(self, record: Generation, config: GenerationConfig) -> Iterator[int]:
        """The plain loop's setup and stop rules (`Decoder._begin`, `_emit`); each pass drafts up to k tokens
        and keeps what the target's one verification pass accepts, plus the token that pass adds."""
        prompt_length, params, k = len(record.prompt_ids), config.sampling, self.k
        max_length = prompt_length + config.max_new_tokens + k + 1
        run = self._begin(record, config, max_length)
        record.stats = stats = SpeculativeStats(k)
        tokens = list(record.prompt_ids)
        with torch.inference_mode():
            logits = self._prefill(record, torch.tensor([tokens], device=self.device), self.cache)[:, -1]
            self.drafter.begin(tokens, max_length)
            new = [int(logits.argmax(-1)) if params.greedy else
                   int(torch.multinomial(probabilities(logits, params), 1, generator=run.generator))]
            while True:
                if (yield from self._emit(record, new, run, config)):
                    return
                tokens.extend(new)
                budget = config.max_new_tokens - len(record.token_ids) - 1  # the pass adds one token itself
                new = self._speculate(tokens, min(k, budget), params, run.generator, stats)

    def _speculate(self, tokens: list[int], k: int, params: SamplingParams, generator, stats) -> list[int]:
        """One draft + verify round after `tokens` (the target's cache holds all but the last): new token ids."""
        t0 = time.perf_counter()
        draft = self.drafter.propose(tokens, k, params, generator) if k > 0 else Draft([])
        drafted = draft.tokens[:k]
        t1 = time.perf_counter()
        length = len(tokens)
        step = torch.tensor([[tokens[-1]] + drafted], device=self.device)
        # [k+1, V]; with no draft this is a plain one-token step (the fused engine's, when chosen)
        logits = self.decode_forward(step, self.positions[length - 1:length + len(drafted)], self.cache)[0]
        if params.greedy:
            choices = logits.argmax(-1).tolist()
            n = greedy_accept(choices, drafted)
            new = drafted[:n] + [choices[n]]
        else:
            p = probabilities(logits, params)
            q = draft.probs[:len(drafted)] if draft.probs is not None else one_hot(drafted, p.shape[-1], p.device)
            ids = torch.tensor([drafted], device=self.device, dtype=torch.long)
            n_tensor, next_token = speculative_sample(p[None], q[None].to(p.dtype), ids, generator)
            n = int(n_tensor)
            new = drafted[:n] + [int(next_token)]
        self.cache.crop(length + n)
        t2 = time.perf_counter()
        stats.target_passes += 1
        stats.drafted += len(drafted)
        stats.accepted += n
        stats.rejections += int(n < len(drafted))
        stats.draft_steps += len(drafted) if isinstance(self.drafter, ModelDrafter) else 0
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        return new


def one_hot(ids: list[int], vocab_size: int, device) -> torch.Tensor:
    """The 'distribution' of a deterministic drafter: all mass on the proposed token."""
    q = torch.zeros(len(ids), vocab_size, device=device)
    if ids:
        q[torch.arange(len(ids), device=device), torch.tensor(ids, device=device)] = 1.0
    return q


# ----------------------------------------------------------------------------------------------------------
# Theory: Leviathan et al.'s expected speedup
# ----------------------------------------------------------------------------------------------------------

def expected_tokens_per_pass(alpha: float, k: int) -> float:
    """E[tokens per target pass] = (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et al., eq. 1)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Expected walltime improvement (Leviathan et al., theorem 3.8): tokens per pass over the cost of a pass,
    k drafter steps at `cost_ratio` c of a target step plus one verification pass (`verify_cost` target
    steps; 1 in the paper, which assumes verifying k+1 tokens costs what decoding one does)."""
    return expected_tokens_per_pass(alpha, k) / (k * cost_ratio + verify_cost)
