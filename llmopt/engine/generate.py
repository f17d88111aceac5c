"""The decoder's generation loop: prefill, decode steps, sampling, stop rules, streaming and timings.

`cache="none"` is the document's "current behavior": every step re-runs the whole sequence (O(n^2) work).
`cache="static"` / `"dynamic"` prefill the prompt into a KV cache in one pass, then each step runs one token.
Per-token work in the cached loop is the model's forward and sampling; nothing is rebuilt per step.
"""
from __future__ import annotations

import numbers
import operator
import reprlib
import time
from dataclasses import dataclass, field
from typing import Generator, Iterator, Sequence

import torch

from ..errors import ContextLengthError, InvalidParameterError
from .kv_cache import make_cache
from .prefix_cache import model_fingerprint
from .sampling import SamplingParams, sample

ENGINES = ("pytorch", "fused")


def _token_ids(prompt) -> list[int]:
    """A prompt given as ids, as a list of Python ints; InvalidParameterError for anything that is not ints."""
    try:
        items = list(prompt)
    except TypeError:
        raise InvalidParameterError(f"the prompt must be text (str) or a sequence of token ids, "
                                    f"got {type(prompt).__name__}") from None
    ids = []
    for position, item in enumerate(items):
        try:
            if isinstance(item, bool):
                raise TypeError
            ids.append(operator.index(item))
        except TypeError:
            raise InvalidParameterError(f"prompt token ids must be ints (one flat sequence), got {reprlib.repr(item)} "
                                        f"({type(item).__name__}) at position {position}") from None
    return ids


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate a fixed number of tokens

    def __post_init__(self):
        """Refuse bad values here, with their name, rather than as a traceback mid-generation."""
        if not isinstance(self.max_new_tokens, numbers.Integral) or isinstance(self.max_new_tokens, bool):
            raise InvalidParameterError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise InvalidParameterError(f"max_new_tokens must be positive (an int >= 1), got {self.max_new_tokens}")
        if self.seed is not None and (not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool)):
            raise InvalidParameterError(f"seed must be an int or None, got {self.seed!r}")
        self.sampling  # validates the sampling parameters
        stops = self.stop_strings
        if isinstance(stops, str):
            raise InvalidParameterError(f"stop_strings must be a tuple of strings, not one string: use ({stops!r},)")
        if not isinstance(stops, (tuple, list)) or not all(isinstance(s, str) and s for s in stops):
            raise InvalidParameterError(f"stop_strings must be a tuple of non-empty strings, got {stops!r}")
        object.__setattr__(self, "stop_strings", tuple(stops))  # a list works too; frozen stays hashable

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)


@dataclass
class Generation:
    """One request's result and timings (seconds, measured with perf_counter from the request's start)."""
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # length | eos | stop
    token_times_s: list[float] = field(default_factory=list)  # when each token was ready
    prefix_cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache (not prefilled)

    @property
    def time_to_first_token_s(self) -> float:
        return self.token_times_s[0]

    @property
    def total_s(self) -> float:
        return self.token_times_s[-1]

    @property
    def token_latencies_s(self) -> list[float]:
        """Time each token took: the first includes prefill, the rest are decode steps."""
        return [b - a for a, b in zip([0.0] + self.token_times_s[:-1], self.token_times_s)]

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second of decoding (excludes prefill)."""
        n = len(self.token_times_s) - 1
        elapsed = self.total_s - self.time_to_first_token_s
        return n / elapsed if n > 0 and elapsed > 0 else float("nan")  # 0 s: all came with the first pass


@dataclass
class StreamEvent:
    token_id: int
    text: str  # the text this token added (may be empty mid-character)
    elapsed_s: float


@dataclass(frozen=True)
class _Run:
    """One generation's sampling generator, stop rules and start time (`Decoder._begin`)."""
    generator: torch.Generator | None
    eos: frozenset
    stop_strings: tuple[str, ...]
    start: float


