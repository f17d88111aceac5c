"""Benchmarks of the attention backends: one attention call alone, and the whole model, per context length.

`op_benchmark` times one prefill-shaped call (causal, batch 1; the default model's head layout: 9 query heads,
3 KV heads, head_dim 64) of every backend at every length, with its peak extra memory
(`harness.peak_memory_bytes`) and its error against `naive` on the same inputs. Backends run round-robin inside
each repeat, so a shared machine's slow drifts hit all of them alike. A (backend, length) whose projected
memory exceeds `max_projected_bytes` is skipped with the reason recorded: `naive` at 16384 tokens would need
about 19 GB in fp32 (two [9, 16384, 16384] score-sized tensors are alive at once: scores and their softmax).

`model_benchmark` runs the whole model through the decoder (static KV cache) with each backend: prefill time
(time to first token) and decode tokens/s, plus the generated tokens for the equivalence check. Lengths that do
not fit the model's positions are skipped with the reason recorded; beyond that, use the op benchmark.
"""
from __future__ import annotations

import math
import time

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..engine import attention
from ..engine.generate import Decoder
from ..hardware import synchronize
from . import benchmark
from .harness import Timing, paired_interval, peak_memory_bytes
from .rounds import merge_rounds, run_rounds
from .stats import Interval, estimate_verdict, interval_from_columns

DEFAULT_MAX_PROJECTED_BYTES = 8 * 2**30


def skip_reason(backend: str, dtype: torch.dtype, device) -> str | None:
    """Why `backend` cannot run for this dtype and device, or None when it can."""
    reason = attention.unavailable_reason(backend)
    if reason is None and backend == "flash_attn" and dtype not in (torch.float16, torch.bfloat16):
        reason = f"flash_attn runs fp16/bf16 only, not {dtype}"
    if reason is None and backend == "flash_attn" and torch.device(device).type != "cuda":
        reason = "flash_attn runs on CUDA only"
    return reason


def projected_peak_bytes(backend: str, query_length: int, key_length: int, num_heads: int = 9,
                         num_kv_heads: int = 3, head_dim: int = 64, batch_size: int = 1,
                         dtype: torch.dtype = torch.float32) -> int:
    """A rough upper estimate of the extra memory one causal attention call allocates (to decide skips).

    naive: the scores and their masked copy, then the masked scores and the softmax, are alive together (plus
    an fp32 copy below fp32), and the bool causal mask. The others: the output, the expanded or grouped
    queries, and per-block temporaries."""
    element = torch.empty((), dtype=dtype).element_size()
    scores = batch_size * num_heads * query_length * key_length
    out_bytes = batch_size * num_heads * query_length * head_dim * 4
    if backend == "naive":
        per_score = 2 * element + (0 if element == 4 else 4 + 4)
        kv_copies = 2 * batch_size * num_heads * key_length * head_dim * element
        return scores * per_score + query_length * key_length + kv_copies + out_bytes
    if backend == "tiled":
        block = (batch_size * num_heads * min(attention.DEFAULT_BLOCK_QUERIES, query_length)
                 * min(attention.DEFAULT_BLOCK_KEYS, key_length) * 4)
        return 6 * block + 3 * out_bytes
    return 3 * out_bytes


