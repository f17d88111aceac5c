"""Workloads and benchmarks for prompt caching: the design document's scenario and a multi-tenant replay.

- `scenario`: section 4's example, a system message (50 tokens) + 5 demonstrations (200 tokens) + a user
  prompt (20 tokens), built from `data/` (questions from `prompts.jsonl`, answers from the Python Language
  Reference text) and cut to exact token counts. Tenants get different system messages and demonstrations.
- `cold_vs_warm`: per shared-prefix length, paired rounds of three engines on one prompt shape: no prefix
  cache, a cold prefix cache (a miss, then the prompt is stored) and a warm one (another user's prompt after the
  same prefix: a hit on the prefix). Same run, same prompt lengths; `summarize`: medians, spreads, and ratios
  with their paired-round intervals.
- `multi_tenant`: several tenants (system prompt + demonstrations), many users, tenant popularity Zipf-like;
  requests replayed through one decoder with a byte-limited, TTL-bounded cache on a simulated clock (arrivals
  are simulated, latencies are measured); per-request hit, tokens processed, cache bytes and hit rate.
"""
from __future__ import annotations

import functools
import random
import statistics
from dataclasses import dataclass

import pandas as pd

from ..engine.generate import Decoder, GenerationConfig
from ..engine.kv_cache import kv_bytes_per_token
from ..engine.prefix_cache import PrefixCache
from ..errors import InvalidParameterError
from . import datasets, harness
from .harness import paired_interval, spread
from .rounds import run_rounds
from .stats import estimate_verdict, interval_from_columns

ROLES = ["a careful Python tutor", "a support agent for a software company", "a code reviewer",
         "a technical writer", "a teaching assistant for a programming course", "a documentation search bot",
         "an interviewer for Python developers", "a friendly study buddy"]


def exact_tokens(tokenizer, text: str, length: int) -> list[int]:
    """The first `length` token ids of `text` (repeated if it is too short)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError("empty text")
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


@functools.lru_cache(maxsize=1)
def _answers() -> tuple[str, ...]:
    paragraphs = [p.strip() for p in datasets.evaluation_text("heldout").split("\n\n")]
    return tuple(" ".join(p.split()) for p in paragraphs if len(p) > 200 and not p.startswith(("*", "=")))


@functools.lru_cache(maxsize=1)
def _questions() -> tuple[str, ...]:
    return tuple(r["text"] for r in datasets.prompts())


@dataclass
class Scenario:
    system_ids: list[int]
    demonstration_ids: list[int]
    user_ids: list[int]

    @property
    def prefix_ids(self) -> list[int]:
        return self.system_ids + self.demonstration_ids

    @property
    def prompt_ids(self) -> list[int]:
        return self.prefix_ids + self.user_ids


def scenario(tokenizer, tenant: int = 0, user: int = 0, system_tokens: int = 50, demonstration_tokens: int = 200,
             demonstrations: int = 5, user_tokens: int = 20) -> Scenario:
    """The document's prompt shape for one tenant and one user, with exact token counts."""
    questions, answers = _questions(), _answers()
    role = ROLES[tenant % len(ROLES)]
    system = exact_tokens(tokenizer, (
        f"System: You are {role} (desk {tenant}). Answer every question in one or two precise sentences, quote "
        "the Python Language Reference where it helps, and say plainly when you do not know. Follow the style "
        "of the examples below. "), system_tokens)
    demos: list[int] = []
    each = demonstration_tokens // demonstrations if demonstrations else 0
    for i in range(demonstrations):
        k = tenant * demonstrations + i
        length = each + (demonstration_tokens - each * demonstrations if i == demonstrations - 1 else 0)
        demos += exact_tokens(tokenizer, f"\nExample {i + 1}. Question: {questions[k % len(questions)]} "
                                         f"Answer: {answers[(7 * k) % len(answers)]}", length)
    cue = tokenizer("\nQuestion:", add_special_tokens=False).input_ids[:len(demos)]
    if cue:  # the demonstrations end by cueing the user's question (same length)
        demos[-len(cue):] = cue
    user_text = f" {questions[(user * 5 + tenant) % len(questions)]} (asked by user {user})"
    return Scenario(system, demos, exact_tokens(tokenizer, user_text, user_tokens))


def _time_generation(decoder: Decoder, prompt_ids: list[int], new_tokens: int):
    """(generation, wall seconds, CPU/wall ratio, contended) of one request: `harness.measure`, once, no warm-up."""
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    timing = harness.measure(lambda: decoder.generate(prompt_ids, config), repeats=1, warmup=0)
    return timing.results[0], timing.wall_s[0], timing.cpu_wall_ratio, timing.contended


