"""Speculative decoding as notebook 06 measures it: the workloads (open-ended, repeat, summarize), the sweep over
drafters and k, and the comparison with the design document's estimates."""
from __future__ import annotations

import functools
import statistics
from typing import Sequence

import pandas as pd

from ..engine.generate import Decoder, GenerationConfig
from ..engine.speculative import Drafter, SpeculativeDecoder, expected_speedup
from ..errors import InvalidParameterError
from . import datasets
from .harness import call_columns, light_rounds, paired_interval, spread
from .rounds import run_rounds
from .stats import estimate_verdict, interval_from_columns


def grounded_passage(min_chars: int = 600, index: int = 0) -> str:
    """A prose paragraph of the held-out text (data/text), line wraps joined: the passage the input-grounded
    workloads repeat or summarize."""
    paragraphs = [" ".join(p.split()) for p in datasets.evaluation_text("heldout").split("\n\n")
                  if "::=" not in p and "***" not in p and not p.startswith(" ")]
    return [p for p in paragraphs if len(p) >= min_chars][index]


WORKLOADS = ("open-ended", "repeat", "summarize")


def workload_prompts(tokenizer, kinds: Sequence[str] = ("open-ended", "repeat"), passage: str | None = None
                     ) -> dict[str, list[int]]:
    """Prompt ids per workload (chat template applied):
    - 'open-ended': a chat question from data/prompts.jsonl (the answer is new text);
    - 'repeat': "Repeat this passage exactly" + a held-out passage, the answer primed with the passage's first
      five words (SmolLM2-135M otherwise often paraphrases or drifts; priming is a prefilled answer);
    - 'summarize': "Summarize this passage" + the same passage (the answer reuses some of its phrases)."""
    passage = passage or grounded_passage()

    def chat(text: str) -> list[int]:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    out = {}
    for kind in kinds:
        if kind == "open-ended":
            out[kind] = chat(datasets.prompts("chat")[1]["text"])
        elif kind == "repeat":
            out[kind] = chat("Repeat this passage exactly:\n\n" + passage) + tokenizer(
                " ".join(passage.split()[:5])).input_ids
        elif kind == "summarize":
            out[kind] = chat("Summarize this passage:\n\n" + passage)
        else:
            raise InvalidParameterError(f"unknown workload {kind!r}; use one of {', '.join(WORKLOADS)}")
    return out


PLAIN = "plain (cached)"


def arm_name(workload: str, drafter: str, k: int) -> str:
    """The arm of one (workload, drafter, k) in `sweep`'s rounds (`frame.attrs["rounds"]`)."""
    return f"{workload} | {drafter} | k={k}"


