"""Named model shapes: a known model's architecture with seeded random weights, for `-p model=shape:NAME`.

Speed, memory and KV-cache measurements depend on a model's shapes and the lengths it runs at, not on what its
weights say. A shape gives those measurements at a size whose weights are not reachable here (no model hub):
`shape:qwen2.5-0.5b` is the model the design document's estimates were made for. The architecture is the real
one (hidden size, layers, heads, vocabulary, RoPE, biases, tied embeddings); the weights are random (normal,
std 0.02 like transformers' initializer, norms 1, biases 0), drawn from a fixed seed so the same name and seed
always give the same weights; the tokenizer is the default model's (SmolLM2's; its ids are < 49152, so they fit
every vocabulary here). Quality-dependent numbers (perplexity, speculative acceptance, EOS-driven lengths) are
meaningless on a shape.

The weights are written once as a transformers checkpoint under the cache (`cache_dir()/shapes/NAME-seedN`: bf16
safetensors, config.json, the tokenizer files), so transformers peers load the very same model with
`from_pretrained(lm.checkpoint)`. To add a shape, add its config.json's architecture fields to `SHAPES`.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidParameterError
from ..paths import cache_dir

PREFIX = "shape:"
INIT_STD = 0.02
INIT_RECIPE = ("normal(0, 0.02) per weight in named order from one torch.Generator(seed), fp32 then bf16; "
               "norms 1, biases 0")
SAVED_DTYPE = "bfloat16"  # what the checkpoint holds: half of fp32's disk and load time; fp32 loads are exact


@dataclass(frozen=True)
class Shape:
    """A model's architecture: its title and its config.json's architecture fields (transformers config kwargs)."""
    title: str
    config: dict = field(default_factory=dict)


SHAPES: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape("Qwen2.5-0.5B", dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=32768, max_window_layers=24, hidden_act="silu")),
    "smollm2-135m": Shape("SmolLM2-135M", dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, hidden_act="silu")),
    "llama-3.2-1b": Shape("Llama-3.2-1B", dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu")),
}


def is_shape(name) -> bool:
    """Whether a model value names a shape (`shape:NAME` or `shape:NAME@SEED`)."""
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


def parse(name: str) -> tuple[str, int]:
    """`shape:NAME[@SEED]` -> (NAME, SEED); an unknown name or a bad seed is an InvalidParameterError."""
    text = name.strip()[len(PREFIX):].strip().lower()
    key, _, seed_text = text.partition("@")
    if key not in SHAPES:
        raise InvalidParameterError(f"unknown model shape {key!r} in {name!r}; known shapes: "
                                    f"{', '.join(PREFIX + k for k in SHAPES)} (optionally @SEED, e.g. "
                                    f"{PREFIX}{next(iter(SHAPES))}@1)")
    try:
        seed = int(seed_text) if seed_text else 0
    except ValueError:
        seed = -1
    if seed < 0:
        raise InvalidParameterError(f"bad seed {seed_text!r} in {name!r}: write {PREFIX}{key}@N with an integer N >= 0")
    return key, seed


def hf_config(key: str, tokens: dict | None = None):
    """The transformers config of shape `key`, with the default tokenizer's special token ids (`tokens`)."""
    from transformers import AutoConfig

    kwargs = copy.deepcopy(SHAPES[key].config)
    kwargs.update(initializer_range=INIT_STD, **(tokens or {}))
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def describe(cfg) -> str:
    """A shape's numbers in words, from our `ModelConfig`."""
    parts = [f"hidden {cfg.hidden_size}", f"{cfg.num_layers} layers",
             f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads", f"head_dim {cfg.head_dim}",
             f"intermediate {cfg.intermediate_size}", f"vocab {cfg.vocab_size}",
             "tied embeddings" if cfg.tie_word_embeddings else "untied lm_head", f"rope_theta {cfg.rope_theta:.10g}"]
    if cfg.qkv_bias:
        parts.append("q/k/v bias")
    parts.append(f"{cfg.num_params / 1e6:.0f}M parameters")
    return ", ".join(parts)


