"""Serving a stream of requests with one model: sequential, static, dynamic and continuous batching.

`run(scheduler, model, requests, max_batch, timeout_ms)` replays a workload (`llmopt.bench.workload`) against the real
wall clock: a request becomes visible to the scheduler once `arrival_s` seconds have passed since the run
started, and the scheduler loop polls its queue between model calls (it sleeps only when it has nothing to run).
All four schedulers decode greedily with a KV cache and stop each request at EOS or its `max_new_tokens`:

- `sequential`: one request at a time through the plain `Decoder` (the design document's current behavior).
- `static` (the document's option 1, `wait_for_batch(max_size, timeout)`): when the engine is free and a request
  is queued, a collection window of `timeout_ms` opens; the batch leaves when it holds `max_batch` requests or the
  window closes. Prompts are left-padded to the longest, pads are masked out of attention (bool mask, True =
  attend), every row has its own positions, and the batch runs until its longest request is done: rows that
  finished early keep computing (padding) and their requests are answered when the batch ends.
- `dynamic` (the document's option 2): the same padded batch, but it leaves as soon as the queue holds
  `max_batch` requests or the *oldest* queued request has waited `timeout_ms` (a backlog leaves at once instead of
  waiting for a new window).
- `continuous` (iteration-level scheduling, Orca, OSDI'22; vLLM): a `SlotCache` holds `max_batch` sequences,
  each in its own slot with its own length, and every loop is one model call. Queued requests take free slots
  and their prompts are prefilled straight into them; when sequences are already running, their next decode
  step rides in the same forward as the joiners' prompts (`_SlotMixedStep`: Sarathi-Serve's piggybacking,
  vLLM V1's mixed prefill/decode batches; one packed row, each query attending only its own slot), so a join
  costs the running rows no decode step of their own (`mixed_steps=False`: the prefill runs alone first, as
  vLLM's original scheduler). Joiners with nothing running: a lone joiner alone (batch 1, no padding: exactly
  what the sequential decoder computes), several packed end to end in one row with a block-diagonal causal mask
  (vLLM's varlen prefill: one large matrix product instead of several small ones). Chunked prefill would bound
  the stall a long prompt causes the others, but prompts here are short. Otherwise every loop is a decode step
  over all active sequences, one token each, each at its own position with a mask built from its own length; a
  finished sequence leaves the batch at once (the last slot is moved into its hole so the active slots stay
  contiguous and the cache views need no copy).
  `join_batch` > 1 holds free slots (for at most `join_wait_steps` decode steps) until several queued requests
  can join in one packed prefill, larger and cheaper per token (TGI's `waiting_served_ratio` /
  `max_waiting_tokens`, vLLM's `scheduler_delay_factor`); the default 1 admits each request at the first free slot.

What is measured, per request: arrival, start (dispatch), first token, last token and finish (answer
available) times and the tokens; per run: generated tokens/s, latency and time-to-first-token percentiles, the
busy fraction (wall time inside the model's forward / run wall time: the CPU analogue of "GPU utilization"),
and token slots computed vs useful (padding waste). Forward time is taken by hooks on the model, so the
sequential scheduler runs the unmodified `Decoder`.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Sequence

import numpy as np
import torch

from ..errors import ContextLengthError, InvalidParameterError
from ..hardware import contended, synchronize
from .attention import causal_mask
from .generate import Decoder, GenerationConfig
from .kv_cache import StaticCache

SCHEDULERS = ("sequential", "static", "dynamic", "continuous")


@dataclass(frozen=True)
class Request:
    """One generation request; `arrival_s` is seconds after the run starts."""
    request_id: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0
    source: str = ""


@dataclass
class RequestRecord:
    """One request's life in a run (seconds since the run started)."""
    request_id: int
    prompt_tokens: int
    max_new_tokens: int
    arrival_s: float
    start_s: float = math.nan  # dispatched: its prefill begins
    first_token_s: float = math.nan
    last_token_s: float = math.nan  # its last token was computed
    finish_s: float = math.nan  # its answer is available (static/dynamic: when the whole batch ends)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""  # eos | length
    completions: int = 0  # times the scheduler answered it (must end at exactly 1)

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def time_to_first_token_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s


