"""Generation benchmarks shared by the notebooks: engines timed in paired rounds in one run, tidy rows out.

An *engine* is a function `(prompt_ids, new_tokens) -> Generation`. Engines run in rounds (`rounds.run_rounds`:
every engine at every prompt length once per round, in a shuffled order) so slow drifts of a shared machine hit
all of them alike; ratios are computed from medians measured in the same run, and with an interval from the
rounds' paired ratios (`ratio_intervals`).
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import pandas as pd
import torch

from ..engine import agreement, cpu_kernels
from ..engine.generate import Decoder, Generation, GenerationConfig
from ..engine.loading import resolve_dtype
from ..hardware import contended
from .datasets import evaluation_text
from .harness import light_rounds, paired_interval, spread
from .rounds import run_rounds

Engine = Callable[[list[int], int], Generation]


def prompt_of_length(tokenizer, length: int, text: str | None = None) -> list[int]:
    """Exactly `length` token ids cut from the held-out evaluation text (deterministic)."""
    ids = tokenizer(text or evaluation_text("heldout")).input_ids
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def ours(decoder: Decoder) -> Engine:
    """Our decoder generating exactly `new_tokens` greedy tokens (EOS ignored, so lengths are equal)."""
    def run(prompt_ids, new_tokens):
        return decoder.generate(prompt_ids, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
    return run


def on_pytorch_matmul(engine: Engine) -> Engine:
    """The same engine with our CPU kernels switched off (`cpu_kernels.switched_off`): PyTorch's matmul runs
    every linear layer, which separates what the kernels give from what the rest of the decoder gives."""
    def run(prompt_ids, new_tokens):
        with cpu_kernels.switched_off():
            return engine(prompt_ids, new_tokens)
    return run


def transformers_generate(hf_model, use_cache: bool, **kwargs) -> Engine:
    """transformers' `generate` (greedy, exactly `new_tokens`), per-token times taken by a streamer."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.start, self.times, self.ids, self.seen_prompt = time.perf_counter(), [], [], False

        def put(self, value):
            if not self.seen_prompt:  # generate() first hands over the prompt
                self.seen_prompt = True
                return
            ids = value.reshape(-1).tolist()  # assisted generation hands over several tokens at once
            self.times.extend([time.perf_counter() - self.start] * len(ids))
            self.ids.extend(ids)

        def end(self):
            pass

    device = next(hf_model.parameters()).device

    def run(prompt_ids, new_tokens):
        clock = Clock()
        with torch.inference_mode():
            hf_model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
                              streamer=clock, pad_token_id=hf_model.config.eos_token_id, **kwargs)
        return Generation(list(prompt_ids), clock.ids, token_times_s=clock.times)
    return run


def arm_name(engine: str, prompt_length: int) -> str:
    """The arm of one (engine, prompt length) in `compare`'s rounds (`frame.attrs["rounds"]`)."""
    return f"{engine} @ {prompt_length} prompt tokens"


