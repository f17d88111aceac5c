"""The experiment of notebook 07: the optimizations stacked on one workload, peers beside them, the ranking measured.

`combined` holds the building blocks (a `Stack` of optimizations, the `StackRunner`, `measure`, `cumulative`); this
module holds the experiment the notebook runs with them, step by step: the configurations and peers, the
equivalence check of the stacks, the re-run in the measured best order, batching on the stacked model, the peer
table, the ranking by gain per line of code, the estimate-against-measurement rows of notebooks 01-06 and the
headline. The notebook only sets parameters, calls these steps and shows their tables.

The workload is a chat / RAG turn: the document's shared prefix (system message and demonstrations) and a user
turn that quotes a passage, with answers of a realistic length. A server that has seen earlier users holds the
shared prefix already, so the prompt-caching stacks start every run with it cached (`combined.StackRunner`'s
`shared_prefix`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from transformers import AutoModelForCausalLM

from ..engine import batching, fused_decode
from ..engine.batching import Request
from ..engine.loading import default_gguf_path
from ..engine.quantization import group_size_for, quantize_model
from . import benchmark, combined, datasets, harness, reproduction, stats
from . import peers as peer_engines

LLAMA_CPP_MODEL = "SmolLM2-135M-Instruct"  # the shipped GGUF file (`default_gguf_path`) holds this model
NOTEBOOKS = ("01_kv_cache", "02_batching", "03_quantization", "04_prompt_caching", "05_flash_attention",
             "06_speculative_decoding")  # the notebooks whose estimate-against-measurement rows 07 collects
BATCH_PROMPT_TOKENS = 64  # each batched request keeps the last tokens of its prompt (no prefix cache in batching)
PEER_RATIO = "ours / this engine (decode tok/s)"
RANKING_COLUMNS = ["measured_rank", "optimization", "measured_gain_x", "gain_low", "gain_high", "gain_rounds",
                   "lines_of_code", "gain_per_kloc", "document_rank", "estimated_impact", "document_complexity",
                   "workload"]
HEADLINE_RANKING = ["measured_rank", "optimization", "measured_gain_x", "gain_low", "gain_high", "document_rank"]


@dataclass
class Workload:
    """The stacked workload: its prompts, how many leading tokens they share, and the tokens each answer has."""
    prompts: list[list[int]]
    shared_tokens: int
    new_tokens: int

    @property
    def label(self) -> str:
        """E.g. '1 request × 314 prompt tokens (250 shared, cached for prompt caching) → 32 new tokens': what a
        ratio was measured on."""
        lengths = sorted({len(p) for p in self.prompts})
        tokens = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        n = len(self.prompts)
        return (f"{n} request{'' if n == 1 else 's'} × {tokens} prompt tokens ({self.shared_tokens} shared, cached for "
                f"prompt caching) → {self.new_tokens} new tokens")


@dataclass
class Setup:
    """What every section uses: the runner of the stacks, the workload, the extensions measured (the fused decode
    step where it runs), the quantized variant's name as 03 names it and how the prompts were built."""
    runner: combined.StackRunner
    workload: Workload
    extensions: list[str]
    quant_variant: str
    prompt_args: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _quantize(model, bits: int, group: int | None):
    quantize_model(model, "rtn", bits=bits, group_size=None if bits == 8 else group, lm_head_bits=8)
    return model


def prepare(lm, *, quantization_bits: int, speculative_k: int, requests: int, passage_tokens: int,
            system_tokens: int, demonstration_tokens: int, new_tokens: int) -> Setup:
    """The runner and workload of the stacks. Quantization is RTN: INT8 per channel, or INT4 group-wise (g64,
    or the largest group every width takes) with an INT8 lm_head, the shape of llama.cpp's Q4_1 file."""
    group = group_size_for(lm.model, 64)
    shared = combined.shared_prefix(lm.tokenizer, system_tokens, demonstration_tokens)
    runner = combined.StackRunner(lm.model, lm.tokenizer, k=speculative_k, shared_prefix=shared,
                                  quantize=functools.partial(_quantize, bits=quantization_bits, group=group))
    prompt_args = dict(passage_tokens=passage_tokens, system_tokens=system_tokens,
                       demonstration_tokens=demonstration_tokens)
    prompts = combined.workload_prompts(lm.tokenizer, requests, **prompt_args)
    fused_reason = fused_decode.supported(lm.model)
    variant = "INT8 RTN (per channel)" if quantization_bits == 8 else f"INT4 RTN g{group}, lm_head INT8"
    notes = [f"fused decode step: not measured ({fused_reason})"] if fused_reason else []
    return Setup(runner, Workload(prompts, len(shared), new_tokens), [] if fused_reason else list(combined.EXTENSIONS),
                 variant, prompt_args, notes)