def _prompt_pairs(tokenizer, prefix_length: int, count: int) -> list[tuple[Scenario, Scenario]]:
    """`count` pairs of prompts sharing a `prefix_length`-token prefix, the two user prompts of a pair starting
    with different tokens (so a warm hit covers exactly the shared prefix)."""
    shape = dict(system_tokens=min(50, prefix_length), demonstration_tokens=max(0, prefix_length - 50),
                 demonstrations=5 if prefix_length > 50 else 0)
    pairs, user = [], 0
    while len(pairs) < count:
        a = scenario(tokenizer, user=user, **shape)
        user += 1
        b = scenario(tokenizer, user=user, **shape)
        while b.user_ids[0] == a.user_ids[0]:
            user += 1
            b = scenario(tokenizer, user=user, **shape)
        user += 1
        pairs.append((a, b))
    return pairs


ENGINES = ("no prefix cache", "cold (miss)", "warm (hit)")


def cold_vs_warm(model, tokenizer, prefix_lengths: list[int], new_tokens: int = 8, repeats: int = 3,
                 warmup: int = 1, max_bytes: int = 2**31) -> pd.DataFrame:
    """Per prefix length and round: no prefix cache, cold prefix cache (miss), warm prefix cache (hit).

    Each round takes two prompts with the same prefix and different 20-token user prompts, A and B. A fresh
    prefix cache runs A (cold: a miss, then A is stored); a prefix cache that already holds A (filled untimed
    before the rounds: the state the cold run leaves) runs B (warm: a hit on the prefix); the plain decoder runs
    B, so its tokens are the reference for the warm run. `warmup` untimed rounds run first, at the first prefix
    length (cold, then warm on the same cache). Then `repeats` rounds (`rounds.run_rounds`) run every (prefix
    length, engine) once each in a shuffled order, so the host's drift hits every condition alike and a round's
    ratios cancel it. One row per (engine, prefix length, repeat = round): TTFT, end-to-end seconds (the timed
    call), tokens processed, the generated ids, the call's CPU/wall ratio and `contended`, and its position in
    the round's order."""
    plain = Decoder(model, tokenizer, cache="static")
    first = prefix_lengths[0]
    first_pairs = _prompt_pairs(tokenizer, first, warmup + repeats)  # the warm-up rounds, then the timed ones
    timed_pairs = {length: first_pairs[warmup:] if length == first else _prompt_pairs(tokenizer, length, repeats)
                   for length in prefix_lengths}
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    for a, b in first_pairs[:warmup]:
        cached = Decoder(model, tokenizer, cache="static", prefix_cache=PrefixCache(max_bytes))
        for decoder, prompt in ((plain, b), (cached, a), (cached, b)):
            decoder.generate(prompt.prompt_ids, config)

    def fresh() -> Decoder:
        return Decoder(model, tokenizer, cache="static", prefix_cache=PrefixCache(max_bytes))

    def holding(prompt: Scenario) -> Decoder:  # untimed: the cache a cold run of `prompt` leaves
        decoder = fresh()
        decoder.generate(prompt.prompt_ids, GenerationConfig(max_new_tokens=1, ignore_eos=True))
        return decoder

    # per arm, one (decoder, prompt) per round, taken in round order (each arm is called once per round)
    queues: dict[str, list[tuple[Decoder, Scenario]]] = {}
    keys: dict[str, tuple[str, int]] = {}
    for length in prefix_lengths:
        pairs = timed_pairs[length]
        for engine, queue in ((ENGINES[0], [(plain, b) for _, b in pairs]),
                              (ENGINES[1], [(fresh(), a) for a, _ in pairs]),
                              (ENGINES[2], [(holding(a), b) for a, b in pairs])):
            queues[f"{engine} @ {length}"] = queue
            keys[f"{engine} @ {length}"] = (engine, length)

    def arm(name: str):
        def call():
            decoder, prompt = queues[name].pop(0)  # dropped after the call: the caches' memory goes with it
            return decoder.generate(prompt.prompt_ids, config)
        return call

    timed = run_rounds({name: arm(name) for name in queues}, rounds=repeats, warmup=0)
    calls = timed.frame.set_index(["arm", "round"])
    results = {name: timed.results(name) for name in queues}
    rows = []
    for repeat in range(repeats):
        for length in prefix_lengths:
            a, b = timed_pairs[length][repeat]
            for engine in ENGINES:
                name = f"{engine} @ {length}"
                result, call = results[name][repeat], calls.loc[(name, repeat)]
                prompt = a.prompt_ids if engine == ENGINES[1] else b.prompt_ids
                rows.append({"engine": engine, "prefix_tokens": length, "repeat": repeat,
                             "prompt_tokens": len(prompt), "cached_tokens": result.prefix_cached_tokens,
                             "processed_tokens": len(prompt) - result.prefix_cached_tokens,
                             "new_tokens": new_tokens, "time_to_first_token_s": result.time_to_first_token_s,
                             "end_to_end_s": call["wall_s"], "token_ids": result.token_ids,
                             "position": int(call["position"]), "cpu_wall_ratio": call["cpu_wall_ratio"],
                             "contended": bool(call["contended"])})
    return pd.DataFrame(rows)


