"""llmopt: a plain Llama/Qwen2 decoder and the six classic inference optimizations, each measured.

Quick start:
    from llmopt import load_model, Decoder, GenerationConfig
    lm = load_model()                       # SmolLM2-135M-Instruct (dequantized Q4_1 GGUF), fp32, cpu
    decoder = Decoder(lm.model, lm.tokenizer, cache="static")
    print(decoder.generate("Why is the sky blue?", GenerationConfig(max_new_tokens=40), chat=True).text)
"""
from .engine.generate import Decoder, Generation, GenerationConfig
from .engine.loading import load_model
from .errors import LLMOptError

__all__ = ["load_model", "Decoder", "Generation", "GenerationConfig", "LLMOptError"]
__version__ = "0.1.0"
