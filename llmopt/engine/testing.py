"""Tiny random-weight models for fast tests (and a transformers twin to check them against)."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .loading import build_model

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


def tiny_hf_config(model_type: str = "llama", **overrides):
    """A small transformers config of the Llama / Qwen2 / Mistral family."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    kwargs = {**TINY, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    return classes[model_type](**kwargs)


def tiny_pair(model_type: str = "llama", seed: int = 0, dtype=torch.float32, init_std: float = 0.2, **overrides):
    """(transformers model, our Transformer) with the same random weights.

    `init_std` is larger than transformers' 0.02 so logits are peaked and greedy decoding has no near-ties."""
    from transformers import AutoModelForCausalLM

    hf_config = tiny_hf_config(model_type, **overrides)
    hf_config.initializer_range = init_std
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    ours = build_model(ModelConfig.from_hf(hf_config), hf_model.state_dict(), dtype=dtype)
    return hf_model.to(dtype), ours


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """Just our model, random weights."""
    return tiny_pair(model_type, seed, dtype, **overrides)[1]


def truncated(model, num_layers: int):
    """`model` keeping only its first `num_layers` blocks: a real vocabulary and tokenizer at a fraction of the
    compute, for notebook smoke runs (the outputs are meaningless)."""
    model.layers = model.layers[:num_layers]
    model.config.num_layers = num_layers
    return model


# Random-weight checkpoints with the widths real checkpoints have and round numbers lack: hidden and
# intermediate sizes that 64 does not divide, odd head counts, GQA ratios 1 and 4, tied and untied heads, q/k/v
# biases, a sliding window. SmolLM2's tokenizer gives them a real vocabulary, so every notebook runs on them.
AWKWARD = {
    "llama": dict(hidden_size=96, intermediate_size=224, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=3, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=1, tie_word_embeddings=False),
    "mistral": dict(hidden_size=160, intermediate_size=416, num_hidden_layers=2, num_attention_heads=5,
                    num_key_value_heads=5, tie_word_embeddings=False, sliding_window=4096),
}


def save_random_checkpoint(directory, model_type: str, tokenizer_dir, seed: int = 0, **overrides):
    """Save a seeded random-weight transformers checkpoint of `model_type` with the AWKWARD widths (and
    `overrides`) and the tokenizer files of `tokenizer_dir` into `directory`; returns the directory."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = {**AWKWARD[model_type], "vocab_size": len(tokenizer), "max_position_embeddings": 8192,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, **overrides}
    config = tiny_hf_config(model_type, **kwargs)
    config.initializer_range = 0.2  # peaked logits, as tiny_pair
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    template = Path(tokenizer_dir) / "chat_template.jinja"
    if template.exists():
        shutil.copy(template, directory / template.name)
    return directory
