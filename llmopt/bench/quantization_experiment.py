"""The quantization experiment of notebook 03: one model in every weight format, its quality, its decode speed on
both engines, the bandwidth roof, the issue's acceptance checks, the design document's estimates and the headline.

The notebook calls these functions in order and shows their tables; the names of the frames' columns and rows are
what `reproduction` and the report read back from 03's results files (`03_quantization*.csv`), so they stay fixed.
"""
from __future__ import annotations

import importlib.util
import math
import tempfile
from dataclasses import dataclass

import pandas as pd
import torch
from transformers import AutoConfig

from ..engine import agreement, cpu_kernels, fused_decode, gptq_format
from ..engine import quantized_variants as qv
from ..engine.config import truncated_hf_config
from ..engine.generate import Decoder
from ..engine.loading import DEFAULT_MODEL, default_gguf_path, load_model
from ..engine.testing import truncated
from . import benchmark, datasets, evaluation, stats
from .bandwidth import decode_limit_tokens_per_s, roof
from .reproduction import PYTORCH_ENGINE
from .rounds import merge_rounds

TITLE = "Quantization (INT8 / INT4, RTN / GPTQ / GGUF) on real kernels"
SIXTEEN_BIT = "bf16 weights, fp32 activations"  # 16-bit weights widened inside our kernel (llama.cpp's F16 way)
PYTORCH_KERNEL = "rtn, PyTorch kernel"  # the method of the rows on PyTorch's packed kernels (out of the checks)
METRIC = "decode_tokens_per_s"
VARIANT_COLUMNS = ["variant", "kernel", "quantize_s", "file_MB", "memory_MB", "read_per_token_MB", "file_note",
                   "skipped"]
SPEED_COLUMNS = ["engine", "decode_engine", "decode_tokens_per_s", "decode_tokens_per_s_spread",
                 "time_to_first_token_s", "per_token_latency_ms", "cpu_wall_ratio", "contended"]
ENGINE_COLUMNS = ["variant", "fused_tokens_per_s", "pytorch_tokens_per_s", "fused_over_pytorch", "vs_fp32_fused",
                  "vs_fp32_pytorch"]
AGREEMENT_COLUMNS = ["variant", "identical_steps", "steps", "first_near_tie", "max_logit_error", "bound",
                     "top1_agreement", "agrees"]
SUMMARY_COLUMNS = ["variant", "decode_engine", "file_bytes", "memory_bytes", "quantize_s", "decode_tokens_per_s",
                   "decode_vs_fp32", "decode_vs_bf16", "time_to_first_token_s", "bandwidth_limit_tokens_per_s",
                   "bandwidth_fraction", "perplexity", "perplexity_ratio", "top1_agreement", "kl_divergence"]
HEADLINE_COLUMNS = ["variant", "decode_engine", "decode_tokens_per_s", "decode_vs_fp32", "perplexity_ratio",
                    "top1_agreement"]
CHECK_COLUMNS = ["check", "measured", "met"]
BESIDE_COLUMNS = ["metric", "condition", "document (estimate)", "measured", "unit", "measured row", "verdict"]
SPEED_TARGETS = {8: 1.5, 4: 2.5}  # the decode / fp32 targets by bits
NOT_COMPARABLE = "not comparable: a different model (sizes in GB, ours is 135 M parameters)"
SAMPLE_TOKENS = 24  # tokens of each row's greedy continuation shown as its sample


def load_reference(model: str | None, dtype: str, device: str, num_layers: int | None):
    """The reference model (`load_model`) and its transformers config, cut to its first `num_layers` blocks when
    asked: the real vocabulary and tokenizer with fewer blocks, so a smoke run passes every code path in seconds.
    The config is what the GPTQ-format and size-on-disk checkpoints are written with."""
    lm = load_model(model, dtype, device)
    hf_config = AutoConfig.from_pretrained(lm.checkpoint)
    if num_layers:
        truncated(lm.model, num_layers)
        hf_config = truncated_hf_config(hf_config, num_layers)
    return lm, hf_config


def shipped_gguf(model_name: str, use_gguf_file: bool):
    """The Q4_1 GGUF file the default model ships as, or None (another model, or the row is turned off): that
    file is where the default weights come from, so its row holds exactly those weights."""
    return default_gguf_path() if model_name == DEFAULT_MODEL and use_gguf_file else None


