"""Command line: `llmopt run` (the suite), `llmopt params` (the notebooks' parameters), `llmopt compare` (runs side by
side), `llmopt generate` (one prompt), `llmopt prepare` (default model)."""
from __future__ import annotations

import argparse
import sys
import time

from .errors import LLMOptError

RUN_EPILOG = """\
Each run writes into its own folder, runs/<UTC timestamp>-<host>/: the executed notebooks and their HTML
reports, index.html, results/ (tidy CSV, headline records), environment.json, parameters.json and summary.json.
A complete default run (every notebook, no -p, no --smoke) is also published to reports/, data/results/ and the
README's headline; --publish publishes any other run except a smoke run.

Parameters (-p name=value) are checked before anything runs: an unknown name, a value that does not read as
its type or one out of range stops the run with exit status 2. A value is a Python literal ([8, 16], 0.5,
True, None); a string may be written bare (-p model=/path/to/checkpoint). `llmopt params [NOTEBOOK ...]` lists
each notebook's parameters with their defaults, allowed values, smoke values and help.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks with papermill into a run folder (runs/...)",
                         description="Execute notebooks headless into a new run folder and report as they go.",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("notebooks", nargs="*", help="names or prefixes (default: all), e.g. 00 01_kv_cache")
    run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                     help="a notebook parameter (repeatable); `llmopt params` lists them")
    run.add_argument("--smoke", action="store_true",
                     help="tiny settings (what the tests run: every code path, meaningless numbers); -p values win")
    publish = run.add_mutually_exclusive_group()
    publish.add_argument("--publish", dest="publish", action="store_const", const=True, default=None,
                         help="publish this run to reports/, data/results/ and the README (never a smoke run)")
    publish.add_argument("--no-publish", dest="publish", action="store_const", const=False,
                         help="do not publish, even a complete default run")
    run.add_argument("--runs-dir", default=None, help="where run folders go (default: runs/)")
    run.add_argument("--reports-dir", default=None, help="where a published run's reports go (default: reports/)")
    run.add_argument("--results-dir", default=None,
                     help="where a published run's results go (default: data/results/)")
    run.add_argument("--timeout", type=int, default=None, metavar="SECONDS", help="limit on each cell")
    params = sub.add_parser("params", help="list the notebooks' parameters: default, allowed values, smoke value, help")
    params.add_argument("notebooks", nargs="*", help="names or prefixes (default: all)")
    compare = sub.add_parser("compare", help="put run folders side by side in one HTML page")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<timestamp>-<host>)")
    compare.add_argument("-o", "--output", default="compare.html", help="the page to write (default: compare.html)")
    gen = sub.add_parser("generate", help="generate text with our decoder")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None)
    gen.add_argument("--dtype", default="fp32")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--cache", default="static", choices=["none", "static", "dynamic"])
    gen.add_argument("--engine", default="pytorch", choices=["pytorch", "fused"],
                     help="decode steps on the model's PyTorch operators or as one C call per token (CPU)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--chat", action="store_true")
    sub.add_parser("prepare", help="convert the default GGUF model to the safetensors cache, build the CPU "
                   "kernels and cache the bytecode of what the notebooks import")
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except LLMOptError as exc:
        print(f"llmopt: error: {exc}", file=sys.stderr)
        return 2


# What a notebook kernel imports (and the runner around it).
WARM_IMPORTS = ("torch", "transformers", "transformers.models.llama.modeling_llama", "pandas", "scipy.stats",
                "matplotlib.pyplot", "seaborn", "tqdm.auto", "gguf", "safetensors.torch", "ipykernel.kernelapp",
                "papermill", "nbconvert", "nbformat", "ipywidgets")


def warm_bytecode() -> None:
    """Import what the notebooks import once, writing Python's bytecode cache as it goes.

    pip installs with --no-compile (a minute less of bootstrap), and where PYTHONDONTWRITEBYTECODE is set (it is
    on the reference machines) nothing would ever write that cache: every notebook kernel compiled torch,
    transformers and pandas from source again (~13 s per notebook, measured). Here only the imported modules are
    compiled (~35 s once)."""
    import importlib
    import pkgutil

    before, sys.dont_write_bytecode = sys.dont_write_bytecode, False
    try:
        for name in WARM_IMPORTS:
            importlib.import_module(name)
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 (their lazy modules)

        import llmopt
        for module in pkgutil.walk_packages(llmopt.__path__, "llmopt."):
            if module.name != "llmopt.__main__":  # that one runs the command line
                importlib.import_module(module.name)
    finally:
        sys.dont_write_bytecode = before


def _dispatch(args) -> int:
    if args.command == "prepare":
        import subprocess

        # The GGUF conversion (~40 s, one core: transformers parses the file once each for config, tokenizer and
        # weights) runs beside the bytecode warm-up (~35 s, one core).
        convert = subprocess.Popen(
            [sys.executable, "-c", "from llmopt.engine.loading import default_checkpoint_dir as d; d()"])
        warm_bytecode()
        from .engine import cpu_kernels
        from .engine.loading import default_checkpoint_dir

        if convert.wait():
            raise LLMOptError(f"converting the default model failed (exit status {convert.returncode}, above)")
        print(default_checkpoint_dir())
        print("CPU kernels:", "built" if cpu_kernels.available() else cpu_kernels.unavailable_reason())
        return 0
    if args.command == "generate":
        from .engine.generate import Decoder, GenerationConfig
        from .engine.loading import load_model

        lm = load_model(args.model, args.dtype, args.device)
        decoder = Decoder(lm.model, lm.tokenizer, cache=args.cache, engine=args.engine)
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        prompt_tokens = len(decoder.encode(args.prompt, args.chat))
        times = []
        for event in decoder.stream(args.prompt, config, chat=args.chat):
            print(event.text, end="", flush=True)
            times.append(event.elapsed_s)
        print()
        print(timing_line(prompt_tokens, times), file=sys.stderr)
        return 0
    if args.command == "params":
        from .report import parameters
        from .report.runner import discover

        print("\n\n".join(parameters.describe_notebook(p.stem) for p in discover(args.notebooks or None)))
        return 0
    if args.command == "compare":
        return _compare(args)
    return _run(args)


def timing_line(prompt_tokens: int, token_times_s: list[float]) -> str:
    """llama.cpp-style timings of one generation: prompt tokens and time to first token (prefill), then the
    decode rate of the tokens after the first."""
    if not token_times_s:
        return f"prompt {prompt_tokens} tokens | no token generated"
    ttft = token_times_s[0]
    decoded = len(token_times_s) - 1
    decode_s = token_times_s[-1] - ttft
    rate = f"{decoded / decode_s:.1f} tokens/s" if decoded and decode_s > 0 else "n/a"
    return (f"prompt {prompt_tokens} tokens, time to first token {ttft * 1e3:.1f} ms "
            f"({prompt_tokens / ttft:.1f} tokens/s) | decode {decoded} tokens in {decode_s:.2f} s, {rate} | "
            f"total {len(token_times_s)} tokens in {token_times_s[-1]:.2f} s")


def _compare(args) -> int:
    from pathlib import Path

    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not (r / "summary.json").is_file()]
    if missing:
        raise LLMOptError(f"not a run folder (no summary.json): {', '.join(missing)}")
    try:
        from .report.compare import compare_runs
    except ImportError as exc:
        raise LLMOptError(f"llmopt compare is not available in this installation ({exc})") from exc
    print(compare_runs(runs, Path(args.output)))
    return 0


def _run(args) -> int:
    from pathlib import Path

    from .report import parameters
    from .report.runner import REPORTS_DIR, RUNS_DIR, ConsoleReporter, discover, run_suite

    notebooks = [p.stem for p in discover(args.notebooks or None)]
    values = parameters.parse_assignments(args.param, notebooks)
    start = time.perf_counter()
    suite = run_suite(args.notebooks or None, values, smoke=args.smoke, publish_to=args.publish,
                      runs_dir=Path(args.runs_dir) if args.runs_dir else RUNS_DIR,
                      reports_dir=Path(args.reports_dir) if args.reports_dir else REPORTS_DIR,
                      results_dir=Path(args.results_dir) if args.results_dir else None,
                      timeout_s=args.timeout, reporter=ConsoleReporter())
    print()
    for r in suite:
        status = f"ok     {r.seconds:6.1f} s" if r.ok else f"FAILED {r.seconds:6.1f} s  {r.error}"
        print(f"{r.name:28s} {status}")
        for seconds, line in r.slowest_cells:
            print(f"{'':28s}   cell {seconds:6.1f} s  {line}")
    print(f"total {time.perf_counter() - start:.1f} s; run folder {suite.run_dir} (index.html, summary.json); "
          f"{suite.publish_note}")
    if not suite.ok:
        failed = [r for r in suite if not r.ok]
        print(f"{len(failed)} notebook{'s' * (len(failed) != 1)} failed: "
              + "; ".join(f"{r.name}: {r.error}" for r in failed), file=sys.stderr)
    return 0 if suite.ok else 1


if __name__ == "__main__":
    sys.exit(main())
