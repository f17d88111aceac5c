"""Command line: `llmopt run` (the suite), `llmopt generate` (one prompt), `llmopt prepare` (default model)."""
from __future__ import annotations

import argparse
import ast
import sys
import time

from .errors import LLMOptError


def _parse_parameter(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise LLMOptError(f"parameter {text!r} must look like name=value")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string such as a model path
    return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks with papermill, write reports/*.html and index.html")
    run.add_argument("notebooks", nargs="*", help="names or prefixes (default: all), e.g. 00 01_kv_cache")
    run.add_argument("-p", "--param", action="append", default=[], help="notebook parameter name=value")
    run.add_argument("--smoke", action="store_true", help="tiny parameters (what the tests run)")
    run.add_argument("--reports-dir", default=None)
    run.add_argument("--results-dir", default=None)
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
                "papermill", "nbconvert", "nbformat")


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
        convert = subprocess.Popen([sys.executable, "-c", "from llmopt.engine.loading import default_checkpoint_dir as d; d()"])
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
        for event in decoder.stream(args.prompt, config, chat=args.chat):
            print(event.text, end="", flush=True)
        print()
        return 0
    from pathlib import Path

    from .report.reports import REPORTS_DIR, run_suite

    parameters = dict(_parse_parameter(p) for p in args.param)
    start = time.perf_counter()
    runs = run_suite(args.notebooks or None, parameters, smoke=args.smoke,
                     reports_dir=Path(args.reports_dir) if args.reports_dir else REPORTS_DIR,
                     results_dir=Path(args.results_dir) if args.results_dir else None)
    for r in runs:
        status = f"ok    {r.seconds:6.1f} s  {r.html_path}" if r.ok else f"FAILED {r.seconds:5.1f} s  {r.error}"
        print(f"{r.name:28s} {status}")
        for seconds, line in r.slowest_cells:
            print(f"{'':28s}   cell {seconds:6.1f} s  {line}")
    print(f"total {time.perf_counter() - start:.1f} s; index: {(Path(args.reports_dir) if args.reports_dir else REPORTS_DIR) / 'index.html'}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