def head_note(include_lm_head: bool, lm_head_bits: int | None) -> str:
    """The suffix of an INT4 row's name when its (tied) lm_head stays at other bits than 4: the names say which
    matrices were rounded to 4 bits, and `reproduction` reads the lm_head's bits back from them."""
    return f", lm_head INT{lm_head_bits}" if include_lm_head and lm_head_bits and lm_head_bits != 4 else ""


def build_variants(base, hf_config, calibration_ids: torch.Tensor, *, rtn_group_sizes: list[int],
                   gptq_group_sizes: list[int], gptq_act_order: bool, include_lm_head: bool, lm_head_bits: int,
                   gguf_file=None, gguf_kinds: list[str] = (), pytorch_kernel_rows: bool = True) -> list[qv.Variant]:
    """Every row of the comparison, made from the loaded fp32 model: dense fp32 / bf16 / 16-bit weights, INT8
    RTN, INT4 RTN per group size (and once with a 4-bit lm_head), INT4 GPTQ per group size, GGUF blocks (the
    shipped file, the `gguf` package's kinds), and INT8 / INT4 RTN on PyTorch's packed kernels where ours run.
    The first row is the fp32 reference. A format the kernels refuse is a row with `skipped` set, not an error;
    each row that ran also gets its size on disk (`measure_file_bytes`)."""
    head = dict(include_lm_head=include_lm_head, lm_head_bits=lm_head_bits)
    note = head_note(include_lm_head, lm_head_bits)
    variants = [qv.dense(base, "fp32", torch.float32), qv.dense(base, "bf16", torch.bfloat16),
                qv.dense_weights(base, SIXTEEN_BIT, torch.bfloat16),
                qv.quantized(base, "INT8 RTN (per channel)", "rtn", bits=8, include_lm_head=include_lm_head)]
    variants += [qv.quantized(base, f"INT4 RTN g{g}{note}", "rtn", bits=4, group_size=g, **head)
                 for g in rtn_group_sizes]
    if note and rtn_group_sizes:  # the same RTN with every layer, the lm_head too, at 4 bits
        variants.append(qv.quantized(base, f"INT4 RTN g{rtn_group_sizes[0]}, lm_head INT4", "rtn", bits=4,
                                     group_size=rtn_group_sizes[0], include_lm_head=include_lm_head, lm_head_bits=4))
    order = " act-order" if gptq_act_order else ""
    variants += [qv.quantized(base, f"INT4 GPTQ g{g}{order}{note}", "gptq", bits=4, group_size=g,
                              calibration_ids=calibration_ids, act_order=gptq_act_order, **head)
                 for g in gptq_group_sizes]
    if gguf_file is not None:
        variants.append(qv.gguf(base, "GGUF Q4_1 (shipped file)", "Q4_1", gguf_path=gguf_file))
    variants += [qv.gguf(base, f"GGUF {kind} (gguf package)", kind, include_lm_head=include_lm_head)
                 for kind in gguf_kinds]
    if pytorch_kernel_rows and cpu_kernels.available():  # the same RTN codes on PyTorch's packed kernels, bf16
        with cpu_kernels.switched_off():
            extra = [qv.quantized(base, "INT8 RTN (per channel), PyTorch kernel", "rtn", bits=8,
                                  include_lm_head=include_lm_head)]
            if rtn_group_sizes:
                extra.append(qv.quantized(base, f"INT4 RTN g{rtn_group_sizes[0]}{note}, PyTorch kernel", "rtn",
                                          bits=4, group_size=rtn_group_sizes[0], **head))
        for v in extra:
            v.method = PYTORCH_KERNEL  # kept out of the acceptance checks and the document's comparison
        variants += extra
    for v in variants:
        qv.measure_file_bytes(v, hf_config)
    return variants


def variants_table(variants: list[qv.Variant]) -> pd.DataFrame:
    """One row per variant (skipped ones included, with why): method, bits, kernel, time to make, bytes on disk,
    in memory and read per decoded token. Saved as `03_quantization_variants`, which 07 reads its recipes from."""
    return pd.DataFrame([v.row() for v in variants])