class Decoder:
    """Generation over our `Transformer` with a chosen KV cache kind ('none' | 'static' | 'dynamic').

    compile: run cached decode steps through `torch.compile` (prefill stays eager). Compilation happens on the
    first decode step; call `warm_up()` to pay it outside any timed region (it returns the seconds spent).
    engine: 'pytorch' (the model's forward for every step) or 'fused' (`llmopt.engine.fused_decode`: each decode step of
    1 to 16 tokens into the static cache is a single C call on the CPU kernels, the same math; prefill stays
    PyTorch).
    prefix_cache: an `llmopt.engine.prefix_cache.PrefixCache`; prefill then runs only on the uncached suffix.
    """

    def __init__(self, model, tokenizer=None, cache: str = "static", eos_token_ids: Sequence[int] | None = None,
                 compile: bool = False, prefix_cache=None, engine: str = "pytorch"):
        make_cache(cache, model.config, 1)  # validates the kind early
        if engine not in ENGINES:
            raise InvalidParameterError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
        if engine == "fused" and (compile or cache != "static"):
            raise InvalidParameterError("the fused engine runs decode steps into a static cache, uncompiled: "
                                        "use cache='static' and compile=False")
        if compile and cache in (None, "none"):
            raise InvalidParameterError("compile applies to the cached decode step; use cache='static'")
        if prefix_cache is not None and cache in (None, "none"):
            raise InvalidParameterError("a prefix cache needs a KV cache: use cache='static' or 'dynamic'")
        self.decode_forward = torch.compile(model, dynamic=True) if compile else model
        if engine == "fused":  # raises InvalidParameterError, with the reason, where it cannot run the model
            from .fused_decode import FusedDecodeStep

            self.decode_forward = FusedDecodeStep(model)
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.model, self.tokenizer, self.cache_kind = model, tokenizer, cache
        ids = set(eos_token_ids if eos_token_ids is not None else model.config.eos_token_ids)
        if eos_token_ids is None and tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(ids)
        self.device = next(model.parameters()).device
        self.dtype = model.activation_dtype
        self.positions = torch.arange(model.config.max_position_embeddings, device=self.device)
        self.cache = None  # the last request's cache, kept for inspection (bytes, length)

    def warm_up(self, prompt_length: int = 8, new_tokens: int = 4) -> float:
        """Run one short generation (compiling the decode step if asked) and return its seconds."""
        start = time.perf_counter()
        self.generate([0] * prompt_length, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
        return time.perf_counter() - start

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids for a prompt given as text (optionally through the chat template) or as ids.

        Raises InvalidParameterError for anything else (bytes, floats, nested lists), for text that is not valid
        UTF-8 (lone surrogates) and for ids outside the model's vocabulary."""
        if isinstance(prompt, str):
            ids = self._encode_text(prompt, chat)
        elif isinstance(prompt, (bytes, bytearray, memoryview)):
            raise InvalidParameterError("the prompt must be text (str) or a sequence of token ids, not bytes: "
                                        "decode it first, e.g. prompt.decode('utf-8')")
        else:
            ids = _token_ids(prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)
        vocab = self.model.config.vocab_size
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParameterError(f"prompt token id {ids[bad]} (position {bad}) is outside the model's "
                                        f"vocabulary: ids must be in [0, {vocab})")
        return ids

    def _encode_text(self, prompt: str, chat: bool) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameterError("a text prompt needs a tokenizer: give Decoder one or pass token ids")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidParameterError(
                f"the prompt is not valid UTF-8 text: lone surrogate {prompt[exc.start:exc.end]!r} at position "
                f"{exc.start} (from bytes that are not UTF-8?)") from None
        if chat:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False))
        return list(self.tokenizer(prompt).input_ids)

    def generate(self, prompt: str | Sequence[int], config: GenerationConfig = GenerationConfig(),
                 chat: bool = False) -> Generation:
        record = Generation(self.encode(prompt, chat))
        for _ in self._steps(record, config):
            pass
        if self.tokenizer is not None:
            record.text = self._final_text(record, config)
        return record

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig = GenerationConfig(),
               chat: bool = False) -> Iterator[StreamEvent]:
        """Yield each token as soon as it is sampled, with the text it adds."""
        record = Generation(self.encode(prompt, chat))
        shown = ""
        for token_id in self._steps(record, config):
            text = self.tokenizer.decode(record.token_ids, skip_special_tokens=True) if self.tokenizer else ""
            delta, shown = (text[len(shown):], text) if not text.endswith("\ufffd") else ("", shown)
            yield StreamEvent(token_id, delta, record.token_times_s[-1])

    def _final_text(self, record: Generation, config: GenerationConfig) -> str:
        text = self.tokenizer.decode(record.token_ids, skip_special_tokens=True)
        for stop in config.stop_strings:
            if stop in text:
                text = text[:text.index(stop)]
        return text

    def _check_fits(self, prompt_length: int, config: GenerationConfig) -> None:
        limit = self.model.config.max_position_embeddings
        if prompt_length == 0:
            raise InvalidParameterError("the prompt is empty")
        if prompt_length + config.max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt of {prompt_length} tokens + max_new_tokens={config.max_new_tokens} exceeds the "
                f"model's context of {limit} positions")

    def _prefill(self, record: Generation, sequence: torch.Tensor, cache) -> torch.Tensor:
        """Run the prompt into `cache` and return the last position's logits [1, 1, V]. With a prefix cache, the
        longest cached prefix is loaded instead of computed (at least one token is always prefilled, for the
        logits) and the prompt's KV is stored back for later requests."""
        prompt_length = len(record.prompt_ids)
        reused, fingerprint = 0, None
        if self.prefix_cache is not None:
            fingerprint = model_fingerprint(self.model)
            reused = self.prefix_cache.load_into(cache, record.prompt_ids[:-1], fingerprint)
        logits = self.model(sequence[:, reused:], self.positions[reused:prompt_length], cache, last_only=True)
        if self.prefix_cache is not None:
            self.prefix_cache.store_from(cache, record.prompt_ids, fingerprint)
        record.prefix_cached_tokens = reused
        return logits

    def _begin(self, record: Generation, config: GenerationConfig, cache_length: int) -> _Run:
        """What every generation loop sets up before its prefill: the checks, the sampling generator, the stop
        rules and a fresh KV cache of `cache_length` positions (kept as `self.cache`)."""
        self._check_fits(len(record.prompt_ids), config)
        generator = None
        if not config.sampling.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(config.seed if config.seed is not None else torch.seed())
        stop_strings = config.stop_strings if self.tokenizer is not None else ()
        eos = frozenset() if config.ignore_eos else self.eos_token_ids
        self.cache = make_cache(self.cache_kind, self.model.config, cache_length, 1, self.dtype, self.device)
        return _Run(generator, eos, stop_strings, time.perf_counter())

    def _emit(self, record: Generation, token_ids: Sequence[int], run: _Run, config: GenerationConfig
              ) -> Generator[int, None, bool]:
        """Append each token to `record` (with its time) and yield it, one at a time, checking the stop rules after
        each exactly as a one-token loop does; returns True when the generation is over (EOS, a stop string or
        max_new_tokens), with `record.finish_reason` set."""
        now = time.perf_counter() - run.start
        for token_id in token_ids:
            record.token_ids.append(token_id)
            record.token_times_s.append(now)
            yield token_id
            if token_id in run.eos:
                record.finish_reason = "eos"
                return True
            if run.stop_strings and any(s in self.tokenizer.decode(record.token_ids) for s in run.stop_strings):
                record.finish_reason = "stop"
                return True
            if len(record.token_ids) == config.max_new_tokens:
                return True
        return False

    def _steps(self, record: Generation, config: GenerationConfig) -> Iterator[int]:
        """The loop itself: yields each new token id and fills `record` with ids and timestamps."""
        prompt_length = len(record.prompt_ids)
        run = self._begin(record, config, prompt_length + config.max_new_tokens)
        model, decode_forward, positions, cache = self.model, self.decode_forward, self.positions, self.cache
        sequence = torch.tensor([record.prompt_ids], device=self.device)
        with torch.inference_mode():
            logits = self._prefill(record, sequence, cache)
            while True:
                next_token = sample(logits[:, -1], config.sampling, run.generator)
                if (yield from self._emit(record, [int(next_token)], run, config)):
                    return
                length = prompt_length + len(record.token_ids)
                if cache is None:  # baseline: re-run the whole sequence
                    sequence = torch.cat([sequence, next_token.view(1, 1)], dim=1)
                    logits = model(sequence, positions[:length], None, last_only=True)
                else:
                    logits = decode_forward(next_token.view(1, 1), positions[length - 1:length], cache,
                                            last_only=True)