def op_inputs(length: int, num_heads: int = 9, num_kv_heads: int = 3, head_dim: int = 64, batch_size: int = 1,
              dtype=torch.float32, device="cpu", seed: int = 0):
    """Random prefill-shaped q [B, H, T, D], k and v [B, Hkv, T, D] (standard normal, fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch_size, num_heads, length, head_dim)] + [(batch_size, num_kv_heads, length, head_dim)] * 2
    return [torch.randn(s, generator=generator).to(dtype=dtype, device=device) for s in shapes]


def _adaptive_repeats(repeats: int, first_call_s: float, max_seconds: float | None) -> int:
    """At most `repeats`, fewer when one call is so slow that they would exceed `max_seconds` (at least 1)."""
    if max_seconds is None or first_call_s <= 0:
        return repeats
    return max(1, min(repeats, int(max_seconds // first_call_s)))


def op_benchmark(backends: list[str] | None = None, lengths=(512, 2048, 8192, 16384), num_heads: int = 9,
                 num_kv_heads: int = 3, head_dim: int = 64, batch_size: int = 1, dtype=torch.float32,
                 device="cpu", repeats: int = 3, max_seconds_per_case: float | None = 20.0,
                 max_projected_bytes: int = DEFAULT_MAX_PROJECTED_BYTES, progress: bool = True) -> pd.DataFrame:
    """Time and peak memory of one causal prefill attention call per backend and length; one row each.

    Per length and backend: one untimed call under the memory profiler (it is also the warm-up), then the
    backends in paired rounds (`rounds.run_rounds`, every backend once per round, shuffled). `repeats` rounds,
    fewer at a length whose slowest backend would take more than `max_seconds_per_case` for them (never below 1;
    the row says how many ran): every backend of one length runs the same rounds, so they pair. sdpa rows name
    the kernel PyTorch chose. Where naive ran, each row gets the paired-round interval of naive time / its time:
    `speedup_vs_naive_geomean`, `_low`, `_high`, `_rounds` (`harness.paired_interval`).
    """
    backends = list(backends or attention.available_backends())
    rows = []
    bar = tqdm(total=len(lengths) * len(backends), desc="attention op", disable=not progress, leave=False)
    for length in lengths:
        q, k, v = op_inputs(length, num_heads, num_kv_heads, head_dim, batch_size, dtype, device)
        shape = dict(context_tokens=length, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     batch_size=batch_size, dtype=str(dtype).removeprefix("torch."))
        runnable, outputs, first_s, memory = [], {}, {}, {}
        for name in backends:
            projected = projected_peak_bytes(name, length, length, num_heads, num_kv_heads, head_dim,
                                             batch_size, dtype)
            reason = skip_reason(name, dtype, device)
            if reason is None and projected > max_projected_bytes:
                reason = (f"projected {projected / 2**30:.1f} GiB > limit {max_projected_bytes / 2**30:.1f} GiB")
            row = {"backend": name, **shape, "projected_bytes": projected, "skipped": reason is not None,
                   "skip_reason": reason or ""}
            rows.append(row)
            if reason is not None:
                bar.update()
                continue
            fn = _call(name, q, k, v)
            if name == "sdpa":
                row["kernel"] = attention.sdpa_kernel_used(q, k, v)
            # the profiled call is also the warm-up; its profiler-inflated time only sizes the rounds below
            (outputs[name], memory[name]), first_s[name] = _profiled_call(fn, device)
            runnable.append((name, fn, row))
            bar.update()
        if not runnable:
            continue
        rounds = min(_adaptive_repeats(repeats, first_s[name], max_seconds_per_case) for name, _, _ in runnable)
        timed = run_rounds({name: fn for name, fn, _ in runnable}, rounds, warmup=0, device=device,
                           keep_results=False)
        reference = outputs.get("naive")
        for name, _, row in runnable:
            error = float("nan") if reference is None else (outputs[name].float() - reference.float()).abs().max()
            timing = Timing(list(timed.values(name, "wall_s")), list(timed.values(name, "cpu_s")),
                            torch.get_num_threads())
            row.update(timing.summary(), peak_bytes=memory[name], max_abs_error_vs_naive=float(error))
            if "naive" in outputs:  # naive time / this time, paired by round
                row.update(paired_interval("speedup_vs_naive", timed.values("naive"), timed.values(name)))
        del outputs, reference
    bar.close()
    frame = pd.DataFrame(rows)
    if "kernel" not in frame:
        frame["kernel"] = ""
    frame["kernel"] = frame["kernel"].fillna("")
    return frame


def _call(name: str, q, k, v):
    attend = attention.get_backend(name)

    def run():
        with torch.inference_mode():
            return attend(q, k, v, None)
    return run


def _profiled_call(fn, device) -> tuple[tuple, float]:
    """(the output and its peak memory, `harness.peak_memory_bytes`), and the call's wall seconds."""
    synchronize(device)
    start = time.perf_counter()
    measured = peak_memory_bytes(fn, device)
    synchronize(device)
    return measured, time.perf_counter() - start


def op_speedups(frame: pd.DataFrame, baseline: str = "naive") -> pd.DataFrame:
    """Per length where the baseline ran: baseline median time / backend median time (speedup), and backend
    peak memory / baseline peak memory."""
    ran = frame[~frame.skipped]
    with_baseline = ran[ran.context_tokens.isin(ran[ran.backend == baseline].context_tokens)]
    time_table = with_baseline.pivot(index="context_tokens", columns="backend", values="time_median_s")
    memory_table = with_baseline.pivot(index="context_tokens", columns="backend", values="peak_bytes")
    if baseline not in time_table:
        return pd.DataFrame(index=time_table.index)
    speedup = (1 / time_table.div(time_table[baseline], axis=0)).drop(columns=baseline).add_prefix("speedup ")
    memory = memory_table.div(memory_table[baseline], axis=0).drop(columns=baseline).add_prefix("memory ratio ")
    return speedup.join(memory)