def variants_view(table: pd.DataFrame) -> pd.DataFrame:
    """The variants table as shown: byte counts in MB."""
    return table.assign(file_MB=table.file_bytes / 1e6, memory_MB=table.memory_bytes / 1e6,
                        read_per_token_MB=table.bytes_read_per_token / 1e6)[VARIANT_COLUMNS]


@dataclass
class RoundTrip:
    """A quantized model written as a GPTQ-format checkpoint and read back: its quantization_config, and whether
    the codes / scales and the logits came back identical."""
    variant: str
    config: dict
    same_codes: bool
    same_logits: bool

    @property
    def exact(self) -> bool:
        return self.same_codes and self.same_logits


def gptq_round_trip(ran: list[qv.Variant], hf_config, tokenizer, probe_ids: torch.Tensor, act_order: bool,
                    device: str = "cpu") -> RoundTrip:
    """Save the first GPTQ row (an RTN one when no GPTQ row ran) in the checkpoint format auto-gptq and
    gptqmodel share, load it back into our decoder, and compare codes, scales and the logits of `probe_ids`
    bit for bit: the format is only useful if nothing moves on the way."""
    variant = next((v for v in ran if v.method == "gptq"), None) or next(v for v in ran if v.method == "rtn")
    with tempfile.TemporaryDirectory() as tmp:
        gptq_format.save_checkpoint(tmp, variant.model, variant.weights, hf_config, tokenizer, desc_act=act_order)
        reloaded, weights, config = gptq_format.load_checkpoint(tmp, device=device)
    probe = probe_ids.reshape(1, -1).to(device)
    with torch.inference_mode():
        positions = torch.arange(probe.shape[1], device=device)
        same_logits = torch.equal(variant.model(probe, positions), reloaded(probe, positions))
    same_codes = all(torch.equal(variant.weights[n].codes.cpu(), weights[n].codes.cpu())
                     and torch.equal(variant.weights[n].scales.cpu(), weights[n].scales.cpu()) for n in weights)
    keys = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
    return RoundTrip(variant.name, {k: config[k] for k in keys}, bool(same_codes), bool(same_logits))


def gptqmodel_status() -> str:
    """Whether gptqmodel (auto-gptq's maintained successor, an optional reference) is installed, and where."""
    spec = importlib.util.find_spec("gptqmodel")
    return f"installed: {spec.origin}" if spec else "not installed: the comparison with gptqmodel did not run"


def quality_table(ran: list[qv.Variant], windows: torch.Tensor) -> pd.DataFrame:
    """Perplexity, top-1 agreement with the reference and KL(reference || variant) of every variant that ran,
    on the same held-out `windows`; the reference is the first row (fp32)."""
    reference = evaluation.log_probs(ran[0].model, windows)
    return pd.DataFrame([{"variant": v.name, **evaluation.compare(reference, evaluation.log_probs(v.model, windows),
                                                                  windows).as_dict()} for v in ran])


@dataclass
class DecodeSpeed:
    """The decode benchmark of every variant: `frame` has one row per timed engine (the PyTorch-engine repeats
    end in PYTORCH_ENGINE) and carries the paired rounds in `attrs["rounds"]`; `engine_of` maps a variant to the
    engine it decoded on; `engine_pairs` are the variants timed on both engines."""
    frame: pd.DataFrame
    engine_of: dict
    engine_pairs: list

    @property
    def main(self) -> pd.DataFrame:
        """The rows of the main comparison (one per variant, on its own engine)."""
        return self.frame[~self.frame.engine.str.endswith(PYTORCH_ENGINE)]

    @property
    def sixteen_bit(self) -> str:
        """The 16-bit row the document's ratios use, on the quantized rows' engine: bf16 weights under fp32
        activations where it runs on fp32's engine, else the bf16 model."""
        return SIXTEEN_BIT if self.engine_of.get(SIXTEEN_BIT) == self.engine_of.get("fp32") else "bf16"