def _paired_by_repeat(frame: pd.DataFrame, name: str, metric: str, engine: str, baseline: str,
                      prefix: int) -> dict:
    """Interval columns of metric(engine) / metric(baseline) at one prefix length, paired by repeat (round)."""
    at = frame[frame.prefix_tokens == prefix]
    num = at[at.engine == engine].groupby("repeat")[metric].median()
    den = at[at.engine == baseline].groupby("repeat")[metric].median()
    common = num.index.intersection(den.index)
    return paired_interval(name, num[common], den[common])


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Median and spread per (engine, prefix length), and ratios to the no-cache engine in the same run.

    Each ratio column (`time_to_first_token_s / no cache`, `end_to_end_s / no cache`: ratios of medians; and
    `time_to_first_token_s / cold`) gets its paired-round geometric mean with a 95% interval: the columns
    `<ratio>_geomean`, `<ratio>_low`, `<ratio>_high`, `<ratio>_rounds` (rounds paired by `repeat`). Frames
    from `cold_vs_warm` also give each row's CPU/wall ratio (median over its calls) and `contended` (any call)."""
    rows = []
    for (engine, prefix), group in frame.groupby(["engine", "prefix_tokens"], sort=False):
        row = {"engine": engine, "prefix_tokens": prefix, "prompt_tokens": int(group.prompt_tokens.median()),
               "processed_tokens": int(group.processed_tokens.median()), "repeats": len(group)}
        for metric in ("time_to_first_token_s", "end_to_end_s"):
            row[metric] = statistics.median(group[metric])
            row[f"{metric}_spread"] = spread(list(group[metric]))
        if "cpu_wall_ratio" in group:
            row["cpu_wall_ratio"] = float(group.cpu_wall_ratio.median())
        if "contended" in group:
            row["contended"] = bool(group.contended.astype(bool).any())
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table[table.engine == "no prefix cache"].set_index("prefix_tokens")
    cold = table[table.engine == "cold (miss)"].set_index("prefix_tokens")
    for metric in ("time_to_first_token_s", "end_to_end_s"):
        table[f"{metric} / no cache"] = table[metric] / table.prefix_tokens.map(base[metric])
    table["time_to_first_token_s / cold"] = table.time_to_first_token_s / table.prefix_tokens.map(
        cold.time_to_first_token_s)
    intervals = []
    for engine, prefix in zip(table.engine, table.prefix_tokens):
        columns = {}
        for metric in ("time_to_first_token_s", "end_to_end_s"):
            columns.update(_paired_by_repeat(frame, f"{metric} / no cache", metric, engine, "no prefix cache",
                                             prefix))
        columns.update(_paired_by_repeat(frame, "time_to_first_token_s / cold", "time_to_first_token_s", engine,
                                         "cold (miss)", prefix))
        intervals.append(columns)
    return pd.concat([table, pd.DataFrame(intervals, index=table.index)], axis=1)


def equivalence(frame: pd.DataFrame) -> pd.DataFrame:
    """Per prefix length: are the warm (hit) tokens equal to the plain decoder's on the same prompt, every repeat?"""
    runs = frame.set_index(["prefix_tokens", "repeat", "engine"]).token_ids.unstack("engine")
    same = runs.apply(lambda row: row["warm (hit)"] == row["no prefix cache"], axis=1)
    return same.groupby(level="prefix_tokens").all().rename("warm tokens identical to no-cache").to_frame()


