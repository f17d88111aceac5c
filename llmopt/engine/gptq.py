"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), written to be read next to the paper and its reference code (github.com/IST-DASLab/gptq).

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the columns of a layer's weight one at a
time and, after each, moves the rounding error onto the columns not yet quantized, in the direction that hurts
the layer's *output* least on real inputs. For a linear layer y = W x and calibration inputs X, the output error
||W X - Q X||^2 has Hessian H = 2 X X^T (per output row; all rows share it). Quantizing column i with error e
is compensated optimally (Optimal Brain Surgeon) by W[:, i+1:] -= e * H^-1[i, i+1:] / H^-1[i, i], where
H^-1 is the inverse Hessian restricted to the remaining columns. The reference's tricks, all here:
- dampening: H += damp * mean(diag H) * I, so the inverse exists and stays stable;
- the Cholesky factor of H^-1 (upper) holds every "remaining columns" inverse at once, row by row;
- lazy batch updates: columns are processed in blocks; inside a block errors update the block only, and the
  block's accumulated errors update the rest of the matrix with one matmul;
- act-order (optional): quantize columns in order of decreasing diag(H) (most activated inputs first);
- groups: each run of `group_size` consecutive (processed) columns gets its own scale/zero, computed when the
  run starts from the weights as they are then (with the error compensation so far).
One deviation from the reference: blocks are a multiple of the group size, so each group's scale/zero is taken
from fully updated weights (the reference reads the outer matrix, which lags inside a block).

