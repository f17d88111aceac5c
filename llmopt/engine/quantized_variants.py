"""The rows of the quantization comparison (notebook 03): one copy of the model per weight format, each with the
kernel it runs on, the time it took to make and the bytes it takes in a file.

Formats: dense fp32 / bf16; RTN and GPTQ (`llmopt.engine.quantization`, `llmopt.engine.gptq`) at 8 or 4 bits, saved
as GPTQ-format checkpoints (`llmopt.engine.gptq_format`) to measure their size on disk; GGUF blocks
(`llmopt.engine.gguf_formats`): the default model's own Q4_1 file, or Q8_0 / Q4_0 made with the `gguf` package.
A format the kernels cannot take (e.g. group size 128 with width 576) becomes a row that says why instead of an error.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidParameterError
from . import gguf_formats, gptq_format, quantization


@dataclass
class Variant:
    name: str
    method: str  # dense | rtn | gptq | gguf
    model: nn.Module | None
    kernel: str = ""
    bits: int | None = None
    group_size: int | None = None
    quantize_s: float = 0.0
    weights: dict = field(default_factory=dict, repr=False)
    file_bytes: int | None = None
    file_note: str = ""
    skipped: str = ""  # why this row could not run (empty when it ran)

    def row(self) -> dict:
        model = self.model
        return {"variant": self.name, "method": self.method, "bits": self.bits, "group_size": self.group_size,
                "kernel": self.kernel, "quantize_s": self.quantize_s, "file_bytes": self.file_bytes,
                "file_note": self.file_note,
                "memory_bytes": model.weight_bytes if model is not None else None,
                "bytes_read_per_token": quantization.bytes_read_per_token(model) if model is not None else None,
                "skipped": self.skipped}


def dense_kernel(model: nn.Module) -> str:
    """What a dense model's linear layers run on: our GEMV (decode) where it runs, else PyTorch's matmul."""
    from . import cpu_kernels

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    ours = cpu_kernels.available() and any(isinstance(m, cpu_kernels.GemvLinear) for m in model.modules())
    return f"llmopt AVX2 gemv ({dtype} weights)" if ours else f"dense {dtype} matmul"


def dense(base: nn.Module, name: str, dtype: torch.dtype) -> Variant:
    start = time.perf_counter()
    model = copy.deepcopy(base).to(dtype)
    return Variant(name, "dense", model, dense_kernel(model), quantize_s=time.perf_counter() - start)


def dense_weights(base: nn.Module, name: str, dtype: torch.dtype = torch.bfloat16) -> Variant:
    """16-bit weights under fp32 activations (llama.cpp's F16 way): the linear layers' weights (and the tied
    embedding) stored in `dtype` and widened inside the kernel; norms and activations stay fp32."""
    from . import cpu_kernels

    start = time.perf_counter()
    model = cpu_kernels.use_gemv(copy.deepcopy(base))
    for linear in quantization.linear_names(model):
        module = model.get_submodule(linear)
        module.weight.data = module.weight.data.to(dtype)  # a tied lm_head casts the embedding with it
    kernel = (f"llmopt AVX2 gemv ({str(dtype).replace('torch.', '')} weights, fp32 activations)"
              if cpu_kernels.available() else "dense matmul (weights widened to fp32 per call)")
    return Variant(name, "dense", model, kernel, quantize_s=time.perf_counter() - start)


def quantized(base: nn.Module, name: str, method: str, bits: int, group_size: int | None = None,
              symmetric: bool = False, include_lm_head: bool = True, calibration_ids: torch.Tensor | None = None,
              **gptq_options) -> Variant:
    """RTN or GPTQ at `bits` (8: per channel; 4: group-wise), swapped onto the packed kernels."""
    model = copy.deepcopy(base)
    try:
        start = time.perf_counter()
        weights = quantization.quantize_model(model, method=method, bits=bits, group_size=group_size,
                                              symmetric=symmetric, include_lm_head=include_lm_head,
                                              calibration_ids=calibration_ids, **gptq_options)
        seconds = time.perf_counter() - start
    except InvalidParameterError as exc:
        return Variant(name, method, None, bits=bits, group_size=group_size, skipped=str(exc))
    kernels = sorted({model.get_submodule(n).kernel for n in weights})
    return Variant(name, method, model, ", ".join(kernels), bits, group_size if bits == 4 else None, seconds, weights)


def gguf(base: nn.Module, name: str, kind: str, gguf_path: str | Path | None = None,
         include_lm_head: bool = True) -> Variant:
    """GGUF blocks: the layers of the file at `gguf_path` as they are, or `kind` blocks made from `base`."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    if gguf_path is not None:
        weights, kernels = gguf_formats.load_gguf_layers(model, gguf_path)
    else:
        weights, kernels = gguf_formats.quantize_model_gguf(model, kind, include_lm_head)
    seconds = time.perf_counter() - start
    names = set(kernels.values())
    if gguf_path is not None and "lm_head" not in weights:
        names.add(f"lm_head: {dense_kernel(model)} (the model's own, not in the file as blocks)")
    variant = Variant(name, "gguf", model, ", ".join(sorted(names)), 8 if kind == "Q8_0" else 4, 32, seconds, weights)
    if gguf_path is not None:
        variant.file_bytes, variant.file_note = Path(gguf_path).stat().st_size, "the GGUF file itself"
    else:
        dense_rest = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                         if n.rpartition(".")[0] not in weights and n != "lm_head.weight")
        variant.file_bytes = sum(gguf_formats.block_bytes(q, kind) for q in weights.values()) + dense_rest
        variant.file_note = f"{kind} block bytes + other tensors in bf16 (no file written)"
    return variant


def measure_file_bytes(variant: Variant, hf_config, directory: str | Path | None = None) -> Variant:
    """Write the variant's checkpoint to a temporary directory and record its size: safetensors for dense
    models, the GPTQ format for RTN / GPTQ (GGUF rows already know theirs). The files are deleted."""
    if variant.skipped or variant.file_bytes is not None:
        return variant
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        if variant.method == "dense":
            state = {k: v for k, v in variant.model.state_dict().items()
                     if not (k == "lm_head.weight" and variant.model.config.tie_word_embeddings)}
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"))
            variant.file_note = "safetensors"
        else:
            gptq_format.save_checkpoint(tmp, variant.model, variant.weights, hf_config,
                                        desc_act=False)
            variant.file_note = "GPTQ-format checkpoint (safetensors + config)"
        variant.file_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.suffix == ".safetensors")
    return variant