def stack_configurations(runner: combined.StackRunner, stacks: dict[str, combined.Stack]) -> dict:
    """One `combined.measure` configuration per stack: a function (prompts, new_tokens) -> generations."""
    return {name: functools.partial(runner.run, stack) for name, stack in stacks.items()}


def _each_prompt(engine, prompts, new_tokens):
    return [engine(p, new_tokens) for p in prompts]


def llama_cpp_usable(lm, peers: bool, llama_cpp: bool) -> bool:
    """llama.cpp runs as a peer when asked, installed (`make peers`) and the model is the one its GGUF file holds."""
    return peers and llama_cpp and peer_engines.llama_cpp_available() and lm.name == LLAMA_CPP_MODEL


def peer_configurations(lm, speculative_k: int, threads: int, peers: bool, llama_cpp: bool) -> tuple[dict, str]:
    """The peer engines measured in the same rounds as the stacks, and a note on what was left out and why.

    transformers runs with its prompt lookup (the same k): the counterpart of our fastest stacks, and faster than
    its plain cached generate, which 00 and 01 measure; llama.cpp where `llama_cpp_usable`."""
    if not peers:
        return {}, "peers: not measured (peers=False)"
    hf_model = AutoModelForCausalLM.from_pretrained(lm.checkpoint, dtype=lm.dtype).to(lm.device).eval()
    engine = benchmark.transformers_generate(hf_model, use_cache=True, prompt_lookup_num_tokens=speculative_k)
    configurations = {"transformers (prompt lookup)": functools.partial(_each_prompt, engine)}
    if not llama_cpp_usable(lm, peers, llama_cpp):
        return configurations, ("llama.cpp: not measured (llama_cpp=False, llama-cpp-python is not installed: "
                                "`make peers`, or not the default model)")
    llama = peer_engines.llama_cpp_engine(default_gguf_path(), threads)
    return {**configurations, "llama.cpp (Q4_1 GGUF)": functools.partial(_each_prompt, llama)}, ""


def document_order(setup: Setup) -> dict[str, combined.Stack]:
    """The stacks of the document's priority order, then the extensions (not in the document) on top."""
    return combined.stacks_in_order(list(combined.DOCUMENT_ORDER) + setup.extensions)


def measure_stacks(setup: Setup, stacks: dict[str, combined.Stack], others: dict, repeats: int,
                   warmup: int) -> pd.DataFrame:
    """The stacks (and `others`, e.g. peers) on the workload in the same paired rounds (`combined.measure`);
    what the stacks need once (the quantized copy, the cached shared prefix) is made before any timing."""
    setup.runner.prepare(stacks.values())
    configurations = {**stack_configurations(setup.runner, stacks), **others}
    return combined.measure(configurations, setup.workload.prompts, setup.workload.new_tokens, repeats, warmup)


def equivalence(run: pd.DataFrame, stacks: dict[str, combined.Stack], dtype) -> pd.DataFrame:
    """Each stack's greedy tokens against the baseline's: lossless stacks must give them exactly (in fp32 an
    AssertionError names the stacks that do not: `benchmark.check_lossless`); a quantized stack's share of
    agreeing tokens is reported."""
    tokens = run.set_index("configuration").token_ids
    base = tokens["baseline"]
    frame = pd.DataFrame([{"configuration": name, "lossless": stack.lossless, "tokens identical": tokens[name] == base,
                           "token agreement": combined.tokens_agree(tokens[name], base)}
                          for name, stack in stacks.items()],
                         columns=["configuration", "lossless", "tokens identical", "token agreement"])
    changed = frame[frame.lossless & ~frame["tokens identical"].astype(bool)].configuration.tolist()
    benchmark.check_lossless(not changed, dtype, f"a lossless stack changed the tokens: {changed}")
    return frame