def decode_speed(ran: list[qv.Variant], tokenizer, engine: str, prompt_tokens: int, new_tokens: int, repeats: int,
                 warmup: int, pytorch_engine_rows: bool = True) -> DecodeSpeed:
    """Batch-1 greedy decoding of every variant in paired rounds (`benchmark.compare`), each on `engine` where it
    takes the model. With `pytorch_engine_rows`, fp32, INT8 and INT4 RTN (on the fused engine) are timed once more
    on the PyTorch engine, in a comparison of their own: what a row is interleaved with moves its ratio, and 07
    re-measures these rows exactly as they are timed here (`reproduction`)."""
    engine_of = {v.name: fused_decode.engine_for(v.model, engine) for v in ran}
    models = {v.name: v.model for v in ran}
    engines = {name: benchmark.ours(Decoder(m, tokenizer, cache="static", engine=engine_of[name]))
               for name, m in models.items()}
    pairs = [v.name for v in ran if v.method in ("dense", "rtn") and engine_of[v.name] == "fused"
             and (v.name == "fp32" or v.bits in (8, 4))][:3] if pytorch_engine_rows else []
    frame = benchmark.compare(engines, [prompt_tokens], new_tokens, tokenizer, repeats, warmup)
    if pairs:
        pytorch = {name + PYTORCH_ENGINE: benchmark.ours(Decoder(models[name], tokenizer, cache="static"))
                   for name in pairs}
        apart = benchmark.compare(pytorch, [prompt_tokens], new_tokens, tokenizer, repeats, warmup)
        both = [frame.attrs["rounds"], apart.attrs["rounds"]]  # each run's arms pair within that run
        frame = pd.concat([frame, apart], ignore_index=True)
        frame.attrs["rounds"] = merge_rounds(both)
    frame["decode_engine"] = [engine_of.get(e, "pytorch") for e in frame.engine]
    return DecodeSpeed(frame, engine_of, pairs)


def engine_table(speed: DecodeSpeed) -> pd.DataFrame:
    """Decode tokens/s of the same models on the fused and the PyTorch engine, and each one's gain over fp32 on
    each engine (NaN without an fp32 pair); empty when no variant ran on both engines."""
    rate = speed.frame.set_index("engine")[METRIC]
    fp32 = "fp32" in speed.engine_pairs
    rows = [{"variant": name, "fused_tokens_per_s": rate[name], "pytorch_tokens_per_s": rate[name + PYTORCH_ENGINE],
             "fused_over_pytorch": rate[name] / rate[name + PYTORCH_ENGINE],
             "vs_fp32_fused": rate[name] / rate["fp32"] if fp32 else math.nan,
             "vs_fp32_pytorch": rate[name + PYTORCH_ENGINE] / rate["fp32" + PYTORCH_ENGINE] if fp32 else math.nan}
            for name in speed.engine_pairs]
    return pd.DataFrame(rows, columns=ENGINE_COLUMNS)


def no_engine_pair_note(engine: str, device: str) -> str:
    """What the engine section says when no variant ran on both engines."""
    return (f"No engine pair in this run: the fused engine did not run (engine={engine!r}, device={device!r}; it "
            f"runs fp32 and int8/int4 decode steps on a CPU with llmopt's kernels), so every row above is the "
            f"PyTorch engine.")


