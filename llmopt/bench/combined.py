"""The optimizations stacked: one workload, every configuration measured in the same run.

A `Stack` switches each single-stream optimization on or off: KV cache, weight quantization, prompt (prefix)
caching, the fused attention kernel ("flash attention": PyTorch's SDPA instead of naive attention) and
speculative decoding (prompt lookup), and one step the document does not list: the fused decode step
(`llmopt.engine.fused_decode`, each decode step a single C call instead of the model's PyTorch operators). Request
batching changes throughput under concurrency rather than one request's speed, so it is measured as its own
multiplier on the stacked model (`batching_gain`).

The workload is the design document's prompt shape (system message + demonstrations + user question) whose user
part asks to repeat a passage of the evaluation text, so prefix caching and prompt lookup both have something
to find; the requests share the prefix and run one after the other, each generating a fixed number of greedy
tokens. With `StackRunner(shared_prefix=...)` the prompt-caching stacks start each workload run with that prefix
already cached, as a server does once earlier users have sent it (`shared_prefix`); without it each run starts
from an empty prefix cache and only the later requests hit.
"""
from __future__ import annotations

import copy
import functools
import statistics
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pandas as pd
import torch

from ..engine import fused_decode, quantization
from ..engine import quantized_variants as qv
from ..engine.generate import Decoder, Generation, GenerationConfig
from ..engine.prefix_cache import PrefixCache, model_fingerprint
from ..engine.speculative import PromptLookupDrafter, SpeculativeDecoder
from ..errors import InvalidParameterError
from ..paths import cache_dir
from . import benchmark, peers
from .datasets import evaluation_text
from .harness import call_columns, light_rounds, paired_interval, spread
from .prefix_workload import scenario
from .rounds import run_rounds

WARMUP_TOKENS = 4  # tokens per warm-up run of `measure`
DOCUMENT_ORDER = ("kv_cache", "quantization", "prompt_caching", "flash_attention", "speculative_decoding")
EXTENSIONS = ("fused_decode",)  # measured after the document's list: not one of its six
REQUIRES_KV_CACHE = ("prompt_caching", "speculative_decoding", "fused_decode")
LABELS = {"kv_cache": "+ KV cache", "quantization": "+ quantization", "prompt_caching": "+ prompt caching",
          "flash_attention": "+ flash attention (SDPA)", "speculative_decoding": "+ speculative (prompt lookup)",
          "fused_decode": "+ fused decode step (not in the document)"}
MODULES = {"kv_cache": ["kv_cache.py"], "batching": ["batching.py"],
           "quantization": ["quantization.py", "quantized_weight.py", "gptq.py", "gptq_format.py"],
           "prompt_caching": ["prefix_cache.py"],
           "flash_attention": ["attention.py"], "speculative_decoding": ["speculative.py"],
           "fused_decode": ["fused_decode.py", "csrc/decode_step.c"]}