def compare(engines: dict[str, Engine], prompt_lengths: list[int], new_tokens: int, tokenizer,
            repeats: int = 3, warmup: int = 1, progress: bool = True) -> pd.DataFrame:
    """Time every engine at every prompt length in paired rounds; one row per (engine, prompt length).

    `warmup` untimed runs per engine happen first, at the first prompt length. Then `repeats` rounds
    (`rounds.run_rounds`): each round runs every (prompt length, engine) once, in a seeded shuffled order, so the
    host's slow drift (tens of percent within a minute on shared machines) lands in every condition alike, and a
    round's ratio between two engines cancels it. Rows: medians and spreads over the rounds, CPU/wall ratio and
    `contended` (`hardware.contended`). `frame.attrs["rounds"]`: the per-round values (a `rounds.Rounds`, one
    row per call with engine, prompt_tokens, decode_tokens_per_s, time_to_first_token_s,
    end_to_end_tokens_per_s, wall_s, cpu_wall_ratio, contended), which `ratio_intervals` pairs."""
    prompts = {length: prompt_of_length(tokenizer, length) for length in prompt_lengths}
    for _ in range(warmup):
        for engine in engines.values():
            engine(prompts[prompt_lengths[0]], new_tokens)
    arms, keys = {}, {}
    for length in prompt_lengths:
        for name, engine in engines.items():
            arms[arm_name(name, length)] = functools.partial(engine, prompts[length], new_tokens)
            keys[arm_name(name, length)] = (name, length)
    timed = run_rounds(arms, rounds=repeats, warmup=0, progress="generation benchmark" if progress else None,
                       metrics=lambda g: {"decode_tokens_per_s": g.decode_tokens_per_s,
                                          "time_to_first_token_s": g.time_to_first_token_s})
    calls = timed.frame
    calls["engine"] = [keys[arm][0] for arm in calls["arm"]]
    calls["prompt_tokens"] = [keys[arm][1] for arm in calls["arm"]]
    calls["end_to_end_tokens_per_s"] = new_tokens / calls["wall_s"]
    rows = []
    for arm, (name, length) in keys.items():
        mine = calls[calls["arm"] == arm].sort_values("round")
        runs = list(zip(timed.results(arm), mine["wall_s"], mine["cpu_s"]))
        rows.append({**summarize(name, length, new_tokens, runs), "contended_calls": int(mine["contended"].sum())})
    frame = pd.DataFrame(rows)
    frame.attrs["rounds"] = light_rounds(timed)
    return frame


def summarize(engine: str, prompt_length: int, new_tokens: int,
              runs: list[tuple[Generation, float, float]]) -> dict:
    """Median and spread of the rounds of one engine at one prompt length; `runs`: (generation, wall, CPU s)."""
    decode = [g.decode_tokens_per_s for g, _, _ in runs]
    ttft = [g.time_to_first_token_s for g, _, _ in runs]
    e2e = [new_tokens / wall for _, wall, _ in runs]
    threads = torch.get_num_threads()
    cpu_ratio = sum(c for _, _, c in runs) / sum(w for _, w, _ in runs)
    return {
        "engine": engine, "prompt_tokens": prompt_length, "new_tokens": new_tokens, "repeats": len(runs),
        "decode_tokens_per_s": statistics.median(decode), "decode_tokens_per_s_spread": spread(decode),
        "time_to_first_token_s": statistics.median(ttft), "time_to_first_token_s_spread": spread(ttft),
        "end_to_end_tokens_per_s": statistics.median(e2e),
        "per_token_latency_ms": 1000 / statistics.median(decode),
        "cpu_wall_ratio": cpu_ratio, "contended": contended(cpu_ratio, threads),
        "token_ids": runs[0][0].token_ids,
    }


def ratios(frame: pd.DataFrame, metric: str, baseline: str) -> pd.DataFrame:
    """metric of every engine divided by the baseline engine's, per prompt length (same run)."""
    table = frame.pivot(index="prompt_tokens", columns="engine", values=metric)
    return table.div(table[baseline], axis=0).add_suffix(f" / {baseline}")


def paired(frame: pd.DataFrame, metric: str, engine: str, baseline: str, prompt_tokens: int) -> dict:
    """`harness.paired_interval` of metric(engine) / metric(baseline) at one prompt length, over the paired
    rounds of `frame.attrs["rounds"]` (a `compare` frame); NaN columns when the frame does not carry them (a
    concat of several runs: their rounds cannot be paired)."""
    name = f"{metric} / {baseline}"
    timed = frame.attrs.get("rounds")
    arms = (arm_name(engine, prompt_tokens), arm_name(baseline, prompt_tokens))
    if timed is None or not set(arms) <= set(timed.arms) or metric not in timed.frame.columns:
        return paired_interval(name, [], [])
    return paired_interval(name, timed.values(arms[0], metric), timed.values(arms[1], metric))


def ratio_intervals(frame: pd.DataFrame, metric: str, baseline: str) -> pd.DataFrame:
    """`ratios` in long form with the interval of each ratio: one row per (prompt length, engine) with
    `{metric} / {baseline}` (the ratio of medians, as `ratios`) and its paired-round geometric mean with a 95%
    interval: the columns `{metric} / {baseline}_geomean`, `_low`, `_high`, `_rounds` (`paired`)."""
    name = f"{metric} / {baseline}"
    table = frame.pivot(index="prompt_tokens", columns="engine", values=metric)
    rows = []
    for length in table.index:
        for engine in table.columns:
            rows.append({"prompt_tokens": length, "engine": engine,
                         name: table.loc[length, engine] / table.loc[length, baseline],
                         **paired(frame, metric, engine, baseline, length)})
    return pd.DataFrame(rows)