def sweep(model, tokenizer, drafters: dict[str, tuple[Drafter, Sequence[int]]], prompts: dict[str, list[int]],
          new_tokens: int = 48, repeats: int = 2, warmup_tokens: int = 8, cache: str = "static",
          progress: bool = True):
    """Time the plain cached decoder and every (drafter, k) on every workload, greedy, in paired rounds.

    drafters: name -> (drafter, the k values to try). Every configuration first runs once untimed on every
    workload for `warmup_tokens` tokens; then `repeats` rounds (`rounds.run_rounds`) run every (workload,
    configuration) once each, in a shuffled order. Returns one row per (workload, drafter, k): medians over the
    rounds, the same-run speedup over the plain decoder (ratio of medians) and its paired-round geometric mean with
    a 95% interval (`speedup_geomean`, `speedup_low`, `speedup_high`, `speedup_rounds`; the same for
    `end_to_end_speedup`), acceptance statistics, the measured cost ratios and Leviathan's expected speedup for
    the measured acceptance, whether every run's tokens equal the plain decoder's, the CPU/wall ratio and
    `contended`. `frame.attrs["rounds"]`: the per-round values (decode_tokens_per_s, wall_s per call)."""
    plain = Decoder(model, tokenizer, cache=cache)
    configs = [(PLAIN, 0, plain)] + [(name, k, SpeculativeDecoder(model, tokenizer, drafter, k, cache))
                                     for name, (drafter, ks) in drafters.items() for k in ks]
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    warm = GenerationConfig(max_new_tokens=warmup_tokens, ignore_eos=True)
    arms = {}
    for workload, prompt_ids in prompts.items():
        for name, k, decoder in configs:  # warm-up: every code path and shape once
            decoder.generate(prompt_ids, warm)
            arms[arm_name(workload, name, k)] = functools.partial(decoder.generate, prompt_ids, config)
    if len(arms) != len(prompts) * len(configs):
        raise InvalidParameterError("sweep: two configurations share a name and k; name the drafters apart")
    timed = run_rounds(arms, rounds=repeats, warmup=0, progress="speculative sweep" if progress else None,
                       metrics=lambda g: {"decode_tokens_per_s": g.decode_tokens_per_s})
    calls = timed.frame
    rows = []
    for workload, prompt_ids in prompts.items():
        reference = timed.results(arm_name(workload, PLAIN, 0))
        plain_arm = arm_name(workload, PLAIN, 0)
        plain_tokens_per_s = statistics.median(g.decode_tokens_per_s for g in reference)
        plain_e2e = statistics.median(new_tokens / wall for wall in timed.values(plain_arm))
        plain_step_s = 1 / plain_tokens_per_s
        for name, k, _ in configs:
            arm = arm_name(workload, name, k)
            samples = timed.results(arm)
            walls = timed.values(arm)
            decode = [g.decode_tokens_per_s for g in samples]
            e2e = [new_tokens / wall for wall in walls]
            row = {"workload": workload, "drafter": name, "k": k, "prompt_tokens": len(prompt_ids),
                   "new_tokens": new_tokens, "repeats": repeats,
                   "decode_tokens_per_s": statistics.median(decode), "decode_tokens_per_s_spread": spread(decode),
                   "end_to_end_tokens_per_s": statistics.median(e2e),
                   "speedup": statistics.median(decode) / plain_tokens_per_s,
                   "end_to_end_speedup": statistics.median(e2e) / plain_e2e,
                   **paired_interval("speedup", decode, timed.values(plain_arm, "decode_tokens_per_s")),
                   # end-to-end tokens/s is new_tokens / wall: its ratio is the plain run's wall over this one's
                   **paired_interval("end_to_end_speedup", timed.values(plain_arm), walls),
                   "tokens_identical": all(g.token_ids == reference[0].token_ids for g in samples),
                   **call_columns(calls[calls["arm"] == arm])}
            stats = samples[0].stats if name != PLAIN else None
            if stats is not None:
                draft_s = statistics.median(g.stats.draft_s / max(g.stats.drafted, 1) for g in samples)
                verify_s = statistics.median(g.stats.verify_s / g.stats.target_passes for g in samples)
                cost, verify_cost = draft_s / plain_step_s, verify_s / plain_step_s
                row.update({key: stats.as_dict()[key] for key in (
                    "target_passes", "drafted", "accepted", "acceptance_rate", "alpha", "accepted_per_pass")})
                row.update({
                    "tokens_per_pass": samples[0].tokens_per_pass,
                    "draft_cost_ratio": cost, "verify_cost_ratio": verify_cost,
                    "expected_speedup": expected_speedup(stats.alpha, k, cost),
                    "expected_speedup_measured_verify": expected_speedup(stats.alpha, k, cost, verify_cost)})
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["rounds"] = light_rounds(timed)
    return frame


def document_comparison(results, estimates, k: int = 5, tolerance: float = 0.1):
    """The document's acceptance -> speedup rows (k = 5) beside what was measured at k = `k`.

    Per document row: Leviathan's expected speedup at that acceptance (free drafter, verification costing one
    decode step), and the measured configurations whose per-token acceptance `alpha` lies within `tolerance`
    of it, with their measured speedup and a verdict against the document's range (`stats.estimate_verdict` on
    the row's paired-round interval `speedup_geomean/_low/_high`)."""
    measured = results[(results.k == k) & (results.drafter != PLAIN)]
    rows = []
    for est in estimates.itertuples():
        acceptance = float(est.condition.split("%")[0]) / 100
        near = measured[(measured.alpha - acceptance).abs() <= tolerance]
        row = {"document": est.document_text, "acceptance": acceptance,
               "estimate_low": est.low, "estimate_high": est.high,
               "leviathan_expected (c=0)": expected_speedup(acceptance, k, 0.0)}
        if len(near):
            best = near.iloc[(near.alpha - acceptance).abs().argmin()]
            interval = interval_from_columns(best, "speedup")  # paired rounds; one round: inconclusive
            row.update({"measured_config": f"{best.drafter} / {best.workload} (k={k})",
                        "measured_alpha": best.alpha, "measured_speedup": best.speedup,
                        "verdict": estimate_verdict(interval, est.low, est.high)})
        else:
            row.update({"measured_config": "none measured at this acceptance", "measured_alpha": float("nan"),
                        "measured_speedup": float("nan"), "verdict": "not measured"})
        rows.append(row)
    return pd.DataFrame(rows)
