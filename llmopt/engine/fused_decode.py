"""The fused decode step: a whole one-token forward pass in one C call (`csrc/decode_step.c`), llama.cpp's way.

A decode step of the PyTorch model (`llmopt.engine.model`) is about 90 operator calls per layer (norms, views, RoPE,
cache writes, SDPA, residual adds) around its 7 matrix products. At batch 1 on a CPU each call costs a few
microseconds of dispatch, which for the default 30-layer model is 10-17 ms per token: as much as the int4
matrix products themselves. `FusedDecodeStep` runs the same math (fp32 activations, the same GEMV kernels,
weights and static KV cache buffers shared with the model, nothing copied) as one call per token.

It is an engine choice, not new math: `Decoder(..., engine="fused")` takes it for steps of batch 1 into a
`StaticCache` of one token, or of up to `cpu_kernels.MAX_ROWS` consecutive tokens (speculative decoding's
verification of a draft), and everything else (prefill, batches, other caches, CUDA) goes to the model as before.
In fp32 its greedy tokens are tested equal to the PyTorch engine's and to transformers'
(tests/test_fused_decode.py, tests/test_e2e_default.py); its sums run in another order, so with int4 weights,
whose kernel rounds the activations to int8 codes, a last-bit difference can move a code and, at a near-tie, a
token, as a batch or a verification step does on the PyTorch engine too (quantization is not lossless). It runs
where `supported(model)` returns None: the CPU kernels built, fp32 activations (norm and embedding weights in
fp32, embeddings fp32 or bf16), linear layers as fp32 / bf16 / int8 / int4 on our kernels.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from ..errors import InvalidParameterError
from . import cpu_kernels
from .kv_cache import StaticCache

W_F32, W_BF16, W_Q8, W_Q4 = 0, 1, 2, 3
MAX_HEAD_DIM = 512  # the C RoPE's stack buffer


class Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64),
                ("group_size", ctypes.c_int64), ("weight", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("offsets", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("input_order", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_attention_norm", ctypes.c_void_p),
                *[(name, Linear) for name in ("q", "k", "v", "o", "gate", "up", "down")],
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [*[(name, ctypes.c_int64) for name in ("num_layers", "hidden", "num_heads", "num_kv_heads",
                                                      "head_dim", "intermediate", "vocab", "max_length",
                                                      "embed_kind")],
                ("eps", ctypes.c_double), ("embed", ctypes.c_void_p), ("final_norm", ctypes.c_void_p),
                ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p), ("lm_head", Linear),
                ("layers", ctypes.POINTER(Layer))]


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear_reason(module: nn.Module) -> str | None:
    if isinstance(module, cpu_kernels.QuantizedGemvLinear):
        if module.bias is not None and module.bias.dtype != torch.float32:
            return "a quantized layer's bias is not fp32"
        return None
    if isinstance(module, nn.Linear):
        if module.weight.dtype not in (torch.float32, torch.bfloat16) or not module.weight.is_contiguous():
            return f"a {module.weight.dtype} linear weight (the fused step takes fp32, bf16, int8, int4)"
        if module.bias is not None and module.bias.dtype != torch.float32:
            return "a linear bias that is not fp32 (fp32 activations only)"
        return None
    return f"a {type(module).__name__} linear layer (not on llmopt's CPU kernels)"


def supported(model: nn.Module) -> str | None:
    """None when `FusedDecodeStep` can run `model`, else why not (one sentence)."""
    if not cpu_kernels.available():
        return f"the CPU kernels do not run here: {cpu_kernels.unavailable_reason()}"
    if next(model.parameters()).device.type != "cpu":
        return "the fused step is a CPU engine"
    cfg = model.config
    if cfg.head_dim > MAX_HEAD_DIM or cfg.num_heads % cfg.num_kv_heads:
        return f"head_dim {cfg.head_dim} / heads {cfg.num_heads}:{cfg.num_kv_heads} not supported"
    norms = [model.norm] + [n for layer in model.layers
                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if any(n.weight.dtype != torch.float32 for n in norms):
        return "the model computes in bf16/fp16 (the fused step keeps fp32 activations, as the model does in fp32)"
    if not model.rope_cos.shape[0] or model.rope_cos.dtype != torch.float32:
        return "no RoPE table (a context beyond the tabulated 65,536 positions)"
    if model.embed_tokens.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"{model.embed_tokens.weight.dtype} embeddings"
    for name, module in model.named_modules():
        if name.endswith(("_proj", "lm_head")):
            reason = _linear_reason(module)
            if reason:
                return f"{name}: {reason}"
    return None


def engine_for(model: nn.Module, wanted: str = "fused") -> str:
    """The engine a `Decoder` of `model` runs on when `wanted` is asked for: 'fused' where it can, else 'pytorch'."""
    return "fused" if wanted == "fused" and supported(model) is None else "pytorch"


class FusedDecodeStep:
    """Callable like the model, `step(tokens, positions, cache, last_only=True)`: one C call when the step is
    1 to `cpu_kernels.MAX_ROWS` consecutive tokens of batch 1 into a fp32 `StaticCache`, the model otherwise."""

    def __init__(self, model: nn.Module):
        reason = supported(model)
        if reason:
            raise InvalidParameterError(f"the fused decode step cannot run this model: {reason}")
        self.model = model
        self._build()
        self._call = cpu_kernels._load()[0].decode_tokens

    def _build(self) -> None:
        """The C structures: pointers to the model's weights, norms and RoPE tables (rebuilt if they move)."""
        model, cfg = self.model, self.model.config
        self._keep: list[torch.Tensor] = []  # tensors made here whose pointers the structures hold
        embed = model.embed_tokens.weight.detach()
        self._layers = (Layer * cfg.num_layers)()
        self._struct = Model(
            num_layers=cfg.num_layers, hidden=cfg.hidden_size, num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size, max_length=0, embed_kind=W_BF16 if embed.dtype == torch.bfloat16 else W_F32,
            eps=model.norm.eps, embed=embed.data_ptr(), final_norm=model.norm.weight.data_ptr(),
            rope_cos=model.rope_cos.data_ptr(), rope_sin=model.rope_sin.data_ptr(),
            lm_head=self._linear(model.lm_head), layers=self._layers)
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            self._layers[i] = Layer(
                input_norm=block.input_layernorm.weight.data_ptr(),
                post_attention_norm=block.post_attention_layernorm.weight.data_ptr(),
                q=self._linear(attn.q_proj), k=self._linear(attn.k_proj), v=self._linear(attn.v_proj),
                o=self._linear(attn.o_proj), gate=self._linear(mlp.gate_proj), up=self._linear(mlp.up_proj),
                down=self._linear(mlp.down_proj))
        self._bound_cache = None
        self._address = ctypes.addressof(self._struct)
        self._embed_pointer = embed.data_ptr()

    def _linear(self, module: nn.Module) -> Linear:
        if isinstance(module, cpu_kernels.QuantizedGemvLinear):
            order = module.input_order
            if order is not None:
                order = order.to(torch.int64).contiguous()
                self._keep.append(order)
            return Linear(W_Q8 if module.bits == 8 else W_Q4, module.out_features, module.in_features,
                          module.group_size, module.weight.data_ptr(), _pointer(module.scales),
                          _pointer(module.offsets), _pointer(module.bias), _pointer(order))
        weight = module.weight.detach()
        kind = W_BF16 if weight.dtype == torch.bfloat16 else W_F32
        return Linear(kind, weight.shape[0], weight.shape[1], 0, weight.data_ptr(), None, None,
                      _pointer(module.bias), None)

    def _fits(self, tokens: torch.Tensor, cache) -> bool:
        return (type(cache) is StaticCache and tokens.shape[0] == 1 and tokens.shape[1] <= cpu_kernels.MAX_ROWS
                and cpu_kernels.available() and cache.keys[0].shape[0] == 1
                and cache.keys[0].dtype == torch.float32 and cache.keys[0].is_cpu
                and not torch.is_grad_enabled())

    def _bind(self, cache: StaticCache) -> None:
        """Point the layers at this cache's buffers (once per cache object)."""
        for i in range(len(self._layers)):
            self._layers[i].keys = cache.keys[i].data_ptr()
            self._layers[i].values = cache.values[i].data_ptr()
        self._struct.max_length = cache.max_length
        self._bound_cache = cache

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache=None, mask=None,
                 last_only: bool = False, logits_at=None) -> torch.Tensor:
        if mask is not None or logits_at is not None or not self._fits(tokens, cache):
            return self.model(tokens, positions, cache, mask=mask, last_only=last_only, logits_at=logits_at)
        count, slot = tokens.shape[1], cache.lengths[-1]
        positions = positions.reshape(-1)
        position = int(positions[0])
        consecutive = count == 1 or (positions.numel() == count
                                     and torch.equal(positions, torch.arange(position, position + count)))
        window = self.model.config.sliding_window
        if (not consecutive or slot + count > cache.max_length or position + count > self.model.rope_cos.shape[0]
                or (window and slot + count > window)):  # the C step attends every key: not past a window
            return self.model(tokens, positions, cache, last_only=last_only)  # the model (or its clear error)
        if self.model.embed_tokens.weight.data_ptr() != self._embed_pointer:  # the weights moved (e.g. `.to()`)
            reason = supported(self.model)
            if reason:
                raise InvalidParameterError(f"the fused decode step cannot run this model any more: {reason}")
            self._build()
        if cache is not self._bound_cache:
            self._bind(cache)
        ids = tokens if tokens.dtype == torch.int64 and tokens.is_contiguous() else tokens.to(torch.int64).contiguous()
        every = not last_only and count > 1
        logits = torch.empty(1, count if every else 1, self.model.config.vocab_size)
        self._call(self._address, ids.data_ptr(), count, position, slot, logits.data_ptr(), int(every))
        cache.lengths = [slot + count] * len(cache.lengths)
        return logits
