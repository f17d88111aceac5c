"""Read and write GPTQ-format checkpoints: the layout auto-gptq and gptqmodel share (and transformers loads).

Per quantized linear layer `<name>` (bits b, K inputs, N outputs, G groups), in one safetensors file:
- `<name>.qweight` int32 [K * b / 32, N]: the codes, transposed, 32 / b codes per int32 along the input
  dimension, lowest bits first (row r holds input rows r*32/b ... );
- `<name>.qzeros`  int32 [G, N * b / 32]: the zero points packed the same way along the output dimension;
  format "gptq" (v1, auto-gptq's) stores zero - 1, format "gptq_v2" (gptqmodel's) stores the zero itself;
- `<name>.scales`  fp16 [G, N];
- `<name>.g_idx`   int32 [K]: the group of each input column (not monotone after act-order);
- `<name>.bias` when the layer has one. Other tensors (embedding, norms) are stored dense.
`config.json` carries `quantization_config` (quant_method "gptq", bits, group_size, desc_act, sym,
checkpoint_format), also written to `quantize_config.json` as auto-gptq did. Layers at other settings than the
rest (an 8-bit lm_head beside 4-bit layers) are listed under `dynamic` as `{"+:^<name>$": {"bits", "group_size"}}`,
the per-module override syntax of gptqmodel (auto-gptq has no such field; such a file is ours and gptqmodel's).

v1 cannot store a zero point of 0 (it reads back as 2**bits, the format's known off-by-one); when an asymmetric
grid has one we write v2, which gptqmodel reads. Scales are stored as fp16 (so they round-trip exactly after that
one rounding); codes, zeros and g_idx are exact. Zeros must be integers: GGUF Q4_1's fractional offsets have no
place in this format.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidParameterError, ModelNotFoundError
from .quantization import QuantizedWeight, apply_quantized

WEIGHTS_FILE = "model.safetensors"


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers into int32 along `dim` (32 // bits per word, lowest bits first)."""
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, 0)
    if v.shape[0] % per_word:
        raise InvalidParameterError(f"dimension of size {v.shape[0]} is not a multiple of {per_word}")
    v = v.reshape(v.shape[0] // per_word, per_word, *v.shape[1:])
    shifts = (torch.arange(per_word, device=v.device) * bits).reshape(1, per_word, *([1] * (v.dim() - 2)))
    words = (v << shifts).sum(dim=1)  # disjoint bit fields: sum == bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement, as the int32 bit pattern
    return words.to(torch.int32).movedim(0, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int64 values in [0, 2**bits)."""
    per_word = 32 // bits
    w = words.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, device=w.device) * bits).reshape(1, per_word, *([1] * (w.dim() - 1)))
    v = (w.unsqueeze(1) >> shifts) & (2**bits - 1)
    return v.reshape(w.shape[0] * per_word, *w.shape[1:]).movedim(0, dim)


def to_tensors(q: QuantizedWeight, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """One layer's qweight / qzeros / scales / g_idx."""
    if not torch.equal(q.zeros, q.zeros.round()):
        raise InvalidParameterError("GPTQ format needs integer zero points (GGUF Q4_1 offsets are fractional)")
    zeros = q.zeros.round().to(torch.int64)
    if checkpoint_format == "gptq":
        if (zeros == 0).any():
            raise InvalidParameterError("zero point 0 cannot be stored in the v1 'gptq' format; use 'gptq_v2'")
        zeros = zeros - 1
    return {
        "qweight": pack_int32(q.codes.t(), q.bits, dim=0),
        "qzeros": pack_int32(zeros.t(), q.bits, dim=1),
        "scales": q.scales.t().to(torch.float16).contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def from_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int,
                 checkpoint_format: str) -> QuantizedWeight:
    codes = unpack_int32(tensors["qweight"], bits, dim=0).t().to(torch.uint8).contiguous()
    zeros = unpack_int32(tensors["qzeros"], bits, dim=1).t().to(torch.float32)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    scales = tensors["scales"].t().to(torch.float32).contiguous()
    return QuantizedWeight(codes, scales, zeros, bits, group_size or codes.shape[1], tensors["g_idx"].to(torch.int32))


def checkpoint_key(name: str) -> str:
    """transformers' key for one of our module names (everything but lm_head lives under `model.`)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def module_name(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def save_checkpoint(path: str | Path, model: nn.Module, weights: dict[str, QuantizedWeight], hf_config,
                    tokenizer=None, desc_act: bool = False, damp: float | None = None,
                    checkpoint_format: str | None = None) -> Path:
    """Write a quantized model (its packed layers described by `weights`) as a GPTQ-format checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    settings = {name: (q.bits, -1 if q.scales.shape[1] == 1 else q.group_size) for name, q in weights.items()}
    body = [v for name, v in settings.items() if name != "lm_head"] or list(settings.values())
    bits, group_size = max(set(body), key=body.count)  # the checkpoint's setting; other layers get overrides
    dynamic = {f"+:^{re.escape(checkpoint_key(name))}$": {"bits": b, "group_size": g}
               for name, (b, g) in settings.items() if (b, g) != (bits, group_size)}
    if checkpoint_format is None:
        has_zero = any((q.zeros == 0).any() for q in weights.values())
        checkpoint_format = "gptq_v2" if has_zero else "gptq"
    symmetric = all(q.symmetric for q in weights.values())
    tensors = {}
    for name, q in weights.items():
        for part, tensor in to_tensors(q, checkpoint_format).items():
            tensors[f"{checkpoint_key(name)}.{part}"] = tensor.cpu()
    quantized = set(weights)
    tied = model.config.tie_word_embeddings and "lm_head" not in quantized
    for key, tensor in model.state_dict().items():
        owner, _, part = key.rpartition(".")
        if owner in quantized and part != "bias":
            continue  # packed buffers, written above
        if tied and key == "lm_head.weight":
            continue
        tensors[checkpoint_key(key)] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    quantization_config = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size,
        "desc_act": bool(desc_act), "sym": bool(symmetric), "checkpoint_format": checkpoint_format,
        "damp_percent": damp, "true_sequential": False, "lm_head": "lm_head" in quantized,
    }
    if dynamic:
        quantization_config["dynamic"] = dynamic
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    config["quantization_config"] = quantization_config
    config["tie_word_embeddings"] = bool(model.config.tie_word_embeddings) and "lm_head" not in quantized
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (path / "quantize_config.json").write_text(json.dumps(quantization_config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def read_weights(path: str | Path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    """(quantized layers by module name, the other tensors by checkpoint key, quantization_config)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} holds no config.json: not a checkpoint")
    config = json.loads((path / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "gptq":
        raise InvalidParameterError(f"{path} is not a GPTQ checkpoint (quantization_config: {qconfig or None})")
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    checkpoint_format = qconfig.get("checkpoint_format", "gptq")
    layers = sorted({k[:-len(".qweight")] for k in tensors if k.endswith(".qweight")})
    weights = {}
    for key in layers:
        bits, group_size = int(qconfig["bits"]), int(qconfig.get("group_size", -1))
        for pattern, override in (qconfig.get("dynamic") or {}).items():  # per-layer settings (gptqmodel's syntax)
            if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), key):
                bits, group_size = int(override.get("bits", bits)), int(override.get("group_size", group_size))
                break
        parts = {p: tensors.pop(f"{key}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")}
        k = parts["g_idx"].numel()
        weights[module_name(key)] = from_tensors(parts, bits, k if group_size == -1 else group_size, checkpoint_format)
    return weights, tensors, qconfig


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, device="cpu"):
    """Our decoder with packed-kernel layers from a GPTQ-format checkpoint (ours, gptqmodel's or auto-gptq's).
    `dtype`: the activations' (default: what the kernels on `device` take, `quantization.default_activation_dtype`).

    Returns (model, weights, quantization_config)."""
    from transformers import AutoConfig

    from .config import ModelConfig
    from .model import Transformer

    weights, tensors, qconfig = read_weights(path)
    hf_config = AutoConfig.from_pretrained(path)
    cfg = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    state = {module_name(k): v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {f"{name}.weight" for name in weights}
    if cfg.tie_word_embeddings:
        allowed.add("lm_head.weight")
    if set(missing) - allowed or unexpected:
        raise InvalidParameterError(
            f"checkpoint does not fit the model: missing {sorted(set(missing) - allowed)[:4]}, "
            f"unexpected {unexpected[:4]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_rope()
    apply_quantized(model, weights, dtype)
    return model.eval(), weights, qconfig
