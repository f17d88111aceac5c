"""The engines users would otherwise pick, as benchmark engines beside ours (same prompts, threads, tokens).

- transformers' `generate`: without and with its KV cache, and with its prompt-lookup assisted generation;
- llama.cpp through `llama-cpp-python` on the very same GGUF file our default weights come from (optional
  extra: it compiles for minutes; `llama_cpp_available()` says whether it is installed).

Each engine returns a `Generation` with per-token timestamps, like ours, so `benchmark.compare` times all of
them round-robin in one run. llama-cpp-python reuses the longest common prefix of the previous call's tokens;
our llama.cpp engine resets first, so every call pays its whole prefill, as ours without a prefix cache does.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from ..engine.generate import Generation
from ..errors import InvalidParameterError
from .harness import quiet_output


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_engine(gguf_path, threads: int, context_tokens: int = 4096):
    """llama.cpp on `gguf_path`, greedy, exactly `new_tokens` tokens (EOS ignored), timed per token.

    `use_extra_bufts=False` avoids a known crash of llama-cpp-python 0.3.36 in the AMX matmul path on CPUs
    with AMX (SIGSEGV in ggml_backend_amx_mul_mat); it changes nothing on other CPUs."""
    from llama_cpp import Llama

    try:
        llm = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=context_tokens,
                    verbose=False, use_extra_bufts=False)
    except TypeError:  # older bindings without that option
        llm = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=context_tokens,
                    verbose=False)

    def run(prompt_ids, new_tokens):
        record = Generation(list(prompt_ids))
        llm.reset()  # no reuse of the previous call's prefix: a full prefill, timed
        start = time.perf_counter()
        for token in llm.generate(list(prompt_ids), top_k=1, top_p=1.0, temp=0.0, reset=True):
            record.token_ids.append(int(token))
            record.token_times_s.append(time.perf_counter() - start)
            if len(record.token_ids) == new_tokens:
                break
        return record

    run.llm = llm
    return run


LLAMA_FTYPES = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def llama_cpp_format(source_gguf, kind: str, directory) -> Path:
    """`source_gguf` re-encoded to `kind` (F16, BF16, Q8_0, Q4_0, Q4_1) by llama.cpp's own quantizer, cached in
    `directory`; a source already in `kind` is returned as is. From the shipped Q4_1 file this is the same weights
    (its dequantized values) in another format, which is what our bf16 / INT8 / INT4 variants hold too."""
    if kind not in LLAMA_FTYPES:
        raise InvalidParameterError(f"unknown GGUF format {kind!r}; use one of {', '.join(LLAMA_FTYPES)}")
    source = Path(source_gguf)
    if source.stem.endswith(f".{kind}"):  # already that format (the shipped file is *.Q4_1.gguf)
        return source
    import ctypes

    import llama_cpp

    target = Path(directory) / f"{source.stem}.{kind}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[kind])
    params.allow_requantize = True
    params.nthread = 2
    with quiet_output((1, 2)):  # llama.cpp logs every tensor it converts
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(staging).encode(), ctypes.byref(params))
    if status != 0 or not staging.is_file():
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not write {kind} from {source} (status {status})")
    staging.rename(target)
    return target