def versus_document(table: pd.DataFrame, prefix_tokens: int = 250) -> pd.DataFrame:
    """The document's prompt-caching estimates beside the measured values (scenario prefix), with verdicts."""
    at = table[table.prefix_tokens == prefix_tokens].set_index("engine")
    ratio = "end_to_end_s / no cache"  # timed: paired-round interval, lower is better
    timed = {"cached prefix (hit)": at.loc["warm (hit)"], "cache miss": at.loc["cold (miss)"]}
    counted = {  # processed token counts are deterministic: a point verdict (`datasets.verdict`) is right
        "scenario without caching (50 system + 200 demonstrations + 20 user)":
            (at.loc["no prefix cache", "processed_tokens"], False),
        "scenario with caching": (at.loc["warm (hit)", "processed_tokens"], False),
        "scenario": (at.loc["no prefix cache", "processed_tokens"] / at.loc["warm (hit)", "processed_tokens"],
                     True),
    }
    rows = []
    for _, estimate in datasets.estimates("prompt_caching").iterrows():
        if estimate.condition in timed:
            interval = interval_from_columns(timed[estimate.condition], ratio)
            value = interval.estimate
            verdict = estimate_verdict(interval, estimate.low, estimate.high, higher_is_better=False)
        else:
            value, higher_is_better = counted[estimate.condition]
            verdict = datasets.verdict(value, estimate.low, estimate.high, higher_is_better)
        rows.append({"metric": estimate.metric, "condition": estimate.condition, "unit": estimate.unit,
                     "estimate (document)": estimate.document_text, "low": estimate.low, "high": estimate.high,
                     "measured": value, "verdict": verdict})
    return pd.DataFrame(rows)


class SimulatedClock:
    """A clock the replay advances by simulated inter-arrival times (so TTL is deterministic)."""

    def __init__(self):
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def multi_tenant(model, tokenizer, requests: int = 60, tenants: int = 6, users: int = 40, zipf_s: float = 1.2,
                 max_bytes: int | None = None, ttl_s: float = 30.0, mean_interarrival_s: float = 1.0,
                 new_tokens: int = 1, seed: int = 0, prefix_cache: PrefixCache | None = None) -> pd.DataFrame:
    """Replay a multi-tenant workload through one decoder and prefix cache; one row per request.

    Tenant popularity ~ 1 / rank^zipf_s; each request is the tenant's prefix (250 tokens) + a random user's
    prompt (20). `prefix_hit`: the whole tenant prefix came from the cache; `any_reuse`: at least one token did
    (tenants' system messages share their first words), which is what the cache's own hit counter counts.
    Default memory limit: the KV of three full scenario prompts (so the long tail of tenants gets evicted)."""
    if max_bytes is not None and max_bytes <= 0:  # no cache at all is not a limit: refused, not defaulted
        raise InvalidParameterError(f"max_bytes must be > 0 (or None: three scenario prompts' KV), got {max_bytes}")
    rng = random.Random(seed)
    if prefix_cache is None:
        per_prompt = 270 * kv_bytes_per_token(model.config, model.activation_dtype)
        clock = SimulatedClock()
        prefix_cache = PrefixCache(3 * per_prompt if max_bytes is None else max_bytes, ttl_s, clock)
    clock = prefix_cache.clock
    decoder = Decoder(model, tokenizer, cache="static", prefix_cache=prefix_cache)
    weights = [1 / (rank + 1) ** zipf_s for rank in range(tenants)]
    prompts: dict[tuple[int, int], list[int]] = {}
    rows = []
    for i in range(requests):
        if isinstance(clock, SimulatedClock):
            clock.now_s += rng.expovariate(1 / mean_interarrival_s)
        tenant, user = rng.choices(range(tenants), weights)[0], rng.randrange(users)
        if (tenant, user) not in prompts:
            prompts[(tenant, user)] = scenario(tokenizer, tenant, user).prompt_ids
        prompt = prompts[(tenant, user)]
        prefix_length = len(prompt) - 20
        result, wall_s, cpu_wall_ratio, busy = _time_generation(decoder, prompt, new_tokens)
        stats = prefix_cache.stats()
        rows.append({"request": i, "arrival_s": clock(), "tenant": tenant, "user": user,
                     "prompt_tokens": len(prompt), "cached_tokens": result.prefix_cached_tokens,
                     "processed_tokens": len(prompt) - result.prefix_cached_tokens,
                     "prefix_hit": result.prefix_cached_tokens >= prefix_length,
                     "any_reuse": result.prefix_cached_tokens > 0,
                     "time_to_first_token_s": result.time_to_first_token_s,
                     "end_to_end_s": wall_s, "cache_bytes": stats["used_bytes"], "max_bytes": stats["max_bytes"],
                     "cache_tokens": stats["cached_tokens"], "cache_hit_rate_so_far": stats["hit_rate"],
                     "evicted_tokens": stats["evicted_tokens"], "expired_tokens": stats["expired_tokens"],
                     "cpu_wall_ratio": cpu_wall_ratio, "contended": busy})
    return pd.DataFrame(rows)