def engine_agreement(ran: list[qv.Variant], tokenizer, engine_pairs: list[str], prompt_tokens: int,
                     new_tokens: int) -> pd.DataFrame:
    """The ISA-independent agreement rule (`llmopt.engine.agreement`) between the PyTorch and the fused engine,
    per variant of `engine_pairs`: both teacher-forced on the PyTorch engine's greedy tokens. The bound is the
    fp32 summation error, except for INT4, whose int8 activation codes a last-bit difference can move: there it
    is twice what that rounding itself perturbs the model."""
    prompt_ids = benchmark.prompt_of_length(tokenizer, prompt_tokens)
    models = {v.name: v for v in ran}
    rows = []
    for name in engine_pairs:
        variant = models[name]
        expected = agreement.Reference.of(agreement.of_decoder(Decoder(variant.model, tokenizer)), prompt_ids,
                                          new_tokens)
        bound = (2 * agreement.activation_quantization_error(variant.model, prompt_ids, expected.tokens)
                 if variant.bits == 4 else agreement.TOLERANCE)
        result = expected.against(agreement.of_decoder(Decoder(variant.model, tokenizer, engine="fused")), bound)
        rows.append({"variant": name, "identical_steps": result.identical_steps, "steps": result.steps,
                     "first_near_tie": result.first_near_tie, "max_logit_error": result.max_relative_error,
                     "bound": bound, "top1_agreement": result.top1_agreement, "agrees": result.agrees})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def results_with_roof(table: pd.DataFrame, quality: pd.DataFrame, speed: DecodeSpeed, probe_bytes_per_s: float,
                      tokenizer) -> tuple[pd.DataFrame, float, str]:
    """One row per variant that ran: its make-up, quality and speed, the bandwidth limit of its decode (read
    bandwidth / bytes read per token; the roof is the probe's, or what a measured row proves if higher), the
    share of it reached, decode and memory against fp32 and the 16-bit row, and a sample of its greedy tokens.
    Returns (results, roof bytes/s, where the roof came from). Saved as `03_quantization`."""
    results = (table[table.skipped == ""].merge(quality, on="variant")
               .merge(speed.main.rename(columns={"engine": "variant"}), on="variant"))
    read_bw, source = roof(probe_bytes_per_s, results.bytes_read_per_token, results[METRIC])
    results["bandwidth_limit_tokens_per_s"] = [decode_limit_tokens_per_s(b, read_bw)
                                               for b in results.bytes_read_per_token]
    results["bandwidth_fraction"] = results[METRIC] / results.bandwidth_limit_tokens_per_s
    base = results.set_index("variant")
    sixteen = speed.sixteen_bit
    results["decode_vs_fp32"] = results[METRIC] / base.loc["fp32", METRIC]
    results["decode_vs_bf16"] = results[METRIC] / base.loc[sixteen, METRIC]
    results["memory_vs_bf16"] = results.memory_bytes / base.loc[sixteen, "memory_bytes"]
    results["sample"] = [tokenizer.decode(ids[:SAMPLE_TOKENS]) for ids in results.token_ids]
    return results, read_bw, source


def summary_view(results: pd.DataFrame) -> pd.DataFrame:
    """The results as shown: the summary columns, byte counts in MB."""
    summary = results[SUMMARY_COLUMNS]
    return summary.assign(file_bytes=summary.file_bytes / 1e6, memory_bytes=summary.memory_bytes / 1e6).rename(
        columns={"file_bytes": "file_MB", "memory_bytes": "memory_MB"})


def acceptance_checks(results: pd.DataFrame) -> pd.DataFrame:
    """The issue's targets, per row: INT8 / INT4 decode >= 1.5x / 2.5x fp32 (RTN, GPTQ and GGUF rows on our
    kernels), INT8 RTN perplexity within 1 % of fp32, GPTQ within 10 %, and GPTQ below the RTN row of the same
    group size and lm_head. Nothing is asserted: `met` says whether each target was reached."""
    by_name = results.set_index("variant")
    checks = []
    for name, r in by_name.iterrows():
        if r.method in ("rtn", "gptq", "gguf") and r.bits in SPEED_TARGETS:
            target = SPEED_TARGETS[int(r.bits)]
            checks.append({"check": f"{name}: decode / fp32 >= {target}", "measured": r.decode_vs_fp32,
                           "met": r.decode_vs_fp32 >= target})
        if r.method == "rtn" and r.bits == 8:
            checks.append({"check": f"{name}: perplexity within 1 % of fp32", "measured": r.perplexity_ratio,
                           "met": r.perplexity_ratio <= 1.01})
        if r.method == "gptq":
            checks.append({"check": f"{name}: perplexity within 10 % of fp32", "measured": r.perplexity_ratio,
                           "met": r.perplexity_ratio <= 1.10})
            rtn = name.replace("GPTQ", "RTN").replace(" act-order", "")  # same group size and lm_head
            if rtn in by_name.index:
                rtn_perplexity = by_name.loc[rtn, "perplexity"]
                checks.append({"check": f"{name}: perplexity below {rtn}'s", "measured": r.perplexity / rtn_perplexity,
                               "met": r.perplexity < rtn_perplexity})
    return pd.DataFrame(checks, columns=CHECK_COLUMNS)


def int8_row(results: pd.DataFrame) -> pd.Series | None:
    """The INT8 row the document's INT8 figures and the headline use: RTN per channel on our kernels."""
    rows = results[(results.method == "rtn") & (results.bits == 8)]
    return rows.iloc[0] if len(rows) else None