def display_name(key: str, seed: int = 0) -> str:
    """What `LoadedModel.name` says for a shape."""
    return f"{SHAPES[key].title} shape (random weights{'' if seed == 0 else f', seed {seed}'})"


def source_note(key: str, seed: int, cfg) -> str:
    """What `LoadedModel.source_note` says for a shape (reports print it)."""
    return (f"random weights (seed {seed}) with the shape of {SHAPES[key].title} ({describe(cfg)}): for measurements "
            "that depend only on shapes and lengths (speed, memory, KV cache); quality-dependent numbers (perplexity, "
            "speculative acceptance, EOS-driven lengths) are meaningless on it. Tokenizer: the default model's "
            "(SmolLM2-135M-Instruct)")


def random_state_dict(cfg, seed: int = 0, dtype=None) -> dict:
    """Seeded random weights for our `ModelConfig` `cfg`, as a transformers state dict (`model.`-prefixed keys;
    no `lm_head.weight` when tied). Each weight is drawn in fp32 and cast to `dtype` (bf16 by default) one tensor
    at a time, so the whole model never sits in memory in fp32."""
    import torch

    from .model import Transformer

    dtype = dtype or getattr(torch, SAVED_DTYPE)
    with torch.device("meta"):
        skeleton = Transformer(cfg)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in skeleton.named_parameters():  # tied lm_head is the embedding: named once
        if name.endswith("norm.weight"):
            value = torch.ones(p.shape, dtype=dtype)
        elif name.endswith(".bias"):
            value = torch.zeros(p.shape, dtype=dtype)
        else:
            value = torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(INIT_STD).to(dtype)
        state[name if name == "lm_head.weight" else "model." + name] = value
    return state


def _fingerprint(key: str, seed: int) -> dict:
    return {"shape": key, "title": SHAPES[key].title, "seed": seed, "config": SHAPES[key].config,
            "init": INIT_RECIPE, "dtype": SAVED_DTYPE}


def checkpoint_dir(name: str, tokenizer_dir: Path | None = None) -> Path:
    """The checkpoint directory of `shape:NAME[@SEED]`, written on first use (atomically, like the default model's
    conversion in `loading.py`) and rewritten when the registry entry or the init recipe changed. The tokenizer
    files come from `tokenizer_dir` (loading passes the default model's)."""
    from safetensors.torch import save_file

    from .config import ModelConfig

    key, seed = parse(name)
    target = cache_dir() / "shapes" / f"{key}-seed{seed}"
    fingerprint = _fingerprint(key, seed)
    marker = target / "llmopt_source.json"
    if marker.is_file() and (target / "model.safetensors").is_file():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == json.loads(json.dumps(fingerprint)):
                return target
        except ValueError:
            pass
    if tokenizer_dir is None:
        raise InvalidParameterError("a shape checkpoint needs a tokenizer directory")
    tokenizer_dir = Path(tokenizer_dir)
    default_config = json.loads((tokenizer_dir / "config.json").read_text())
    tokens = {k: default_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in default_config}
    config = hf_config(key, tokens)
    config.dtype = SAVED_DTYPE
    cfg = ModelConfig.from_hf(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        save_file(random_state_dict(cfg, seed), str(staging / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(staging)
        for f in tokenizer_dir.iterdir():  # the default model's tokenizer (and its generation defaults)
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in (
                    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                    "added_tokens.json", "generation_config.json")):
                shutil.copy(f, staging / f.name)
        (staging / "llmopt_source.json").write_text(json.dumps(
            {"fingerprint": fingerprint, "tokenizer_from": str(tokenizer_dir),
             "note": source_note(key, seed, cfg)}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a crash never leaves a half-written checkpoint
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