def steps(run: pd.DataFrame, stacks: dict[str, combined.Stack], order: list[str], rounds=None) -> pd.DataFrame:
    """The waterfall of one order (`combined.cumulative`) with the optimization each step adds."""
    table = combined.cumulative(run, [name for name in stacks if name != "baseline"], rounds=rounds)
    table.insert(0, "optimization", ["baseline"] + list(order))
    return table


def step_gains(table: pd.DataFrame) -> dict[str, float]:
    """optimization -> its step's workload speedup (ratio of medians) in a `steps` table."""
    return dict(zip(table.optimization[1:], table.step_speedup[1:]))


@dataclass
class BestOrder:
    """The optimizations re-ordered by their measured step gain: the order, its stacks, which of them were
    measured again (those the document's order did not pass through), their rows and rounds, the waterfall and
    the equivalence check of the new stacks."""
    order: list[str]
    stacks: dict[str, combined.Stack]
    new: list[str]
    run: pd.DataFrame
    rounds: list
    steps: pd.DataFrame
    equivalence: pd.DataFrame


def best_order(setup: Setup, document_run: pd.DataFrame, document_stacks: dict, document_steps: pd.DataFrame,
               repeats: int, warmup: int, dtype) -> BestOrder:
    """Re-order by measured step gain (`combined.best_order`: KV-cache dependents after the cache) and measure
    the stacks that order passes through and the document's did not, in rounds of their own. Their ratios against
    stacks of the first run get no interval (different rounds are not paired); the others keep theirs."""
    order = combined.best_order(step_gains(document_steps))
    stacks = combined.stacks_in_order(order)
    new = {name: stack for name, stack in stacks.items() if name not in document_stacks}
    parts, rounds = [document_run[document_run.configuration.isin(list(stacks))]], [document_run.attrs.get("rounds")]
    if new:
        new_run = measure_stacks(setup, new, {}, repeats, warmup)
        parts.append(new_run)
        rounds.append(new_run.attrs.get("rounds"))
    run = pd.concat(parts, ignore_index=True)
    run.attrs = {}  # rows of two runs: their rounds stay apart, in `rounds`
    checks = equivalence(run, new, dtype)
    return BestOrder(order, stacks, list(new), run, rounds, steps(run, stacks, order, rounds), checks)


def batching_on_stack(setup: Setup, gains: dict[str, float], concurrency: int, new_tokens: int,
                      dtype) -> tuple[pd.DataFrame, float]:
    """Throughput of `concurrency` simultaneous user turns, sequential against continuous batching, on the stacked
    model (KV cache, SDPA, quantization where its step gained). One run each: the gain has no interval. Each
    request keeps its prompt's last `BATCH_PROMPT_TOKENS` tokens (batching takes no prefix cache).

    Unquantized, batching is lossless and the tokens must be identical. Quantized, the batch runs the int4/int8
    kernels' many-row path and a single request their one-row path: two kernels for one function, whose last-bit
    differences may flip a near-tie (`engine.agreement`), so the share of agreeing tokens is reported instead."""
    quantized = gains.get("quantization", 0) > 1.0
    model = setup.runner.model_for(combined.Stack(kv_cache=True, quantization=quantized))
    model.set_attention("sdpa")
    prompts = combined.workload_prompts(setup.runner.tokenizer, concurrency, **setup.prompt_args)
    requests = [Request(i, list(p[-BATCH_PROMPT_TOKENS:]), new_tokens, 0.0) for i, p in enumerate(prompts)]
    rows = []
    for scheduler in ("sequential", "continuous"):
        result = batching.run(scheduler, model, requests, max_batch=concurrency, eos_token_ids=[],
                              tokenizer=setup.runner.tokenizer)
        rows.append({**result.stats(), "tokens": result.tokens})
    frame = pd.DataFrame(rows)
    sequential, continuous = frame.tokens.iloc[0], frame.tokens.iloc[1]
    frame["quantized"] = quantized
    frame["token_agreement_with_sequential"] = combined.tokens_agree(
        [sequential[i] for i in sorted(sequential)], [continuous.get(i, []) for i in sorted(sequential)])
    if not quantized:
        benchmark.check_lossless(sequential == continuous, dtype, "continuous batching changed the tokens")
    return frame, float(frame.tokens_per_s.iloc[1] / frame.tokens_per_s.iloc[0])


