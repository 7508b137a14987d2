"""Model fingerprints: a short string that tells whether two models are the same base model.

Results and adapters record the fingerprint of the model they were made on, so that loading
them onto a different base fails loudly instead of silently producing nonsense.

The same checkpoint in float32, bfloat16 or float16, and a bitsandbytes 4-bit copy of it, share a
fingerprint: an adapter trained on a 4-bit or bf16 base loads onto the float original (the way to
merge it). Exact hashing of weight values cannot give that: casting a float32 weight to float16 and
then rounding to bfloat16 differs from rounding it to bfloat16 directly for about one value in 16,
so any fixed rounding rule splits some values of one checkpoint. A fingerprint therefore has two
parts, ``"<structure>.<codes>"``:

* ``structure``: a hash of the architecture config and the name and shape of every base parameter
  (a quantized weight counts with its unquantized shape);
* ``codes``: :data:`_SAMPLES` fixed-position values of each of :data:`_PROBES` parameters, each coded
  as ``round(63 * value / max |sampled value|)``. A dtype cast moves a code by at most 1; another
  checkpoint (other seed, a fine-tune) moves many codes by more. Quantized weights (bitsandbytes
  keeps embeddings, norms and the unembedding in float) count as unknown.

:func:`fingerprints_match` compares two fingerprints with that tolerance; a change confined to
unsampled weights goes unnoticed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from .arch import _unwrap

_PROBES = 8  # parameters whose values are sampled: the input embedding + evenly spaced others
_SAMPLES = 16  # values sampled from each probe
_LEVELS = 63  # code of the largest sampled magnitude; a bf16 cast moves a code by < 0.6
_UNKNOWN = ".."  # code of a sample from a quantized weight
_SEPARATOR = "."


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of ``model``'s base weights: ``"<structure hash>.<value codes>"``.

    Adapter parameters of a PEFT-wrapped model are excluded, so a model keeps its fingerprint
    after ``get_peft_model``. Equal structure and codes within 1 of each other mean the same base
    model in any float dtype or 4-bit quantization (see :func:`fingerprints_match`).
    """
    base = _unwrap(model)
    params = _base_parameters(base)
    digest = hashlib.sha256(json.dumps(_config_record(base), sort_keys=True, default=str).encode())
    for name, param in params:
        digest.update(f"{name}:{tuple(_logical_shape(param))};".encode())
    codes = "".join(_codes(param) for _, param in _probes(base, params))
    return f"{digest.hexdigest()[:16]}{_SEPARATOR}{codes}"


def fingerprints_match(expected: str, actual: str) -> bool:
    """Whether two fingerprints name the same base model (same structure, every known code within 1)."""
    if _SEPARATOR not in expected or _SEPARATOR not in actual:
        return expected == actual
    (structure_a, codes_a), (structure_b, codes_b) = expected.split(_SEPARATOR, 1), actual.split(_SEPARATOR, 1)
    if structure_a != structure_b or len(codes_a) != len(codes_b):
        return False
    for i in range(0, len(codes_a), 2):
        a, b = codes_a[i : i + 2], codes_b[i : i + 2]
        if _UNKNOWN in (a, b):
            continue
        if abs(int(a, 16) - int(b, 16)) > 1:
            return False
    return True


# Config keys that do not change what the network computes. Trainers rewrite the special-token ids to
# match the tokenizer (TRL's SFTTrainer sets pad/eos), which must not turn the model into "another model".
_VOLATILE = {
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "architectures",
    "quantization_config",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
}
_ADAPTER_TAGS = ("lora_", "sparse_", "steer_")


def _config_record(base: nn.Module) -> dict:
    config = base.config.to_dict()
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE}


def _base_parameters(base: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name without PEFT's ``.base_layer``, parameter) of every non-adapter parameter, sorted by name."""
    out = []
    for name, param in base.named_parameters():
        name = name.replace(".base_layer", "")
        if not any(tag in name for tag in _ADAPTER_TAGS):
            out.append((name, param))
    return sorted(out, key=lambda kv: kv[0])


def _logical_shape(param: torch.Tensor) -> torch.Size:
    """The unquantized shape (bitsandbytes ``Params4bit`` stores packed bytes ``[n / 2, 1]``)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return torch.Size(shape) if shape is not None else param.shape


def _probes(base: nn.Module, params: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The input embedding (never quantized) plus parameters evenly spaced in name order."""
    if not params:
        return []
    picks = torch.linspace(0, len(params) - 1, min(_PROBES - 1, len(params))).round().long().unique().tolist()
    chosen = [params[i] for i in picks]
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and not any(p is weight for _, p in chosen):
        chosen.insert(0, ("<input embedding>", weight))
    return chosen


def _codes(param: torch.Tensor) -> str:
    """Two hex digits per sampled value: ``64 + round(63 * value / max |sample|)``, or ``..`` if quantized."""
    if not param.dtype.is_floating_point or getattr(param, "quant_state", None) is not None:
        return _UNKNOWN * _SAMPLES
    flat = param.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, _SAMPLES, dtype=torch.float64).round().long()
    values = flat[idx.to(flat.device)].to("cpu", torch.float64)
    scale = values.abs().max()
    codes = torch.zeros_like(values) if scale == 0 else (values / scale * _LEVELS).round()
    codes = torch.nan_to_num(codes, nan=0.0).long() + 64
    return "".join(f"{int(c):02x}" for c in codes.tolist())


class FingerprintMismatchError(ValueError):
    """Raised when a saved result or adapter is applied to a different base model."""


def check_fingerprint(expected: str | None, model: nn.Module, what: str, override: bool = False) -> None:
    """Raise :class:`FingerprintMismatchError` unless ``model`` matches ``expected``."""
    if expected is None or override:
        return
    actual = model_fingerprint(model)
    if not fingerprints_match(expected, actual):
        raise FingerprintMismatchError(
            f"{what} was made on a different base model (fingerprint {_short(expected)}, this model "
            f"{_short(actual)}). Load the base model it was made for (any float dtype or its 4-bit copy matches), "
            "or pass `ignore_fingerprint=True` to apply it anyway."
        )


def _short(fingerprint: str) -> str:
    return fingerprint if len(fingerprint) <= 24 else fingerprint[:24] + "..."


def stamp_or_check_fingerprint(config: Any, model: nn.Module, what: str) -> None:
    """A new adapter config records ``model``'s fingerprint; a loaded one must match it (unless overridden)."""
    if config.base_model_fingerprint is None:
        config.base_model_fingerprint = model_fingerprint(model)
    else:
        check_fingerprint(config.base_model_fingerprint, model, what, config.ignore_fingerprint)