@dataclass(frozen=True)
class Stack:
    kv_cache: bool = False
    quantization: bool = False
    prompt_caching: bool = False
    flash_attention: bool = False
    speculative_decoding: bool = False
    fused_decode: bool = False

    def __post_init__(self):
        needs = [n for n in REQUIRES_KV_CACHE if getattr(self, n)]
        if needs and not self.kv_cache:
            raise InvalidParameterError(f"{', '.join(needs)} need the KV cache in the stack")

    def plus(self, name: str) -> "Stack":
        return replace(self, **{name: True})

    @property
    def lossless(self) -> bool:
        return not self.quantization

    @property
    def label(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return "baseline" if not on else " + ".join(on)


def workload_prompts(tokenizer, requests: int = 3, passage_tokens: int = 96, system_tokens: int = 50,
                     demonstration_tokens: int = 200) -> list[list[int]]:
    """`requests` prompts sharing the document scenario's prefix (50 + 200 tokens by default); each user part
    quotes a different passage of the held-out text and asks for it to be repeated."""
    text_ids = tokenizer(evaluation_text("heldout")).input_ids
    prompts = []
    for i in range(requests):
        shared = scenario(tokenizer, tenant=0, user=i, system_tokens=system_tokens,
                          demonstration_tokens=demonstration_tokens)
        passage = text_ids[4000 + i * 997: 4000 + i * 997 + passage_tokens]
        ask = tokenizer(" Repeat this passage exactly:\n", add_special_tokens=False).input_ids
        prompts.append(shared.prefix_ids + shared.user_ids + ask + passage
                       + tokenizer("\nRepeated:\n", add_special_tokens=False).input_ids + passage[:8])
    return prompts


def shared_prefix(tokenizer, system_tokens: int = 50, demonstration_tokens: int = 200) -> list[int]:
    """The prefix every prompt of `workload_prompts` shares: the scenario's system message and demonstrations."""
    return list(scenario(tokenizer, tenant=0, user=0, system_tokens=system_tokens,
                         demonstration_tokens=demonstration_tokens).prefix_ids)


class StackRunner:
    """Builds each configuration's decoder from one base model (a quantized copy made once) and runs the workload.

    `shared_prefix`: token ids whose KV the prompt-caching stacks hold when a workload run starts (a server whose
    earlier users sent the same system prompt); computed once per stack by `prepare` (or on first use), outside
    the timed runs, and copied into each run's fresh prefix cache, so a run never reuses its own earlier prompts."""
    def __init__(self, model, tokenizer, quantize=None, k: int = 8, prefix_cache_bytes: int = 256 * 2**20,
                 shared_prefix: list[int] | None = None):
        self.model, self.tokenizer, self.k, self.prefix_cache_bytes = model, tokenizer, k, prefix_cache_bytes
        self.quantize = quantize  # function model -> model (in place), used on a deep copy
        self.shared_prefix = list(shared_prefix) if shared_prefix else None
        self._quantized = None
        self._warm: dict[Stack, tuple] = {}  # stack -> (tokens, keys, values, fingerprint) of the shared prefix
        self.quantize_s = float("nan")

    def model_for(self, stack: Stack):
        if not stack.quantization:
            return self.model
        if self._quantized is None:
            start = time.perf_counter()
            self._quantized = self.quantize(copy.deepcopy(self.model))
            self.quantize_s = time.perf_counter() - start
        return self._quantized

    def _build(self, stack: Stack, prefix: PrefixCache | None) -> Decoder:
        model = self.model_for(stack)
        model.set_attention("sdpa" if stack.flash_attention else "naive")
        engine = "fused" if stack.fused_decode else "pytorch"
        if stack.speculative_decoding:
            return SpeculativeDecoder(model, self.tokenizer, drafter=PromptLookupDrafter(), k=self.k,
                                      cache="static", prefix_cache=prefix, engine=engine)
        return Decoder(model, self.tokenizer, cache="static" if stack.kv_cache else "none", prefix_cache=prefix,
                       engine=engine)

    def _warm_prefix(self, stack: Stack) -> tuple:
        """The shared prefix's KV as this stack's decoder computes it (one prefill, kept for every later run)."""
        if stack not in self._warm:
            cache = PrefixCache(self.prefix_cache_bytes)
            decoder = self._build(stack, cache)
            decoder.generate(self.shared_prefix, GenerationConfig(max_new_tokens=1, ignore_eos=True))
            fingerprint = model_fingerprint(decoder.model)
            hit = cache.lookup(self.shared_prefix, fingerprint)
            self._warm[stack] = (self.shared_prefix, hit.keys, hit.values, fingerprint)
        return self._warm[stack]

    def prepare(self, stacks) -> None:
        """Make, before any timing, what the stacks need once: the quantized copy and the warm shared prefix."""
        for stack in stacks:
            self.model_for(stack)
            if stack.prompt_caching and self.shared_prefix:
                self._warm_prefix(stack)

    def decoder(self, stack: Stack) -> Decoder:
        """A fresh decoder for one workload run: its prefix cache (prompt caching) empty, or holding only the
        shared prefix when the runner has one."""
        prefix = None
        if stack.prompt_caching:
            prefix = PrefixCache(self.prefix_cache_bytes)
            if self.shared_prefix:
                prefix.insert(*self._warm_prefix(stack))
        return self._build(stack, prefix)

    def run(self, stack: Stack, prompts: list[list[int]], new_tokens: int) -> list[Generation]:
        decoder = self.decoder(stack)
        config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        return [decoder.generate(p, config) for p in prompts]


def summarize_run(name: str, runs: list[tuple[list[Generation], float]], new_tokens: int) -> dict:
    """Median and spread over rounds of one configuration's workload runs."""
    walls = [wall for _, wall in runs]
    ttfts = [statistics.mean(g.time_to_first_token_s for g in gens) for gens, _ in runs]
    decode = [statistics.mean(g.decode_tokens_per_s for g in gens) for gens, _ in runs]
    gens = runs[0][0]
    return {"configuration": name, "requests": len(gens), "new_tokens": new_tokens, "repeats": len(runs),
            "workload_s": statistics.median(walls), "workload_s_spread": spread(walls),
            "time_to_first_token_s": statistics.median(ttfts), "time_to_first_token_s_spread": spread(ttfts),
            "decode_tokens_per_s": statistics.median(decode), "decode_tokens_per_s_spread": spread(decode),
            "token_ids": [g.token_ids for g in gens]}


def _workload_metrics(generations: list[Generation]) -> dict:
    return {"time_to_first_token_s": statistics.mean(g.time_to_first_token_s for g in generations),
            "decode_tokens_per_s": statistics.mean(g.decode_tokens_per_s for g in generations)}


def measure(configurations: dict[str, object], prompts: list[list[int]], new_tokens: int, repeats: int = 2,
            warmup: int = 1, progress: bool = True) -> pd.DataFrame:
    """Time each configuration's whole workload in paired rounds (`rounds.run_rounds`, shuffled order per round).

    A configuration is a function `(prompts, new_tokens) -> list[Generation]`. `warmup` untimed warm-up rounds
    run the first prompt for a few tokens (every code path and buffer, without paying a whole slow baseline
    workload); then `repeats` rounds time every configuration's workload once each. Rows: medians and spreads,
    CPU/wall ratio and `contended`; `frame.attrs["rounds"]`: the per-round values (workload wall_s,
    time_to_first_token_s, decode_tokens_per_s per call), which `cumulative` pairs for its speedups' intervals."""
    for _ in range(warmup):
        for run in configurations.values():
            run(prompts[:1], min(new_tokens, WARMUP_TOKENS))
    arms = {name: functools.partial(run, prompts, new_tokens) for name, run in configurations.items()}
    timed = run_rounds(arms, rounds=repeats, warmup=0, progress="stacked configurations" if progress else None,
                       metrics=_workload_metrics)
    calls = timed.frame
    rows = []
    for name in configurations:
        mine = calls[calls["arm"] == name].sort_values("round")
        runs = list(zip(timed.results(name), mine["wall_s"]))
        rows.append({**summarize_run(name, runs, new_tokens), **call_columns(mine)})
    frame = pd.DataFrame(rows)
    frame.attrs["rounds"] = light_rounds(timed)
    return frame


def paired_rounds(rounds, name: str, numerator: str, denominator: str, metric: str = "wall_s") -> dict:
    """Interval columns (`harness.paired_interval`) of metric(numerator) / metric(denominator) from the first of
    `rounds` (one `rounds.Rounds` or a list of them, e.g. two `measure` runs) that holds both arms; NaN columns
    where none does: arms of different runs ran minutes apart and are never paired."""
    for timed in rounds if isinstance(rounds, (list, tuple)) else [rounds]:
        if timed is not None and {numerator, denominator} <= set(timed.arms) and metric in timed.frame.columns:
            return paired_interval(name, timed.values(numerator, metric), timed.values(denominator, metric))
    return paired_interval(name, [], [])


def cumulative(frame: pd.DataFrame, order: list[str], baseline: str = "baseline", rounds=None) -> pd.DataFrame:
    """Waterfall table: each step's workload time, its gain over the previous step and over the baseline.

    step_speedup and cumulative_speedup are ratios of medians; with `measure`'s rounds (`rounds`, default
    `frame.attrs["rounds"]`; a list for a frame of several runs), each ratio whose two arms ran in the same rounds
    also gets its paired-round geometric mean and 95% interval (`_geomean`, `_low`, `_high`, `_rounds`)."""
    rounds = frame.attrs.get("rounds") if rounds is None else rounds
    table = frame.set_index("configuration")
    rows, previous = [], table.loc[baseline, "workload_s"]
    base, before = previous, baseline
    for name in [baseline] + order:
        t = table.loc[name, "workload_s"]
        rows.append({"step": name, "workload_s": t, "step_speedup": previous / t, "cumulative_speedup": base / t,
                     "decode_tokens_per_s": table.loc[name, "decode_tokens_per_s"],
                     "time_to_first_token_s": table.loc[name, "time_to_first_token_s"],
                     **paired_rounds(rounds, "step_speedup", before, name),
                     **paired_rounds(rounds, "cumulative_speedup", baseline, name)})
        previous, before = t, name
    return pd.DataFrame(rows)


def best_order(step_gains: dict[str, float]) -> list[str]:
    """Optimizations by measured gain, largest first; the KV cache keeps its own rank, and those that need it and
    gained more move to just after it (not the cache forward to them: that would put a smaller gain first)."""
    order = sorted(step_gains, key=lambda n: -step_gains[n])
    if "kv_cache" in order:
        at = order.index("kv_cache")
        early = [n for n in order[:at] if n in REQUIRES_KV_CACHE]
        order = [n for n in order[:at] if n not in REQUIRES_KV_CACHE] + ["kv_cache"] + early + order[at + 1:]
    return order


def stacks_in_order(order: list[str]) -> dict[str, Stack]:
    """`baseline`, then one configuration per step with every earlier optimization switched on."""
    stacks, stack = {"baseline": Stack()}, Stack()
    for name in order:
        stack = stack.plus(name)
        stacks[stack.label] = stack
    return stacks


def module_lines(name: str, package_dir: Path | None = None) -> int:
    """Non-blank, non-comment lines of the engine modules that implement optimization `name` (a complexity
    measure)."""
    package_dir = package_dir or Path(__file__).parent.parent / "engine"
    total = 0
    for module in MODULES[name]:
        total += sum(1 for line in (package_dir / module).read_text().splitlines()
                     if line.strip() and not line.strip().startswith(("#", "/*", "*", "//")))
    return total


def tokens_agree(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of generated positions where two runs' greedy tokens agree (1.0 = identical)."""
    same = total = 0
    for x, y in zip(a, b):
        total += max(len(x), len(y))
        same += sum(1 for i, j in zip(x, y) if i == j)
    return same / total if total else float("nan")


FORMAT_PAIRS = (("bf16 weights", "F16"), ("INT8", "Q8_0"), ("INT4 g64", "Q4_1"))  # (ours, llama.cpp's), like bytes


def our_format(model, kind: str):
    """A copy of `model` in one of our formats of `FORMAT_PAIRS` (made as notebook 03's rows are), on the fused
    attention kernel. 16-bit weights compute with fp32 activations, as llama.cpp runs F16. INT4 keeps the (tied)
    lm_head at 8 bits, as llama.cpp's 4-bit files keep their output matrix above 4 bits."""
    if kind == "bf16 weights":
        variant = qv.dense_weights(model, kind, torch.bfloat16)
    elif kind == "INT8":
        variant = qv.quantized(model, kind, "rtn", bits=8)
    elif kind == "INT4 g64":  # g64, or the largest group the int4 kernels take that divides every width
        group = quantization.group_size_for(model, 64)
        variant = qv.quantized(model, kind, "rtn", bits=4, group_size=group or 64, lm_head_bits=8)
    else:
        raise InvalidParameterError(f"unknown format {kind!r}; use one of {[ours for ours, _ in FORMAT_PAIRS]}")
    if variant.skipped:
        raise InvalidParameterError(f"{kind}: {variant.skipped}")
    return variant.model.set_attention("sdpa")


def format_engines(model, tokenizer, gguf_path=None, threads: int = 2, directory=None, engine: str = "fused") -> dict:
    """Benchmark engines, format by format: ours (static cache, SDPA, on `engine` where it takes the model, see
    `llmopt.engine.fused_decode`) and, when `gguf_path` is given, llama.cpp
    on the same weights re-encoded by its own quantizer (the Q4_1 row is the shipped file itself), the re-encoded
    files cached in `directory` (default: the model cache's gguf/)."""
    directory = directory or cache_dir() / "gguf"
    engines = {}
    for ours, theirs in FORMAT_PAIRS:
        mine = our_format(model, ours)
        engines[f"llmopt {ours}"] = benchmark.ours(Decoder(mine, tokenizer, cache="static",
                                                           engine=fused_decode.engine_for(mine, engine)))
        if gguf_path is not None:
            engines[f"llama.cpp {theirs}"] = peers.llama_cpp_engine(
                peers.llama_cpp_format(gguf_path, theirs, directory), threads)
    return engines


def format_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per format pair: decode and prefill tokens/s of each side and ours / llama.cpp, the decode ratio with
    its paired-round interval (`decode_ours_over_llama_cpp_geomean`, `_low`, `_high`, `_rounds`) where `rows`
    carries `benchmark.compare`'s rounds."""
    table = rows.set_index("engine")

    def prefill(name):
        return table.loc[name, "prompt_tokens"] / table.loc[name, "time_to_first_token_s"]

    out = []
    for ours, theirs in FORMAT_PAIRS:
        mine, other = f"llmopt {ours}", f"llama.cpp {theirs}"
        if mine not in table.index:
            continue
        row = {"ours": ours, "llama.cpp": theirs, "ours_decode_tokens_per_s": table.loc[mine, "decode_tokens_per_s"],
               "ours_prefill_tokens_per_s": prefill(mine)}
        if other in table.index:
            row["llama_cpp_decode_tokens_per_s"] = table.loc[other, "decode_tokens_per_s"]
            row["llama_cpp_prefill_tokens_per_s"] = prefill(other)
            row["decode_ours_over_llama_cpp"] = row["ours_decode_tokens_per_s"] / row["llama_cpp_decode_tokens_per_s"]
            paired = benchmark.paired(rows, "decode_tokens_per_s", mine, other, int(table.loc[mine, "prompt_tokens"]))
            row.update({f"decode_ours_over_llama_cpp_{key.rsplit('_', 1)[1]}": value for key, value in paired.items()})
            row["prefill_ours_over_llama_cpp"] = (row["ours_prefill_tokens_per_s"]
                                                  / row["llama_cpp_prefill_tokens_per_s"])
        out.append(row)
    return pd.DataFrame(out)
