"""A seeded stream of generation requests for the batching experiments: prompts, output lengths, arrival times.

- Prompts come from a *pool*: `prompt_pool(tokenizer)` takes the prompts in `data/prompts.jsonl` (chat ones through
  the chat template) plus slices of the held-out evaluation text at a few lengths, so prompt lengths vary from a
  dozen to ~100 tokens; `random_pool(vocab_size)` makes random token ids for tiny random-weight models.
- Each request's `max_new_tokens` is drawn log-uniformly between `min_new_tokens` and `max_new_tokens` (many
  short answers, a few long ones). Requests also stop at EOS: the scheduler respects it, so real lengths are
  the drawn cap or shorter.
- Arrivals are either all at once (`arrival="burst"`: a backlog of N requests at t=0, the "N concurrent
  requests" of the design document) or a Poisson process (`arrival="poisson"`, exponential gaps at `rate_per_s`),
  the standard open-loop load model of serving benchmarks (vLLM's `benchmark_serving --request-rate`).

Prompts, caps and arrivals are drawn from three `numpy.random.Generator`s seeded from `seed`, so one seed gives
the same prompts and caps whatever the arrival process and the number of requests (a Poisson workload of k
requests asks what the first k requests of the burst workload ask, and their greedy answers must be the same).
`Workload.frame()` and `Workload.params` are what the notebook saves beside its results so a run can be reproduced.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from ..engine.batching import Request
from ..errors import InvalidParameterError
from . import datasets

ARRIVALS = ("burst", "poisson")


@dataclass(frozen=True)
class WorkloadParams:
    n_requests: int
    seed: int
    arrival: str = "burst"
    rate_per_s: float | None = None
    min_new_tokens: int = 4
    max_new_tokens: int = 32


@dataclass
class Workload:
    params: WorkloadParams
    requests: list[Request] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """One row per request (ids, lengths, arrival, prompt source) plus the generating parameters."""
        rows = [{"request_id": r.request_id, "prompt_tokens": len(r.prompt_ids), "max_new_tokens": r.max_new_tokens,
                 "arrival_s": r.arrival_s, "source": r.source} for r in self.requests]
        frame = pd.DataFrame(rows)
        for key, value in asdict(self.params).items():
            frame[f"workload_{key}"] = value
        return frame

    def head(self, n: int) -> "Workload":
        """The first `n` requests (same prompts, caps and arrivals)."""
        return Workload(replace(self.params, n_requests=min(n, len(self.requests))), self.requests[:n])

    @property
    def total_max_new_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)


def with_answer_lengths(pool: list[tuple[str, list[int]]], n_requests: int, seed: int,
                        answer_lengths) -> dict[str, Workload]:
    """Burst workloads of the same prompts (same seed) with other output caps, one per [min, max] pair, labeled
    "burst, answers min-max"."""
    workloads = {}
    for caps in answer_lengths:
        if not (isinstance(caps, (list, tuple)) and len(caps) == 2 and all(isinstance(c, int) for c in caps)):
            raise InvalidParameterError(
                f"answer lengths are [min, max] pairs of integers, e.g. [[16, 64]]; got {caps!r}")
        lo, hi = caps
        workloads[f"burst, answers {lo}-{hi}"] = make_workload(pool, n_requests, seed, "burst", min_new_tokens=lo,
                                                               max_new_tokens=hi)
    return workloads


def prompt_pool(tokenizer, text_lengths=(24, 48, 96), chat: bool = True, seed: int = 0,
                max_prompt_tokens: int | None = 128) -> list[tuple[str, list[int]]]:
    """(source, token ids) for every prompt in data/prompts.jsonl and a few held-out text slices.

    chat prompts go through the tokenizer's chat template when `chat` is true; text slices start at seeded
    offsets of the held-out Python reference text. Prompts longer than `max_prompt_tokens` are cut from the left
    side (their end, where the question is, is kept)."""
    pool = []
    for record in datasets.prompts():
        if chat and record["chat"] and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": record["text"]}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tokenizer(record["text"]).input_ids
        pool.append((f"prompts:{record['id']}:{record['kind']}", list(ids)))
    text_ids = tokenizer(datasets.evaluation_text("heldout")).input_ids
    rng = np.random.default_rng(seed)
    for length in text_lengths:
        start = int(rng.integers(0, max(1, len(text_ids) - length)))
        pool.append((f"heldout:{start}:{length}", list(text_ids[start:start + length])))
    if max_prompt_tokens:
        pool = [(source, ids[-max_prompt_tokens:]) for source, ids in pool]
    return pool


def random_pool(vocab_size: int, n_prompts: int = 32, min_tokens: int = 2, max_tokens: int = 40,
                seed: int = 0, avoid: tuple[int, ...] = ()) -> list[tuple[str, list[int]]]:
    """Random prompts of mixed lengths for tiny random-weight models (token ids in `avoid` are not used)."""
    if not 0 < min_tokens <= max_tokens:
        raise InvalidParameterError("need 0 < min_tokens <= max_tokens")
    rng = np.random.default_rng(seed)
    allowed = np.array([t for t in range(vocab_size) if t not in set(avoid)])
    pool = []
    for i in range(n_prompts):
        length = int(rng.integers(min_tokens, max_tokens + 1))
        pool.append((f"random:{i}", rng.choice(allowed, size=length).tolist()))
    return pool


def make_workload(pool: list[tuple[str, list[int]]], n_requests: int, seed: int = 0, arrival: str = "burst",
                  rate_per_s: float | None = None, min_new_tokens: int = 4, max_new_tokens: int = 32) -> Workload:
    """`n_requests` requests: prompts drawn from `pool`, log-uniform output caps, burst or Poisson arrivals."""
    if n_requests <= 0 or not pool:
        raise InvalidParameterError("a workload needs n_requests > 0 and a non-empty prompt pool")
    if arrival not in ARRIVALS:
        raise InvalidParameterError(f"unknown arrival process {arrival!r}; use one of {', '.join(ARRIVALS)}")
    if arrival == "poisson" and not (rate_per_s and rate_per_s > 0):
        raise InvalidParameterError("Poisson arrivals need rate_per_s > 0")
    if not 0 < min_new_tokens <= max_new_tokens:
        raise InvalidParameterError("need 0 < min_new_tokens <= max_new_tokens")
    params = WorkloadParams(n_requests, seed, arrival, rate_per_s if arrival == "poisson" else None,
                            min_new_tokens, max_new_tokens)
    # one stream per quantity: the first k requests of a larger workload are the workload of k requests
    pick_rng, cap_rng, arrival_rng = (np.random.default_rng([seed, i]) for i in range(3))
    picks = pick_rng.integers(0, len(pool), size=n_requests)
    caps = np.exp(cap_rng.uniform(math.log(min_new_tokens), math.log(max_new_tokens + 1), size=n_requests))
    caps = np.clip(np.floor(caps).astype(int), min_new_tokens, max_new_tokens)
    if arrival == "poisson":
        arrivals = np.cumsum(arrival_rng.exponential(1.0 / rate_per_s, size=n_requests))
    else:
        arrivals = np.zeros(n_requests)
    requests = [Request(i, tuple(pool[p][1]), int(c), float(a), pool[p][0])
                for i, (p, c, a) in enumerate(zip(picks, caps, arrivals))]
    return Workload(params, requests)