def model_benchmark(model, tokenizer, backends: list[str] | None = None, lengths=(512, 2048),
                    new_tokens: int = 8, repeats: int = 2, warmup: int = 1, progress: bool = True) -> pd.DataFrame:
    """Prefill time and decode tokens/s of the whole model per backend (static KV cache, greedy, EOS ignored).

    Backends are interleaved inside each repeat (`benchmark.compare`). The warm-up runs at the first length only
    (later lengths reuse the warmed-up process). Lengths beyond the model's positions are skipped with the
    reason recorded. Rows keep the generated token ids for the equivalence check; the model's backend is
    restored afterwards."""
    device = next(model.parameters()).device
    dtype = model.activation_dtype
    backends = list(backends or attention.available_backends())
    previous = model.attention_backend
    limit = model.config.max_position_embeddings
    frames, skipped = [], []
    runnable = []
    for name in backends:
        reason = skip_reason(name, dtype, device)
        if reason is None:
            runnable.append(name)
        else:
            skipped += [{"engine": name, "prompt_tokens": n, "skipped": True, "skip_reason": reason} for n in lengths]
    decoder = Decoder(model, tokenizer, cache="static")

    def engine(name):
        def run(prompt_ids, n):
            model.set_attention(name)
            return benchmark.ours(decoder)(prompt_ids, n)
        return run

    engines = {name: engine(name) for name in runnable}
    try:
        for i, length in enumerate(lengths):
            if length + new_tokens > limit:
                skipped += [{"engine": name, "prompt_tokens": length, "skipped": True,
                             "skip_reason": f"{length} + {new_tokens} tokens exceed the model's {limit} positions"}
                            for name in runnable]
                continue
            frames.append(benchmark.compare(engines, [length], new_tokens, tokenizer, repeats,
                                            warmup if i == 0 else 0, progress))
    finally:
        model.set_attention(previous)
    frame = pd.concat(frames + [pd.DataFrame(skipped)], ignore_index=True) if frames or skipped else pd.DataFrame()
    if "skipped" not in frame:
        frame["skipped"] = False
    frame["skipped"] = frame["skipped"].fillna(False).astype(bool)
    frame["skip_reason"] = frame.get("skip_reason", pd.Series(dtype=str)).fillna("")
    frame = frame.rename(columns={"engine": "backend", "prompt_tokens": "context_tokens"})
    frame["prefill_s"] = frame["time_to_first_token_s"]
    if frames:  # every length's rounds in one Rounds: arms are per (backend, length), paired within a length
        frame.attrs["rounds"] = merge_rounds([f.attrs["rounds"] for f in frames if "rounds" in f.attrs])
    return frame


def prefill_speedup(model_frame: pd.DataFrame, backend: str, length: int, baseline: str = "naive"):
    """stats.Interval of baseline prefill time / backend prefill time at one length, paired by round, from a
    `model_benchmark` frame's rounds (`attrs["rounds"]`); a one-round NaN Interval where the frame carries none."""
    columns = benchmark.paired(model_frame, "time_to_first_token_s", baseline, backend, length)
    return interval_from_columns({k.replace(f"time_to_first_token_s / {backend}", "speedup"): v
                                  for k, v in columns.items()}, "speedup", math.nan)


def tokens_identical(frame: pd.DataFrame, baseline: str = "naive") -> pd.DataFrame:
    """Per context length and backend: are the greedy tokens identical to the baseline backend's?"""
    ran = frame[~frame.skipped]
    rows = []
    for length, group in ran.groupby("context_tokens"):
        reference = group.set_index("backend")["token_ids"]
        if baseline not in reference:
            continue
        for name, ids in reference.items():
            rows.append({"context_tokens": length, "backend": name, "new_tokens": len(ids),
                         "identical_to_" + baseline: list(ids) == list(reference[baseline])})
    return pd.DataFrame(rows)


