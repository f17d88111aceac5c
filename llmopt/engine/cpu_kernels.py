"""Our own CPU matrix-vector kernels for the decode step (AVX2 + FMA, `csrc/gemv.c`), as llama.cpp has its own.

Why: a decode step multiplies every weight matrix by one activation row (a GEMV), so its speed is the rate at
which the weights stream from memory. PyTorch's dense fp32 GEMV (MKL) streams 6-10 GB/s on the 2-core AMD EPYC
this suite was built on, half of what a plain AVX2 loop reaches (13-17 GB/s), and its packed int8 / int4 CPU
kernels are fast only with bf16 activations. These kernels take fp32 activations and weights as fp32, bf16,
int8 (group-wise scales) or int4 (group-wise scale and offset; there the activations are quantized to int8 in
blocks of 32 for integer dot products, llama.cpp's scheme), for up to `MAX_ROWS` activation rows (decode,
batched decode, speculative verification); more rows (prefill) go to PyTorch's GEMM, with quantized weights
expanded to fp32 first by the same library.

`csrc/gptq.c` holds one more loop that is not a GEMV: GPTQ's column-by-column rounding and error feedback
(`gptq_block`, the same operations as gptq.py's PyTorch loop, one row per thread).

The C files are compiled with gcc on first use into the cache directory (about a second) and called through
ctypes; it links PyTorch's own OpenMP runtime, so `torch.set_num_threads` sets its threads. Where there is no
x86 CPU with AVX2 / FMA / F16C, no gcc, or LLMOPT_CPU_KERNELS=0, `available()` says why and the modules fall
back to PyTorch (on CUDA they always do); `switched_off()` does the same for a block of code. Every kernel is
tested against the dequantized reference matmul (tests/test_cpu_kernels.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import cpu_flags
from ..paths import cache_dir

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("gemv.c", "decode_step.c", "gptq.c")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
MAX_ROWS = 16  # activation rows up to which the GEMV kernels run (beyond: PyTorch's GEMM)
CPU_FEATURES = ("avx2", "fma", "f16c")
SIGNATURES = {"gemv_f32": "pppiii", "gemv_bf16": "pppiii", "gemv_q8": "ppppiiii", "gemv_q4": "pppppiiii",
              "dequant_q8": "pppiii", "dequant_q4": "ppppiii", "fake_quantize_q8": "ppii",
              "decode_tokens": "pplllpl", "gptq_block": "pppppplllll"}  # p: pointer, i: int, l: int64


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled library, or None and the reason it is not there."""
    if os.environ.get("LLMOPT_CPU_KERNELS", "1") == "0":
        return None, "disabled by LLMOPT_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the kernels are x86 AVX2; this CPU is {platform.machine()}"
    missing = [f for f in CPU_FEATURES if f not in cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        return None, "no C compiler (gcc) to build csrc/"
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"libgemv-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode:
                return None, f"gcc failed on csrc/: {result.stderr.strip()[:500]}"
            os.replace(built, target)  # atomic: a concurrent build never sees half a file
    lib = ctypes.CDLL(str(target))  # torch (imported above) loaded its libgomp first: the library binds to it
    for name, signature in SIGNATURES.items():  # pointers are passed as ints (data_ptr), sizes as C ints
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [{"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_int64}[kind] for kind in signature]
    return lib, ""


_switched_on = True


def available() -> bool:
    return _switched_on and _load()[0] is not None


def unavailable_reason() -> str:
    """Empty when the kernels run here, else why not."""
    return _load()[1] or ("" if _switched_on else "switched off (cpu_kernels.switched_off())")


@contextmanager
def switched_off():
    """Inside: `available()` is False, so new quantized layers take PyTorch's packed kernels and existing
    GemvLinear / QuantizedGemvLinear layers run PyTorch's matmul (to compare the two in one process)."""
    global _switched_on
    before, _switched_on = _switched_on, False
    try:
        yield
    finally:
        _switched_on = before


def runs_on(device=None) -> bool:
    """Whether layers on `device` run on these kernels: a CPU device, where the library built."""
    return torch.device(device or "cpu").type == "cpu" and available()


def _call(name: str, *args) -> None:
    getattr(_load()[0], name)(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])


def _uses_kernel(x: torch.Tensor, rows: int) -> bool:
    """Few rows of a CPU tensor outside autograd and torch.compile, where the library built."""
    return (rows <= MAX_ROWS and x.is_cpu and not x.requires_grad and available()
            and not torch.compiler.is_compiling())


def _fp32_output(x: torch.Tensor, n: int) -> torch.Tensor:
    """An uninitialized fp32 [..., n] for x [..., K] (a dtype= keyword costs microseconds per call here)."""
    y = torch.empty(*x.shape[:-1], n)
    return y if y.dtype == torch.float32 else y.float()


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's fp32 output in the input's dtype, plus the bias."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if bias is None else y + bias


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T for an fp32 or bf16 weight (contiguous) -> fp32 [..., N]."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    n, k = weight.shape
    y = _fp32_output(x, n)
    lib = _load()[0]
    fn = lib.gemv_f32 if weight.dtype == torch.float32 else lib.gemv_bf16
    fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // k, n, k)
    return y


class GemvLinear(nn.Linear):
    """`nn.Linear` whose few-row products run on our fp32 / bf16 GEMV; it shares the original's parameters
    (tied embeddings stay tied), so quantization and `.to()` treat it as any `nn.Linear`."""

    kernel = "llmopt AVX2 gemv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (weight.dtype not in (torch.float32, torch.bfloat16) or not weight.is_contiguous()
                or not _uses_kernel(x, x.numel() // self.in_features)
                or (weight.requires_grad and torch.is_grad_enabled())):
            if weight.dtype != x.dtype:  # bf16 weights under fp32 activations (many rows): widen for the GEMM
                weight = weight.to(x.dtype)
            return F.linear(x, weight, self.bias)
        return _finish(gemv(x, weight), x, self.bias)


def use_gemv(model: nn.Module) -> nn.Module:
    """Swap every `nn.Linear` of `model` for a `GemvLinear` holding the same parameters (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                swapped = GemvLinear.__new__(GemvLinear)
                swapped.__dict__ = child.__dict__  # same parameters, buffers and hooks: nothing is copied
                setattr(module, child_name, swapped)
    return model


class QuantizedGemvLinear(nn.Module):
    """An int8 or int4 weight with group-wise scales, on our kernels: `gemv_q8` / `gemv_q4` for few rows,
    dequantize (`dequant_q8` / `dequant_q4`) + PyTorch's GEMM for many. Activations are fp32 in and out
    (cast back to the input's dtype).

    int8: `weight` int8 [N, K], `scales` fp32 [N, K / G], W = code * scale (symmetric).
    int4: `weight` uint8 [N, K / 2], per group of G codes byte j holds code j (low nibble) and j + G/2 (high),
    `scales`, `offsets` fp32 [N, K / G], W = code * scale + offset; it computes W x^ with x^ the activations
    quantized to int8 blocks of 32 (`quantize_activations`), as llama.cpp's Q4 x Q8 dot products do, on every
    path (decode and prefill), so perplexity measures what decoding runs. `input_order` permutes x first
    (GPTQ act-order)."""

    def __init__(self, bits: int, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 in_features: int, group_size: int, bias: torch.Tensor | None = None,
                 input_order: torch.Tensor | None = None):
        super().__init__()
        self.bits, self.in_features, self.group_size = bits, in_features, group_size
        self.out_features = weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.register_buffer("offsets", None if offsets is None else offsets.to(torch.float32).contiguous())
        self.register_buffer("bias", bias)
        self.register_buffer("input_order", input_order)
        self.kernel = f"llmopt AVX2 gemv_q{bits}"

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] (in the permuted input order when `input_order` is set)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if not (self.weight.is_cpu and _load()[0] is not None):  # e.g. moved to CUDA: the same math in PyTorch
            scales = self.scales.repeat_interleave(g, dim=1)
            if self.bits == 8:
                return self.weight.float() * scales
            packed = self.weight.view(n, k // g, g // 2)
            codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(n, k).float()
            return codes * scales + self.offsets.repeat_interleave(g, dim=1)
        out = torch.empty(n, k, dtype=torch.float32)
        if self.bits == 8:
            _call("dequant_q8", self.weight, self.scales, out, n, k, g)
        else:
            _call("dequant_q4", self.weight, self.scales, self.offsets, out, n, k, g)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        if self.input_order is not None:
            x32 = x32.index_select(-1, self.input_order)
        rows = x32.numel() // k
        if _uses_kernel(x32, rows):
            y = _fp32_output(x, n)
            lib = _load()[0]
            if self.bits == 8:
                lib.gemv_q8(x32.data_ptr(), self.weight.data_ptr(), self.scales.data_ptr(), y.data_ptr(),
                            rows, n, k, self.group_size)
            else:
                lib.gemv_q4(x32.data_ptr(), self.weight.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(),
                            y.data_ptr(), rows, n, k, self.group_size)
        else:  # many rows (prefill): the same activations the int4 kernel uses, then PyTorch's GEMM
            y = F.linear(quantize_activations(x32) if self.bits == 4 else x32, self.dequantize())
        return _finish(y, x, self.bias)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (fp32, contiguous, K a multiple of 32) as the int4 kernel computes with it: per block of 32
    values, d = max|x| / 127 and x^ = round(x / d) * d (llama.cpp's Q8_0 quantization of activations)."""
    if not (x.is_cpu and _load()[0] is not None):  # the same definition in PyTorch (tested equal)
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        codes = torch.where(d > 0, torch.round(blocks / d), torch.zeros_like(blocks))
        return (codes * d).reshape(x.shape)
    out = torch.empty_like(x)
    _call("fake_quantize_q8", x, out, x.numel() // x.shape[-1], x.shape[-1])
    return out


def pack_int4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 [N, K / 2] from codes [N, K] in 0..15: in each group byte j = code j | code (j + G/2) << 4."""
    n, k = codes.shape
    groups = codes.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)
    return (groups[:, :, 0] | groups[:, :, 1] << 4).reshape(n, k // 2).contiguous()


def quantized_supported(out_features: int, in_features: int, group_size: int, bits: int) -> str | None:
    """None if our kernels take this layer, else why not."""
    if bits not in (8, 4):
        return f"no kernel for {bits}-bit weights"
    multiple = 16 if bits == 8 else 32  # int4: activations are quantized in blocks of 32
    if group_size % multiple or in_features % group_size:
        return f"group size {group_size} must be a multiple of {multiple} dividing in_features {in_features}"
    return None


def gptq_block(w: torch.Tensor, hinv: torch.Tensor, group_size: int, bits: int, symmetric: bool):
    """GPTQ's column loop over one block (`csrc/gptq.c`): w [N, B] fp32 is updated in place; hinv [B, B] is the
    block of the inverse Hessian's upper Cholesky factor. Returns (codes [N, B], errors [N, B], scales and zeros
    [N, B / group_size]), as gptq.py's PyTorch loop computes them."""
    w, hinv = w.contiguous(), hinv.contiguous()
    n, width = w.shape
    codes, errors = torch.empty_like(w), torch.empty_like(w)
    scales, zeros = torch.empty(n, width // group_size), torch.empty(n, width // group_size)
    _call("gptq_block", w, hinv, codes, errors, scales, zeros, n, width, group_size, 2 ** bits - 1, int(symmetric))
    return codes, errors, scales, zeros