The model is processed block by block (the reference's "sequential" mode): the inputs of transformer block i
are the outputs of blocks 0..i-1 *already quantized*, so later layers calibrate against the errors of earlier
ones. The Hessians come from forward pre-hooks on the linear layers; nothing is cached between calls.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InvalidParameterError
from . import cpu_kernels
from .quantized_weight import QuantizedWeight, group_params, quantize_codes, rtn


class HessianAccumulator:
    """H = 2/n sum_x x x^T over every input row `x` a linear layer sees (collected by a forward pre-hook)."""

    def __init__(self, in_features: int, device="cpu"):
        self.sum_xxt = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum_xxt.addmm_(x.t(), x)
        self.rows += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        return 2 * self.sum_xxt / max(self.rows, 1)

    def hook(self, module, args):
        self.add(args[0])


@contextmanager
def one_thread():
    """Run on one intra-op thread: the column loop is thousands of tiny ops, and with more threads OpenMP's
    barriers dominate (measured ~30x slower with 2 threads on a contended 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 64,
                  symmetric: bool = False, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128, use_kernel: bool | None = None) -> QuantizedWeight:
    """Quantize one weight [N, K] with GPTQ given its input Hessian [K, K].

    use_kernel: run each block's column loop in C (`cpu_kernels.gptq_block`: the same operations, ~15x faster
    here); None: where the CPU kernels run. Otherwise the loop below, one PyTorch call per column."""
    if use_kernel is None:
        use_kernel = cpu_kernels.runs_on(weight.device)
    if use_kernel:
        return _gptq_quantize(weight, hessian, bits, group_size, symmetric, act_order, damp, block_size, True)
    with one_thread():
        return _gptq_quantize(weight, hessian, bits, group_size, symmetric, act_order, damp, block_size, False)


def _gptq_quantize(weight, hessian, bits, group_size, symmetric, act_order, damp, block_size,
                   use_kernel) -> QuantizedWeight:
    W = weight.detach().to(torch.float32).clone()
    n, k = W.shape
    group_size = group_size or k
    if k % group_size:
        raise InvalidParameterError(f"in_features {k} is not divisible by group_size {group_size}")
    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=W.device)
    W, H = W[:, order], H[order][:, order]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros_like(W)
    n_groups = k // group_size
    scales = torch.zeros(n, n_groups, device=W.device)
    zeros = torch.zeros(n, n_groups, device=W.device)
    block_size = group_size * max(1, block_size // group_size)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        W_block = W[:, start:end].clone()
        Hinv_block = Hinv[start:end, start:end]
        if use_kernel:
            groups = slice(start // group_size, end // group_size)
            codes[:, start:end], errors, scales[:, groups], zeros[:, groups] = cpu_kernels.gptq_block(
                W_block, Hinv_block, group_size, bits, symmetric)
        else:
            errors = torch.zeros_like(W_block)
            for i in range(end - start):
                column = start + i
                if column % group_size == 0:  # a new group starts: its grid from the weights as updated so far
                    g = column // group_size
                    scale, zero = group_params(W_block[:, i:i + group_size], bits, symmetric)
                    scales[:, g], zeros[:, g] = scale, zero
                w = W_block[:, i]
                q = quantize_codes(w[:, None], scale, zero, bits)[:, 0]
                codes[:, column] = q
                error = (w - (q - zero) * scale) / Hinv_block[i, i]
                W_block[:, i:].addr_(error, Hinv_block[i, i:], alpha=-1)  # compensate inside the block
                errors[:, i] = error
        W[:, end:] -= errors @ Hinv[start:end, end:]  # lazy update of everything after the block

    inverse = torch.argsort(order)
    g_idx = (torch.arange(k, device=W.device) // group_size)[inverse].to(torch.int32)
    return QuantizedWeight(codes[:, inverse].to(torch.uint8), scales, zeros, bits, group_size, g_idx)


def output_error(weight: torch.Tensor, q: QuantizedWeight, inputs: torch.Tensor) -> float:
    """Relative output error ||x W^T - x Q^T|| / ||x W^T|| of a quantized layer on inputs [m, K]."""
    reference = inputs @ weight.t().to(inputs.dtype)
    return float(torch.linalg.norm(reference - inputs @ q.dequantize(inputs.dtype).t()) / torch.linalg.norm(reference))


class _StopForward(Exception):
    pass


def _block_inputs(model: nn.Module, calibration_ids: torch.Tensor) -> tuple:
    """The positional arguments transformer block 0 receives on the calibration batch (the reference's Catcher)."""
    captured = {}

    def catch(module, args):
        captured["args"] = args
        raise _StopForward

    handle = model.layers[0].register_forward_pre_hook(catch)
    try:
        positions = torch.arange(calibration_ids.shape[1], device=calibration_ids.device)
        model(calibration_ids, positions)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["args"]


@torch.no_grad()
def quantize_weights(model: nn.Module, calibration_ids: torch.Tensor, names: list[str], bits: int = 4,
                     group_size: int | None = 64, symmetric: bool = False, act_order: bool = False,
                     damp: float = 0.01, block_size: int = 128, lm_head: str = "gptq",
                     ) -> dict[str, QuantizedWeight]:
    """GPTQ every linear layer in `names`, transformer block by block, on `calibration_ids` [n, T].

    The model's dense weights are replaced by their dequantized values as it goes (so later blocks see
    quantized earlier blocks); the caller swaps in the packed modules afterwards. lm_head: 'gptq' or 'rtn'."""
    check_calibration_ids(calibration_ids, model.embed_tokens.num_embeddings)
    if model.lm_head.weight is model.embed_tokens.weight and "lm_head" in names:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # never write into the embedding
    device = next(model.parameters()).device
    args = _block_inputs(model, calibration_ids.to(device))
    x, rest = args[0], args[1:]
    options = dict(bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order, damp=damp,
                   block_size=block_size)
    results = {}
    for index, block in enumerate(model.layers):
        prefix = f"layers.{index}."
        linears = {name: block.get_submodule(name[len(prefix):]) for name in names if name.startswith(prefix)}
        for group in _layers_by_input(block, linears, x, rest):
            hessian = group[0][1].hessian
            weight = torch.cat([linears[name].weight for name, _ in group])  # rows are independent under GPTQ
            q = gptq_quantize(weight, hessian, **options)
            row = 0
            for name, _ in group:
                module = linears[name]
                rows = slice(row, row + module.out_features)
                row += module.out_features
                results[name] = QuantizedWeight(q.codes[rows].clone(), q.scales[rows].clone(), q.zeros[rows].clone(),
                                                bits, q.group_size, q.g_idx.clone())
                module.weight.data = results[name].dequantize(module.weight.dtype)
        x = block(x, *rest)  # the next block's inputs come from this block, quantized
    if "lm_head" in names:
        if lm_head == "gptq":
            head_inputs = model.norm(x)
            accumulator = HessianAccumulator(head_inputs.shape[-1], device)
            accumulator.add(head_inputs)
            results["lm_head"] = gptq_quantize(model.lm_head.weight, accumulator.hessian, **options)
        else:
            results["lm_head"] = rtn(model.lm_head.weight, bits, group_size, symmetric)
    return results


def check_calibration_ids(calibration_ids, vocab_size: int) -> None:
    """InvalidParameterError unless `calibration_ids` is an integer tensor [n >= 1, T >= 1] of ids in the vocabulary."""
    ids = calibration_ids
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        kind = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InvalidParameterError(f"GPTQ calibration_ids must be an integer tensor [n_samples, length], got {kind}")
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise InvalidParameterError(f"GPTQ calibration_ids must have shape [n_samples >= 1, length >= 1], "
                                    f"got {list(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise InvalidParameterError(f"GPTQ calibration_ids must be token ids in [0, {vocab_size}), got values from "
                                    f"{int(ids.min())} to {int(ids.max())}")


def _layers_by_input(block: nn.Module, linears: dict[str, nn.Linear], x: torch.Tensor, rest: tuple) -> list:
    """Run `block` once, accumulating one Hessian per distinct input tensor; linears fed the same tensor
    (q/k/v, gate/up) share it and are quantized together. Returns [[(name, accumulator), ...], ...]."""
    seen: list[tuple[torch.Tensor, HessianAccumulator]] = []  # inputs kept alive, so identity is reliable
    owner: dict[str, HessianAccumulator] = {}

    def hook_for(name):
        def hook(module, args):
            for tensor, accumulator in seen:
                if tensor is args[0]:
                    break
            else:
                accumulator = HessianAccumulator(args[0].shape[-1], args[0].device)
                accumulator.add(args[0])
                seen.append((args[0], accumulator))
            owner[name] = accumulator
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        block(x, *rest)
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list] = {}
    for name in linears:
        groups.setdefault(id(owner[name]), []).append((name, owner[name]))
    return list(groups.values())


def calibration_batch(tokenizer, text: str, samples: int = 8, length: int = 256, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `length` token ids drawn at random (seeded) from `text`, as one batch [samples, length]."""
    for name, value in (("samples", samples), ("length", length)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise InvalidParameterError(f"calibration {name} must be an int >= 1, got {value!r}")
    ids = torch.tensor(tokenizer(text).input_ids)
    if len(ids) < length + 1:
        raise InvalidParameterError(f"calibration text has {len(ids)} tokens, fewer than length={length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (samples,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])