def sdpa_dispatch_table(length: int = 512, num_heads: int = 9, num_kv_heads: int = 3, head_dim: int = 64,
                        dtype=torch.float32, device="cpu") -> pd.DataFrame:
    """Which kernel `sdpa` runs for the calls the model makes: causal prefill with GQA (`enable_gqa=True`),
    the same with K/V expanded to every head beforehand, a decode step, a prefill chunk after cached keys
    (explicit mask), and a padded batch's mask. Found with `attention.sdpa_kernel_used`."""
    groups = num_heads // num_kv_heads
    q, k, v = op_inputs(length, num_heads, num_kv_heads, head_dim, 1, dtype, device)
    chunk = max(1, length // 8)
    padding = torch.ones(1, 1, 1, length, dtype=torch.bool, device=device)
    padding[..., : max(1, length // 16)] = False
    cases = {
        "prefill, causal, GQA (enable_gqa=True)": (q, k, v, None),
        "prefill, causal, K/V expanded to every head": (q, k.repeat_interleave(groups, 1),
                                                        v.repeat_interleave(groups, 1), None),
        "decode step (1 query, every key)": (q[:, :, -1:], k, v, None),
        f"prefill chunk of {chunk} after {length - chunk} cached keys (mask)": (q[:, :, -chunk:], k, v, None),
        "padded batch (explicit bool mask)": (q, k, v, padding & attention.causal_mask(length, length, device)),
    }
    rows = []
    for case, (cq, ck, cv, mask) in cases.items():
        op = attention.sdpa_kernel_used(cq, ck, cv, mask)
        rows.append({"call": case, "aten_op": op, "kernel": attention.SDPA_KERNELS.get(op, "unknown")})
    return pd.DataFrame(rows)


def equivalence_table(backends: list[str] | None = None, length: int = 512, num_heads: int = 9,
                      num_kv_heads: int = 3, head_dim: int = 64, device="cpu") -> pd.DataFrame:
    """Max abs error of every backend against fp32 `naive` on random inputs: causal prefill, a prefill chunk
    after cached keys, a decode step and an explicit (padding + causal) mask. fp32 inputs, except flash_attn,
    which only runs in fp16 (its tolerance is fp16's). `within_tolerance` is what the check asserts."""
    backends = list(backends or attention.available_backends())
    q, k, v = op_inputs(length, num_heads, num_kv_heads, head_dim, 2, torch.float32, device, seed=1)
    chunk = max(1, length // 8)
    padding = torch.ones(2, 1, 1, length, dtype=torch.bool, device=device)
    padding[1, ..., 1: 1 + max(1, length // 16)] = False
    cases = {"causal prefill": (q, None), f"chunk of {chunk} after {length - chunk} cached": (q[:, :, -chunk:], None),
             "decode step": (q[:, :, -1:], None),
             "explicit mask": (q, padding & attention.causal_mask(length, length, device))}
    rows = []
    for case, (cq, mask) in cases.items():
        reference = attention.naive(cq, k, v, mask)
        for name in (b for b in backends if b != "naive"):
            half = name == "flash_attn"
            cast = (lambda t: t.half()) if half else (lambda t: t)
            out = attention.get_backend(name)(cast(cq), cast(k), cast(v), mask)
            error = (out.float() - reference).abs().max().item()
            tolerance = 5e-3 if half else 1e-5
            rows.append({"case": case, "backend": name, "dtype": "fp16" if half else "fp32",
                         "max_abs_error": error, "tolerance": tolerance, "within_tolerance": error <= tolerance})
    return pd.DataFrame(rows)


def estimate_table(op_frame: pd.DataFrame, model_frame: pd.DataFrame | None, estimates: pd.DataFrame,
                   backends=("sdpa", "tiled", "flash_attn")) -> pd.DataFrame:
    """The document's speedup estimates (per context length) beside the measured speedups over `naive`: of the
    attention op, and of whole-model prefill where it ran; one row per (length, backend, scope) with a verdict:
    `stats.estimate_verdict` on the paired-round interval (op: `speedup_vs_naive_*` columns; whole model: the
    frame's rounds), 'inconclusive' where there is none of 2 or more rounds."""

    op_speedup = op_speedups(op_frame)
    prefill = None
    if model_frame is not None and len(model_frame):
        ran = model_frame[~model_frame.skipped]
        table = ran.pivot(index="context_tokens", columns="backend", values="prefill_s")
        if "naive" in table:
            prefill = 1 / table.div(table["naive"], axis=0)
    rows = []
    for _, estimate in estimates.iterrows():
        length = int(str(estimate.condition).split()[0])
        for name in backends:
            measured = {"attention op": op_speedup.get(f"speedup {name}", pd.Series(dtype=float)).get(length),
                        "whole-model prefill": None if prefill is None or name not in prefill
                        else prefill[name].get(length)}
            op_rows = op_frame[(op_frame.backend == name) & (op_frame.context_tokens == length)]
            intervals = {"attention op": (interval_from_columns(op_rows.iloc[0], "speedup_vs_naive", math.nan)
                                          if len(op_rows) else None),
                         "whole-model prefill": (prefill_speedup(model_frame, name, length)
                                                 if prefill is not None and name in prefill else None)}
            for scope, value in measured.items():
                if value is None or value != value:
                    continue
                interval = intervals[scope]
                if interval is None or interval.single:  # no paired rounds: the point value, inconclusive
                    interval = Interval(value, value, value, 1, method="single round")
                rows.append({"context_tokens": length, "backend": name, "scope": scope,
                             "estimate (document)": estimate.document_text, "measured speedup vs naive": value,
                             "verdict": estimate_verdict(interval, estimate.low, estimate.high)})
    columns = ["context_tokens", "backend", "scope", "estimate (document)", "measured speedup vs naive", "verdict"]
    return pd.DataFrame(rows, columns=columns)