def batching_label(concurrency: int, new_tokens: int) -> str:
    """The workload of `batching_on_stack`, in the words of `Workload.label`."""
    return (f"{concurrency} concurrent requests × {BATCH_PROMPT_TOKENS} prompt tokens → {new_tokens} new tokens "
            "(one run, no interval)")


def reference_dir(reference_results: str | None) -> Path:
    """Where the notebooks' results are read: `reference_results`, else this run's results when 00-06 ran in it
    (a run of the whole suite), else the published data/results."""
    if reference_results:
        return Path(reference_results)
    this_run = harness.results_dir()
    return this_run if any(this_run.glob("headline_0[0-6]_*.json")) else harness.DEFAULT_RESULTS_DIR


def reproduce(reference: Path, lm, dtype, quant_variant: str, concurrency: int, margin: float,
              shrink: bool = False) -> pd.DataFrame:
    """Each optimization alone, measured again as its own notebook measured it (`reproduction.reproduce`, at the
    condition read from `reference`), and the equivalence test of rerun against notebook at `margin`; `shrink`:
    the same conditions cut to a few tokens (`reproduction.tiny`, smoke runs)."""
    conditions = reproduction.notebook_conditions(reference, lm.name, dtype, quant_variant, concurrency)
    return reproduction.reproduce(reproduction.tiny(conditions) if shrink else conditions, lm.model, lm.tokenizer,
                                  margin)


def reproduction_summary(table: pd.DataFrame, margin: float) -> str:
    """The tally of the equivalence outcomes, and each row's smallest margin its rounds' noise allows."""
    tally = reproduction.counts(table)
    noise = table.dropna(subset=["noise_margin"])
    floors = ", ".join(f"{r.optimization} {r.noise_margin:.0%}" for r in noise.itertuples())
    return (f"rerun against notebook within ±{margin:.0%} (fixed in advance): {reproduction.counts_text(tally)} "
            f"(of {tally['total']}; re-measured in {table.measure_s.sum():.0f} s); the smallest margin the rounds' "
            f"noise allows (stats.margin_from_noise): {floors or 'none (no row has 2 rounds on both sides)'}")


def marginal(document_run: pd.DataFrame, document_stacks: dict, batching_gain: float,
             reproduced: pd.DataFrame) -> pd.DataFrame:
    """Each document step's marginal effect inside the stack, beside its single effect re-measured
    (`reproduction.marginal_effects`)."""
    labels = dict(zip(combined.DOCUMENT_ORDER, list(document_stacks)[1:]))
    return reproduction.marginal_effects(document_run, list(combined.DOCUMENT_ORDER), labels, batching_gain,
                                         reproduced)


def peer_table(runs: list[pd.DataFrame], ours: list[str], rounds: list) -> pd.DataFrame:
    """Our fastest-decoding stack of the run the peers ran in (`runs[0]`; of `ours`) against every other
    configuration measured: decode tokens/s, time to first token, workload time and ours / peer on decode
    tokens/s, with its paired-round interval (`rounds`: the runs' `rounds.Rounds`; the peers and our stack ran in
    the same rounds, so the ratio pairs; a stack of a later run would not)."""
    table = pd.concat(runs).drop_duplicates("configuration").set_index("configuration")
    mine = [name for name in runs[0].configuration if name in ours]
    best = table.loc[mine].decode_tokens_per_s.idxmax()
    rows = []
    for name in [best] + [name for name in table.index if name not in ours]:
        row = table.loc[name]
        rows.append({"engine": f"llmopt: {name}" if name == best else name,
                     "decode_tokens_per_s": row.decode_tokens_per_s,
                     "time_to_first_token_s": row.time_to_first_token_s, "workload_s": row.workload_s,
                     PEER_RATIO: table.loc[best, "decode_tokens_per_s"] / row.decode_tokens_per_s,
                     **combined.paired_rounds(rounds, PEER_RATIO, best, name, "decode_tokens_per_s")})
    return pd.DataFrame(rows)