def latency_by_position(engines: dict[str, Engine], prompt_ids: list[int], new_tokens: int) -> pd.DataFrame:
    """Per-token latency against the token's position in the sequence, one generation per engine (one round of
    `rounds.run_rounds`, no warm-up); each row also carries its generation's CPU/wall ratio and `contended`."""
    timed = run_rounds({name: functools.partial(engine, prompt_ids, new_tokens) for name, engine in engines.items()},
                       rounds=1, warmup=0)
    calls = timed.frame.set_index("arm")
    rows = []
    for name in engines:
        result, call = timed.results(name)[0], calls.loc[name]
        for i, latency in enumerate(result.token_latencies_s[1:], start=1):  # [0] is the prefill
            rows.append({"engine": name, "position": len(prompt_ids) + i, "latency_ms": 1000 * latency,
                         "cpu_wall_ratio": call["cpu_wall_ratio"], "contended": bool(call["contended"])})
    return pd.DataFrame(rows)


def latency_growth(frame: pd.DataFrame) -> pd.DataFrame:
    """Least-squares slope of per-token latency against position (ms per extra token of context)."""
    import numpy as np

    rows = []
    for name, group in frame.groupby("engine", sort=False):
        slope, intercept = np.polyfit(group.position, group.latency_ms, 1)
        rows.append({"engine": name, "ms_per_context_token": slope, "intercept_ms": intercept,
                     "first_ms": group.latency_ms.iloc[0], "last_ms": group.latency_ms.iloc[-1]})
    return pd.DataFrame(rows)


def equal_tokens(frame: pd.DataFrame) -> pd.DataFrame:
    """Per prompt length: are every engine's generated token ids identical? (the lossless check)"""
    table = frame.pivot(index="prompt_tokens", columns="engine", values="token_ids")
    same = table.apply(lambda row: all(ids == row.iloc[0] for ids in row), axis=1)
    return same.rename("tokens identical across engines").to_frame()


def check_lossless(identical: bool, dtype, what: str) -> bool:
    """The equivalence policy of every report: in fp32 a lossless optimization must give the plain decoder's
    tokens exactly (an AssertionError stops the report otherwise). In bf16/fp16 the same math run as other
    kernel shapes (a batch, a cached step, a fused kernel) rounds differently and may flip a near-tie, so there
    the result is printed and returned, not asserted."""
    if identical:
        return True
    if resolve_dtype(dtype) == torch.float32:
        raise AssertionError(what)
    print(f"NOTE ({dtype}): {what}. Half precision rounds differently per kernel shape; fp32 is the exact check.")
    return False


def agreement_table(reference, candidates: dict, prompts: dict, new_tokens: int,
                    tolerance: float = agreement.TOLERANCE) -> pd.DataFrame:
    """Per prompt and candidate engine, the ISA-independent agreement with `reference` (llmopt.engine.agreement:
    logit error within `tolerance` of the largest logit at every teacher-forced step, greedy tokens identical up
    to the first near-tie under that bound). `reference` and each candidate are (tokens_fn, logits_fn) pairs, as
    `agreement.of_decoder` / `of_transformers` give; `prompts` maps a label to token ids."""
    rows = []
    for label, ids in prompts.items():
        expected = agreement.Reference.of(reference, ids, new_tokens)
        for name, engine in candidates.items():
            result = expected.against(engine, tolerance)
            rows.append({"prompt": label, "engine": name, "identical_steps": result.identical_steps,
                         "steps": result.steps, "first_near_tie": result.first_near_tie,
                         "max_logit_error": result.max_relative_error, "bound": result.tolerance,
                         "top1_agreement": result.top1_agreement, "agrees": result.agrees})
    return pd.DataFrame(rows)
