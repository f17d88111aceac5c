"""The engines users would otherwise pick, as benchmark engines beside ours (same prompts, threads, tokens).

- transformers' `generate`: without and with its KV cache, and with its prompt-lookup assisted generation;
- llama.cpp through `llama-cpp-python` on the very same GGUF file our default weights come from (optional
  extra: it compiles for minutes; `llama_cpp_available()` says whether it is installed).

Each engine returns a `Generation` with per-token timestamps, like ours, so `benchmark.compare` times all of
them round-robin in one run.
"""
from __future__ import annotations

import importlib.util
import time

from .generate import Generation


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
        start = time.perf_counter()
        for token in llm.generate(list(prompt_ids), top_k=1, top_p=1.0, temp=0.0, reset=True):
            record.token_ids.append(int(token))
            record.token_times_s.append(time.perf_counter() - start)
            if len(record.token_ids) == new_tokens:
                break
        return record

    run.llm = llm
    return run