def int4_row(results: pd.DataFrame) -> pd.Series | None:
    """The INT4 row of the document's figures and the headline: the best perplexity among the INT4 rows quantized
    here (RTN / GPTQ on our kernels). Not the shipped Q4_1 file: the default weights come from it, so it would be
    trivially exact."""
    rows = results[(results.bits == 4) & results.method.isin(["rtn", "gptq"])]
    return rows.loc[rows.perplexity.idxmin()] if len(rows) else None


def speed_interval(speed_frame: pd.DataFrame, variant: str, baseline: str, prompt_tokens: int,
                   point: float) -> stats.Interval:
    """decode tokens/s of `variant` over `baseline` with its 95 % interval from their paired rounds (geometric
    mean of the per-round ratios); `point` as a one-round Interval where the frame carries no paired rounds."""
    return stats.interval_from_columns(benchmark.paired(speed_frame, METRIC, variant, baseline, prompt_tokens),
                                       f"{METRIC} / {baseline}", point)


def beside_document(results: pd.DataFrame, speed_frame: pd.DataFrame, sixteen: str, prompt_tokens: int,
                    estimates: pd.DataFrame | None = None) -> pd.DataFrame:
    """The design document's FP16 -> INT8 -> INT4 estimates beside ours: sizes (shown, not comparable: another
    model), memory reduction and speedup against the 16-bit row `sixteen`, accuracy as top-1 agreement with the
    fp32 model. Speedups are timed, so their verdict takes the paired-round interval (`stats.estimate_verdict`;
    one round is inconclusive); byte counts and agreement are deterministic and take a point verdict."""
    estimates = datasets.estimates("quantization") if estimates is None else estimates
    base = results[results.variant == sixteen].iloc[0]
    picked = {"FP16": base, "INT8": int8_row(results), "INT4": int4_row(results)}
    rows = []
    for _, e in estimates.iterrows():
        row = picked[e.condition]
        value, verdict = math.nan, "no such row measured"
        if row is not None and e.metric == "speedup":
            interval = speed_interval(speed_frame, row.variant, sixteen, prompt_tokens, row.decode_vs_bf16)
            value, verdict = row.decode_vs_bf16, stats.estimate_verdict(interval, e.low, e.high)
        elif row is not None:
            value = {"model_size": row.memory_bytes / 1e9, "memory_reduction": base.memory_bytes / row.memory_bytes,
                     "accuracy": 100 * row.top1_agreement}[e.metric]
            verdict = datasets.verdict(value, e.low, e.high)
        rows.append({"metric": e.metric, "condition": e.condition, "document (estimate)": e.document_text,
                     "measured": value, "unit": e.unit, "measured row": "" if row is None else row.variant,
                     "verdict": NOT_COMPARABLE if e.metric == "model_size" else verdict})
    return pd.DataFrame(rows, columns=BESIDE_COLUMNS)


def headline(results: pd.DataFrame, speed_frame: pd.DataFrame, checks: pd.DataFrame, round_trip_exact: bool,
             prompt_tokens: int) -> tuple[str, str]:
    """The notebook's key figure and verdict for the report index: INT8 and the chosen INT4 row's decode speed
    over fp32 with their paired-round 95 % intervals, the INT4 row's tokens/s and share of the bandwidth limit,
    both perplexity changes; then how many acceptance checks were met and whether the GPTQ round trip was exact."""
    int8, int4 = int8_row(results), int4_row(results)
    speeds = [f"{label} {speed_interval(speed_frame, row.variant, 'fp32', prompt_tokens, row.decode_vs_fp32).text()}"
              if row is not None else f"no {label} row"
              for label, row in (("INT8", int8), ("INT4" if int4 is None else int4.variant, int4))]
    key = " and ".join(speeds) + " fp32 decode"
    if int4 is not None:
        key += (f" ({int4.decode_tokens_per_s:.1f} tok/s, {int4.bandwidth_fraction:.0%} of the bandwidth limit, "
                f"{int4.decode_engine} engine)")
    key += "; perplexity " + " / ".join(f"{row.perplexity_ratio - 1:+.1%}" for row in (int8, int4) if row is not None)
    verdict = (f"{int(checks.met.sum())}/{len(checks)} acceptance checks met; GPTQ-format round trip bit-exact: "
               f"{round_trip_exact}")
    return key, verdict