@dataclass
class RunResult:
    scheduler: str
    max_batch: int
    timeout_ms: float
    records: list[RequestRecord]
    wall_s: float
    forward_s: float
    forward_cpu_s: float
    forward_calls: int
    computed_tokens: int  # token positions fed through the model, padding included
    useful_tokens: int  # real prompt tokens + the decode inputs of unfinished sequences
    decode_steps: int = 0
    decode_rows: int = 0  # sum over decode steps of the rows computed (padding rows included)
    prefill_s: float = math.nan  # the part of forward_s spent in prefill calls (mixed steps included)
    mixed_steps: int = 0  # continuous: forwards that ran the rows' decode step inside the joiners' prefill
    mixed_rows: int = 0  # the decode rows those forwards computed
    held_steps: int = 0  # continuous with join_batch > 1: decode steps run while free slots waited for more

    @property
    def tokens(self) -> dict[int, list[int]]:
        return {r.request_id: r.token_ids for r in self.records}

    def rows(self) -> list[dict]:
        """One row per request with its timings."""
        return [{
            "scheduler": self.scheduler, "max_batch": self.max_batch, "request_id": r.request_id,
            "prompt_tokens": r.prompt_tokens, "max_new_tokens": r.max_new_tokens, "new_tokens": len(r.token_ids),
            "finish_reason": r.finish_reason, "completions": r.completions, "arrival_s": r.arrival_s,
            "start_s": r.start_s,
            "first_token_s": r.first_token_s, "last_token_s": r.last_token_s, "finish_s": r.finish_s,
            "latency_s": r.latency_s, "time_to_first_token_s": r.time_to_first_token_s, "queue_s": r.queue_s,
        } for r in self.records]

    def stats(self) -> dict:
        """The run's summary: throughput, latency percentiles, busy fraction, padding."""
        latency = np.array([r.latency_s for r in self.records])
        ttft = np.array([r.time_to_first_token_s for r in self.records])
        generated = sum(len(r.token_ids) for r in self.records)
        padded = self.computed_tokens - self.useful_tokens
        threads = torch.get_num_threads()
        cpu_ratio = self.forward_cpu_s / self.forward_s if self.forward_s else math.nan
        return {
            "scheduler": self.scheduler, "max_batch": self.max_batch, "timeout_ms": self.timeout_ms,
            "requests": len(self.records), "generated_tokens": generated, "wall_s": self.wall_s,
            "tokens_per_s": generated / self.wall_s, "requests_per_s": len(self.records) / self.wall_s,
            "latency_mean_s": float(latency.mean()), "latency_p50_s": float(np.percentile(latency, 50)),
            "latency_p95_s": float(np.percentile(latency, 95)), "latency_p99_s": float(np.percentile(latency, 99)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "queue_mean_s": float(np.mean([r.queue_s for r in self.records])),
            "forward_s": self.forward_s, "prefill_s": self.prefill_s, "busy_fraction": self.forward_s / self.wall_s,
            # tokens from decode-only forwards per second of their time (prefill and mixed steps excluded)
            "decode_tokens_per_s": (generated - len(self.records) - self.mixed_rows) / (self.forward_s - self.prefill_s)
            if self.forward_s > self.prefill_s else math.nan,
            "forward_calls": self.forward_calls, "computed_tokens": self.computed_tokens,
            "useful_tokens": self.useful_tokens, "padded_tokens": padded,
            "padding_waste": padded / self.computed_tokens if self.computed_tokens else math.nan,
            # every forward that advances running rows counts as a decode step (mixed steps included)
            "mean_decode_rows": ((self.decode_rows + self.mixed_rows) / (self.decode_steps + self.mixed_steps)
                                 if self.decode_steps + self.mixed_steps else math.nan),
            # decode inputs that belong to unfinished requests (each request's first token comes from prefill)
            "useful_rows_per_decode_step": ((generated - len(self.records)) / (self.decode_steps + self.mixed_steps)
                                            if self.decode_steps + self.mixed_steps else math.nan),
            "mixed_steps": self.mixed_steps, "mixed_rows": self.mixed_rows, "held_steps": self.held_steps,
            "forward_cpu_wall_ratio": cpu_ratio,
            "contended": contended(cpu_ratio, threads),
        }


class ForwardMeter:
    """Hooks on the model that add up wall and CPU time spent inside `forward` and the token positions fed.

    A call with more than one position per row counts as prefill, one position as a decode step."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.seconds = self.cpu_seconds = self.prefill_seconds = 0.0
        self.calls = self.tokens = 0
        self._handles = []

    def _before(self, module, args):
        synchronize(self.device)
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        self._prefill = args[0].shape[1] > 1
        self.tokens += args[0].numel()

    def _after(self, module, args, output):
        synchronize(self.device)
        seconds = time.perf_counter() - self._t0
        self.seconds += seconds
        self.prefill_seconds += seconds if self._prefill else 0.0
        self.cpu_seconds += time.process_time() - self._c0
        self.calls += 1

    def __enter__(self):
        self._handles = [self.model.register_forward_pre_hook(self._before),
                         self.model.register_forward_hook(self._after)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


class SlotCache:
    """A batched KV cache for continuous batching: per layer [max_batch, Hkv, max_length, D], one slot per sequence.

    Slots 0 .. rows-1 are the active sequences, kept contiguous (`move` fills a hole), so a decode step reads a
    view `[:rows, :, :longest]` and each row writes its new key at its own length. Prefill writes one slot
    through `prefill_view(slot)`, a batch-1 cache for the model's forward."""

    def __init__(self, cfg, max_batch: int, max_length: int, dtype=torch.float32, device="cpu"):
        shape = (max_batch, cfg.num_kv_heads, max_length, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.max_batch, self.max_length, self.device = max_batch, max_length, device
        self.lengths = [0] * max_batch  # tokens held per slot
        self._rows = 0
        self._row_index = torch.arange(max_batch, device=device)
        self._key_index = torch.arange(max_length, device=device)

    def prefill_view(self, slot: int) -> "_SlotPrefill":
        self.lengths[slot] = 0
        return _SlotPrefill(self, slot)

    def begin_decode(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [rows, 1] and mask [rows, 1, 1, S] for one decode step over slots 0 .. rows-1."""
        lengths = self.lengths[:rows]
        if max(lengths) + 1 > self.max_length:
            raise ContextLengthError(f"slot cache full: {max(lengths) + 1} > {self.max_length} positions")
        self._rows, self._key_length = rows, max(lengths) + 1
        self._write_at = torch.tensor(lengths, device=self.device)
        mask = self._key_index[None, :self._key_length] <= self._write_at[:, None]
        return self._write_at[:, None], mask[:, None, None, :]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        rows, at = self._row_index[:self._rows], self._write_at
        self.keys[layer_idx][rows, :, at] = k[:, :, 0]
        self.values[layer_idx][rows, :, at] = v[:, :, 0]
        return (self.keys[layer_idx][:self._rows, :, :self._key_length],
                self.values[layer_idx][:self._rows, :, :self._key_length])

    def end_decode(self) -> None:
        for i in range(self._rows):
            self.lengths[i] += 1

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` (keys, values, length) into slot `target`."""
        n = self.lengths[source]
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :n] = keys[source, :, :n]
            values[target, :, :n] = values[source, :, :n]
        self.lengths[target] = n


class _SlotPrefill:
    """A batch-1 cache view of one slot, for that sequence's prefill."""

    def __init__(self, slots: SlotCache, slot: int):
        self.slots, self.slot = slots, slot

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        n, s = k.shape[2], self.slot
        if n > self.slots.max_length:
            raise ContextLengthError(f"prompt of {n} tokens does not fit a slot of {self.slots.max_length}")
        self.slots.keys[layer_idx][s:s + 1, :, :n] = k
        self.slots.values[layer_idx][s:s + 1, :, :n] = v
        if layer_idx == len(self.slots.keys) - 1:
            self.slots.lengths[s] = n
        return self.slots.keys[layer_idx][s:s + 1, :, :n], self.slots.values[layer_idx][s:s + 1, :, :n]


class _SlotMixedStep:
    """A cache view for one forward of the running rows' decode step and/or the joiners' prefill, packed end to
    end in one row (no padding: vLLM's varlen prefill; with rows, Sarathi-Serve's piggybacking and vLLM V1's mixed
    batches): tokens [row 0 .. row R-1, joiner 0's prompt, joiner 1's prompt, ...]. Row i's new key goes to slot i
    at its length, joiner j's keys to slot `first_slot + j` (default R). Every query attends only its own slot's
    keys (gathered from the slots into one key row), a row all its cached keys and its new one, a joiner's token
    the earlier tokens of its prompt (a block-diagonal causal mask): the decode rows share the joiners' large
    matrix products instead of a decode step of their own."""

    def __init__(self, slots: SlotCache, rows: int, joiner_lengths: list[int], first_slot: int | None = None):
        device = slots.device
        first_slot = rows if first_slot is None else first_slot
        if first_slot < rows or first_slot + len(joiner_lengths) > slots.max_batch:
            raise InvalidParameterError(f"{len(joiner_lengths)} joiners from slot {first_slot} do not fit "
                                        f"{slots.max_batch} slots beside {rows} rows")
        lengths = slots.lengths[:rows]
        if rows and max(lengths) + 1 > slots.max_length or max(joiner_lengths, default=0) > slots.max_length:
            raise ContextLengthError(f"slot cache full: {slots.max_length} positions per slot")
        self.slots, self.rows, self.joiner_lengths, self.first_slot = slots, rows, joiner_lengths, first_slot
        joiner_slots = [first_slot + j for j in range(len(joiner_lengths))]
        query_slot = list(range(rows)) + [s for s, n in zip(joiner_slots, joiner_lengths) for _ in range(n)]
        query_position = lengths + [p for n in joiner_lengths for p in range(n)]
        keys_held = list(zip(range(rows), [n + 1 for n in lengths])) + list(zip(joiner_slots, joiner_lengths))
        key_slot = [s for s, n in keys_held for _ in range(n)]  # per slot, its keys after this step's writes
        key_position = [p for _, n in keys_held for p in range(n)]
        self.query_slot = torch.tensor(query_slot, device=device)
        query_position = torch.tensor(query_position, device=device)
        self.key_slot = torch.tensor(key_slot, device=device)
        self.key_position = torch.tensor(key_position, device=device)
        self.positions = query_position[None]
        same_slot = self.query_slot[:, None] == self.key_slot[None, :]
        self.mask = (same_slot & (self.key_position[None, :] <= query_position[:, None]))[None, None]
        self.logits_at = torch.tensor(list(range(rows)) + [rows + e - 1 for e in accumulate(joiner_lengths)],
                                      device=device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.slots.keys[layer_idx], self.slots.values[layer_idx]  # [slots, Hkv, S, D]
        new_keys, new_values = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, Hkv, D]
        query_position = self.positions[0]
        keys[self.query_slot, :, query_position] = new_keys
        values[self.query_slot, :, query_position] = new_values
        gathered_keys = keys[self.key_slot, :, self.key_position].transpose(0, 1)[None]  # [1, Hkv, keys, D]
        gathered_values = values[self.key_slot, :, self.key_position].transpose(0, 1)[None]
        return gathered_keys, gathered_values

    def finish(self) -> None:
        """The slots' lengths after the step: one more key per row, each joiner's prompt."""
        for i in range(self.rows):
            self.slots.lengths[i] += 1
        for j, n in enumerate(self.joiner_lengths):
            self.slots.lengths[self.first_slot + j] = n


class _Run:
    """The shared state of one run: the clock, the arrival queue, the records and the token counters."""

    def __init__(self, model, requests: Sequence[Request], eos: frozenset[int], max_batch: int, timeout_s: float):
        self.model, self.eos, self.max_batch, self.timeout_s = model, eos, max_batch, timeout_s
        self.device = next(model.parameters()).device
        self.dtype = model.activation_dtype
        self.pending = deque(sorted(requests, key=lambda r: (r.arrival_s, r.request_id)))
        self.waiting: deque[Request] = deque()
        self.records = {r.request_id: RequestRecord(r.request_id, len(r.prompt_ids), r.max_new_tokens, r.arrival_s)
                        for r in requests}
        self.useful_tokens = self.decode_steps = self.decode_rows = self.mixed_steps = self.mixed_rows = 0
        self.held_steps = 0
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def admit(self) -> None:
        """Move every request whose arrival time has passed into the waiting queue."""
        now = self.now()
        while self.pending and self.pending[0].arrival_s <= now:
            self.waiting.append(self.pending.popleft())

    @property
    def next_arrival_s(self) -> float:
        return self.pending[0].arrival_s if self.pending else math.inf

    def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if math.isfinite(delay) and delay > 0:
            time.sleep(delay)
        self.admit()

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.waiting)

    def take(self, n: int) -> list[Request]:
        return [self.waiting.popleft() for _ in range(min(n, len(self.waiting)))]

    def emit(self, record: RequestRecord, token_id: int, t: float) -> bool:
        """Append a generated token; True when the request is done (EOS or its token budget)."""
        if not record.token_ids:
            record.first_token_s = t
        record.token_ids.append(token_id)
        if token_id in self.eos or len(record.token_ids) >= record.max_new_tokens:
            record.finish_reason = "eos" if token_id in self.eos else "length"
            record.last_token_s = t
            return True
        return False


def _sequential(run: _Run) -> None:
    decoder = Decoder(run.model, None, cache="static", eos_token_ids=run.eos)
    while run.busy:
        run.admit()
        if not run.waiting:
            run.sleep_until(run.next_arrival_s)
            continue
        request = run.waiting.popleft()
        record = run.records[request.request_id]
        record.start_s = run.now()
        generation = decoder.generate(list(request.prompt_ids), GenerationConfig(max_new_tokens=request.max_new_tokens))
        record.finish_s = run.now()
        record.completions += 1
        record.token_ids = generation.token_ids
        record.finish_reason = generation.finish_reason
        record.first_token_s = record.start_s + generation.token_times_s[0]
        record.last_token_s = record.start_s + generation.token_times_s[-1]
        run.useful_tokens += len(request.prompt_ids) + len(generation.token_ids) - 1
        run.decode_steps += len(generation.token_ids) - 1
        run.decode_rows += len(generation.token_ids) - 1


def padded_batch_inputs(prompts: Sequence[Sequence[int]], pad_token_id: int = 0, device="cpu"):
    """Left-padded tokens [B, P], per-row positions [B, P], prefill mask [B, 1, P, P] and pad counts [B].

    A real query sees the real keys up to itself; a pad query sees only itself (so its row of the softmax is
    never empty and no NaN appears; its output is never used)."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    pads = longest - lengths
    tokens = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
    columns = torch.arange(longest, device=device)
    positions = (columns[None] - pads[:, None]).clamp(min=0)
    real_key = columns[None] >= pads[:, None]  # [B, P]
    mask = causal_mask(longest, longest, device)[None] & real_key[:, None, :]
    mask = mask | torch.eye(longest, dtype=torch.bool, device=device)[None]
    return tokens, positions, mask[:, None], pads


def _run_padded_batch(run: _Run, batch: list[Request], pad_token_id: int) -> None:
    """Prefill a left-padded batch, then decode every row until the longest request is done."""
    model, device = run.model, run.device
    records = [run.records[r.request_id] for r in batch]
    start = run.now()
    for record in records:
        record.start_s = start
    tokens, positions, mask, pads = padded_batch_inputs([r.prompt_ids for r in batch], pad_token_id, device)
    rows, longest = tokens.shape
    lengths = torch.tensor([len(r.prompt_ids) for r in batch], device=device)
    steps = max(r.max_new_tokens for r in batch)
    cache = StaticCache(model.config, longest + steps, rows, run.dtype, device)
    real_key = torch.arange(longest + steps, device=device)[None] >= pads[:, None]  # [B, S]
    run.useful_tokens += int(lengths.sum())
    done = [False] * rows
    with torch.inference_mode():
        logits = model(tokens, positions, cache, mask, last_only=True)
        for step in range(steps):
            next_tokens = logits[:, -1].argmax(dim=-1)
            t = run.now()
            for i, token_id in enumerate(next_tokens.tolist()):
                if not done[i]:
                    done[i] = run.emit(records[i], token_id, t)
            if all(done):
                break
            run.useful_tokens += done.count(False)
            run.decode_steps += 1
            run.decode_rows += rows
            keys = longest + step + 1
            logits = model(next_tokens[:, None], (lengths + step)[:, None], cache,
                           real_key[:, None, None, :keys], last_only=True)
    end = run.now()
    for record in records:
        record.finish_s = end
        record.completions += 1


def _static(run: _Run, pad_token_id: int) -> None:
    free_s = 0.0
    while run.busy:
        run.admit()
        if not run.waiting:
            run.sleep_until(run.next_arrival_s)
            continue
        window_end = max(free_s, run.waiting[0].arrival_s) + run.timeout_s
        while len(run.waiting) < run.max_batch and run.now() < window_end:
            run.sleep_until(min(window_end, run.next_arrival_s))
        _run_padded_batch(run, run.take(run.max_batch), pad_token_id)
        free_s = run.now()


def _dynamic(run: _Run, pad_token_id: int) -> None:
    while run.busy:
        run.admit()
        if not run.waiting:
            run.sleep_until(run.next_arrival_s)
            continue
        deadline = run.waiting[0].arrival_s + run.timeout_s
        if len(run.waiting) >= run.max_batch or run.now() >= deadline:
            _run_padded_batch(run, run.take(run.max_batch), pad_token_id)
        else:
            run.sleep_until(min(deadline, run.next_arrival_s))


def _prefill_joiners(model, slots: SlotCache, first_slot: int, joiners: list[Request],
                     positions: torch.Tensor) -> list[int]:
    """Prefill joining prompts into slots first_slot, first_slot + 1, ...; their first (greedy) tokens."""
    if len(joiners) == 1:
        prompt = torch.tensor([joiners[0].prompt_ids], device=slots.device)
        logits = model(prompt, positions[:prompt.shape[1]], slots.prefill_view(first_slot), last_only=True)
        return [int(logits[0, -1].argmax())]
    return _mixed_step(model, slots, [], joiners, first_slot)[1]  # several: packed in one row


def _mixed_step(model, slots: SlotCache, last_tokens: list[int], joiners: list[Request],
                first_slot: int | None = None) -> tuple[list[int], list[int]]:
    """One packed forward for the rows' decode step (`last_tokens`: one per slot 0 .. R-1, may be empty) and the
    joiners' prefill into slots first_slot, first_slot + 1, ... (`_SlotMixedStep`); the rows' next tokens and
    the joiners' first tokens."""
    rows = len(last_tokens)
    view = _SlotMixedStep(slots, rows, [len(r.prompt_ids) for r in joiners], first_slot)
    tokens = torch.tensor([last_tokens + [t for r in joiners for t in r.prompt_ids]], device=slots.device)
    logits = model(tokens, view.positions, view, view.mask, logits_at=view.logits_at)
    view.finish()
    next_tokens = logits[0].argmax(dim=-1).tolist()
    return next_tokens[:rows], next_tokens[rows:]


def _continuous(run: _Run, max_length: int, mixed: bool = True, join_batch: int = 1, join_wait_steps: int = 8) -> None:
    """Iteration-level scheduling: every loop is one model call over the active rows and/or the joiners.

    join_batch > 1: while sequences run, queued requests join only when at least min(join_batch, queued) slots
    are free, so their prompts are prefilled together in one larger (cheaper per token) forward, but free slots
    are never held for more than `join_wait_steps` decode steps in a row (TGI's waiting_served_ratio and
    max_waiting_tokens, vLLM's scheduler_delay_factor)."""
    model, device = run.model, run.device
    slots = SlotCache(model.config, run.max_batch, max_length, run.dtype, device)
    positions = torch.arange(max_length, device=device)
    active: list[RequestRecord] = []  # active[i] lives in slot i
    last_tokens: list[int] = []
    held = 0  # consecutive decode steps with free slots held for a larger join
    with torch.inference_mode():
        while run.busy or active:
            run.admit()
            free = run.max_batch - len(active)
            if active and 0 < free < min(join_batch, len(run.waiting)) and held < join_wait_steps:
                joiners, held = [], held + 1
                run.held_steps += 1
            else:
                joiners = run.take(free)
                held = 0 if joiners else held
            if not joiners and not active:
                run.sleep_until(run.next_arrival_s)
                continue
            start = run.now()
            rows = len(active)
            if joiners and (not active or not mixed):  # prefill alone (before the rows' next decode step)
                first_tokens, next_tokens = _prefill_joiners(model, slots, rows, joiners, positions), None
            elif joiners:  # the rows' decode step rides on the joiners' prefill
                next_tokens, first_tokens = _mixed_step(model, slots, last_tokens, joiners)
                run.mixed_steps += 1
                run.mixed_rows += rows
            else:
                step_positions, mask = slots.begin_decode(rows)
                logits = model(torch.tensor(last_tokens, device=device)[:, None], step_positions, slots, mask,
                               last_only=True)
                slots.end_decode()
                run.decode_steps += 1
                run.decode_rows += rows
                next_tokens, first_tokens = logits[:, -1].argmax(dim=-1).tolist(), []
            t = run.now()
            finished = []
            if next_tokens is not None:
                run.useful_tokens += rows
                for i, token_id in enumerate(next_tokens):
                    last_tokens[i] = token_id
                    if run.emit(active[i], token_id, t):
                        active[i].finish_s = t
                        active[i].completions += 1
                        finished.append(i)
            for i, (request, token_id) in enumerate(zip(joiners, first_tokens)):
                record = run.records[request.request_id]
                record.start_s = start
                run.useful_tokens += len(request.prompt_ids)
                if run.emit(record, token_id, t):
                    record.finish_s = record.last_token_s
                    record.completions += 1
                    continue
                if rows + i != len(active):  # a joiner before it finished at once: close the gap
                    slots.move(rows + i, len(active))
                active.append(record)
                last_tokens.append(token_id)
            for i in reversed(finished):  # leave at once: the last active slot fills the hole
                last = len(active) - 1
                if i != last:
                    slots.move(last, i)
                    active[i], last_tokens[i] = active[last], last_tokens[last]
                active.pop()
                last_tokens.pop()


def run(scheduler: str, model, requests: Sequence[Request], max_batch: int = 8, timeout_ms: float = 50.0,
        eos_token_ids: Sequence[int] | None = None, tokenizer=None, pad_token_id: int = 0,
        mixed_steps: bool = True, join_batch: int = 1, join_wait_steps: int = 8) -> RunResult:
    """Serve `requests` (arriving at their `arrival_s`) with `scheduler`, greedy, and measure the run.

    eos_token_ids: as `Decoder` (None: the model's and the tokenizer's EOS). The static/dynamic batch size and
    the continuous slot count are `max_batch`; `timeout_ms` is the static window / dynamic oldest-wait limit.
    mixed_steps (continuous): joiners' prefill and the active rows' decode step in one forward (False: the
    prefill runs alone, then the decode step, as vLLM's original scheduler). join_batch / join_wait_steps
    (continuous): hold free slots until min(join_batch, queued) requests can join in one packed prefill, for at
    most join_wait_steps decode steps in a row (`_continuous`); 1 admits every request at the first free slot."""
    if scheduler not in SCHEDULERS:
        raise InvalidParameterError(f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    if max_batch < 1 or timeout_ms < 0:
        raise InvalidParameterError("need max_batch >= 1 and timeout_ms >= 0")
    if join_batch < 1 or join_wait_steps < 0:
        raise InvalidParameterError("need join_batch >= 1 and join_wait_steps >= 0")
    if not requests:
        raise InvalidParameterError("no requests to serve")
    if len({r.request_id for r in requests}) != len(requests):
        raise InvalidParameterError("request ids must be unique")
    context = model.config.max_position_embeddings
    for r in requests:
        if not r.prompt_ids or r.max_new_tokens < 1:
            raise InvalidParameterError(f"request {r.request_id}: empty prompt or max_new_tokens < 1")
        if len(r.prompt_ids) + r.max_new_tokens > context:
            raise ContextLengthError(f"request {r.request_id}: {len(r.prompt_ids)} prompt tokens + "
                                     f"{r.max_new_tokens} new tokens exceed the context of {context}")
    eos = Decoder(model, tokenizer, cache="static", eos_token_ids=eos_token_ids).eos_token_ids
    state = _Run(model, requests, eos, max_batch if scheduler != "sequential" else 1, timeout_ms / 1000)
    with ForwardMeter(model, state.device) as meter:
        state.t0 = time.perf_counter()
        if scheduler == "sequential":
            _sequential(state)
        elif scheduler == "static":
            _static(state, pad_token_id)
        elif scheduler == "dynamic":
            _dynamic(state, pad_token_id)
        else:
            _continuous(state, max(len(r.prompt_ids) + r.max_new_tokens for r in requests), mixed_steps,
                        join_batch, join_wait_steps)
        synchronize(state.device)
        wall_s = state.now()
    records = sorted(state.records.values(), key=lambda r: r.request_id)
    return RunResult(scheduler, state.max_batch, timeout_ms, records, wall_s, meter.seconds, meter.cpu_seconds,
                     meter.calls, meter.tokens, state.useful_tokens, state.decode_steps, state.decode_rows,
                     meter.prefill_seconds, state.mixed_steps, state.mixed_rows, state.held_steps)