def formats(lm, use_llama_cpp: bool, threads: int, prompt_tokens: int, new_tokens: int,
            repeats: int) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Format to format against llama.cpp (`combined.format_engines`, `format_table`): the rows, the table and a
    note. Without llama.cpp there is nothing to compare our formats with (03 compares them with each other), so
    nothing is measured and both frames are empty."""
    if not use_llama_cpp:
        return pd.DataFrame(), pd.DataFrame(), "format to format: not measured (needs llama.cpp, see the peers)"
    rows = benchmark.compare(combined.format_engines(lm.model, lm.tokenizer, default_gguf_path(), threads),
                             [prompt_tokens], new_tokens, lm.tokenizer, repeats, 1)
    return rows, combined.format_table(rows), ""


def ranking(table: pd.DataFrame, batching_gain: float, extensions: list[str], workload: str,
            batch_workload: str) -> pd.DataFrame:
    """The document's priority ranking rewritten from measurement: each optimization's measured gain (its step
    in the document's order, `table` a `steps` table: the geometric mean of its paired rounds, the estimate its
    interval is about; batching: its throughput gain), that interval, lines of code of its modules
    (`combined.module_lines`), gain per kloc ((gain - 1) per 1000 lines) and the rank by it; `workload` /
    `batch_workload` say what each gain was measured on."""
    ranked = datasets.priority_ranking().rename(columns={"rank": "document_rank", "complexity": "document_complexity"})
    ranked = pd.concat([ranked, pd.DataFrame([{"optimization": name, "estimated_impact": "not in the document"}
                                              for name in extensions])], ignore_index=True)
    by = table.set_index("optimization")

    def gain(name):  # the paired rounds' geometric mean, as its interval; the ratio of medians without rounds
        rounds, geomean = by.get("step_speedup_rounds", {}).get(name, 0), by.get("step_speedup_geomean", {}).get(name)
        return geomean if rounds and rounds >= 2 and geomean == geomean else by.loc[name, "step_speedup"]

    gains = {name: (gain(name), by.get("step_speedup_low", {}).get(name, math.nan),
                    by.get("step_speedup_high", {}).get(name, math.nan),
                    by.get("step_speedup_rounds", {}).get(name, 0)) for name in by.index[1:]}
    gains["batching"] = (batching_gain, math.nan, math.nan, 1)
    for i, column in enumerate(("measured_gain_x", "gain_low", "gain_high", "gain_rounds")):
        ranked[column] = ranked.optimization.map({name: values[i] for name, values in gains.items()})
    ranked["lines_of_code"] = ranked.optimization.map(combined.module_lines)
    ranked["gain_per_kloc"] = (ranked.measured_gain_x - 1) / (ranked.lines_of_code / 1000)
    ranked["measured_rank"] = ranked.gain_per_kloc.rank(ascending=False, method="min").astype("Int64")
    ranked["workload"] = [batch_workload if name == "batching" else workload for name in ranked.optimization]
    return ranked.sort_values("measured_rank")[RANKING_COLUMNS].reset_index(drop=True)


def vs_document(directory: Path) -> pd.DataFrame:
    """Every section's estimate against its measurement: the rows notebooks 01-06 saved
    (`harness.read_vs_document`), and for each of them that saved none a row that says so."""
    table = harness.read_vs_document(directory)
    saved = set(table.notebook)
    missing = pd.DataFrame([{"notebook": name, "quantity": "not run", "document (estimate)": "", "measured": "",
                             "verdict": f"no {name}{harness.VS_DOCUMENT_SUFFIX}.csv in {directory}"}
                            for name in NOTEBOOKS if not any(s.startswith(name[:3]) for s in saved)],
                           columns=table.columns)
    both = pd.concat([table, missing], ignore_index=True) if len(table) and len(missing) else (
        table if len(table) else missing)
    return both.sort_values("notebook", kind="stable").reset_index(drop=True)


def speedup(table: pd.DataFrame, optimization: str | None = None) -> stats.Interval:
    """The cumulative speedup of one step of a `steps` table (default: its last) with its paired-round interval
    (a one-round Interval where the rounds give none)."""
    row = table.iloc[-1] if optimization is None else table.set_index("optimization").loc[optimization]
    return stats.interval_from_columns(row, "cumulative_speedup", row["cumulative_speedup"])


def headline(document_steps: pd.DataFrame, best_steps: pd.DataFrame, peers: pd.DataFrame, format_table: pd.DataFrame,
             checks: list[pd.DataFrame], reproduced: pd.DataFrame, margin: float, extensions: list[str],
             workload: str) -> tuple[str, str]:
    """The key figure and the verdict of the headline. Key figure: the workload, the stacked speedup in the
    document's order (and with the extensions), in the measured order, ours / the fastest peer and, with
    llama.cpp, format to format; each with its 95% interval and round count where the rounds give one. Verdict:
    the equivalence of the lossless stacks (`checks`: the `equivalence` frames) and the tally of the reproduction
    test."""
    text = (f"{workload}: {speedup(document_steps, combined.DOCUMENT_ORDER[-1]).text(digits=1)} workload speedup "
            "stacked in the document's order")
    if extensions:
        text += f" ({speedup(document_steps).text(digits=1)} with the fused decode step)"
    text += f"; {speedup(best_steps).text(digits=1)} in the measured order"
    if len(peers) > 1:
        peer = peers.iloc[1:].sort_values("decode_tokens_per_s").iloc[-1]
        text += f"; ours / {peer.engine} decode tok/s {stats.interval_from_columns(peer, PEER_RATIO).text()}"
    if "decode_ours_over_llama_cpp" in format_table:
        pairs = format_table.dropna(subset=["decode_ours_over_llama_cpp"])
        text += "; format to format, decode: " + ", ".join(
            f"{r.ours} / {r['llama.cpp']} {stats.interval_from_columns(r, 'decode_ours_over_llama_cpp').text()}"
            for _, r in pairs.iterrows())
    changed = [name for frame in checks for name in
               frame[frame.lossless.astype(bool) & ~frame["tokens identical"].astype(bool)].configuration]
    verdict = "lossless stacks token-identical to the baseline" if not changed else f"MISMATCH: {changed}"
    verdict += (f"; single effects re-measured against their notebook (equivalence within ±{margin:.0%}): "
                + reproduction.counts_text(reproduction.counts(reproduced)))
    return text, verdict


def waterfall(ax, table: pd.DataFrame, title: str) -> None:
    """Cumulative speedup per step of a `steps` table on `ax`: bars at the paired-round geometric mean (the ratio
    of medians where a step has no rounds), with the 95% interval as error bars where it has one."""
    labels = ["baseline"] + [combined.LABELS[o] for o in table.optimization[1:]]
    has = table.cumulative_speedup_rounds.fillna(0) >= 2
    height = table.cumulative_speedup_geomean.where(has, table.cumulative_speedup)
    x = list(range(len(table)))
    ax.bar(x, height, color="steelblue", label="cumulative speedup (geometric mean of paired rounds)")
    if has.any():
        low, high = table.cumulative_speedup_low[has], table.cumulative_speedup_high[has]
        ax.errorbar([i for i in x if has.iloc[i]], height[has],
                    yerr=[(height[has] - low).clip(lower=0), (high - height[has]).clip(lower=0)], fmt="none",
                    ecolor="black", capsize=4, label="95% interval over the paired rounds")
    top = table.cumulative_speedup_high.where(has, height).fillna(height)
    for i, value, above in zip(x, height, top):
        ax.text(i, max(value, above), f"{value:.1f}x", ha="center", va="bottom")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(xlabel="configuration (each adds one optimization)", ylabel="speedup over the baseline (x, workload time)")
    ax.set_title(title, pad=42)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize="small")  # above the bars, under the title


def save(device, extra: dict, *, document_run, best, batch_frame, peers, format_rows, ranked, reproduced, marginal,
         key_figure: str, verdict: str, figure, figure_name: str) -> None:
    """Write 07's results files, then its headline, then the README's waterfall figure (`figure_name`) last, so a
    run that failed before the end leaves neither the headline nor the figure behind."""
    results = {"07_combined_document_order": document_run.drop(columns="token_ids"),
               "07_combined_best_order": best.run.drop(columns="token_ids"),
               "07_combined_batching": batch_frame.drop(columns="tokens"), "07_combined_peers": peers,
               "07_combined_formats": format_rows.drop(columns="token_ids", errors="ignore"),
               "07_combined_ranking": ranked, "07_combined_reproduction": reproduced,
               "07_combined_marginal": marginal}
    for name, frame in results.items():
        harness.save_results(frame, name, device, extra)
    harness.save_headline("07_combined", "All optimizations stacked", key_figure, verdict,
                          ranked[HEADLINE_RANKING].round(2), device=device)
    figure.savefig(harness.results_dir() / figure_name, dpi=100)
