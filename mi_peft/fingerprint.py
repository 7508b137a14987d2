"""Model fingerprints: a short hash that tells whether two models are the same base model.

Results and adapters record the fingerprint of the model they were made on, so that loading
them onto a different base fails loudly instead of silently producing nonsense.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from .arch import _unwrap

_SAMPLE = 64  # values sampled from each weight


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config (architecture fields) and a fixed sample of every base weight.

    Adapter parameters of a PEFT-wrapped model are excluded, so a model keeps its fingerprint
    after ``get_peft_model``. Stable across devices and float32/bfloat16 copies is NOT promised:
    the sample is hashed at float32 precision rounded to 4 significant digits.
    """
    base = _unwrap(model)
    config = base.config.to_dict()
    keep = {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE}
    digest = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, param in sorted(base.named_parameters(), key=lambda kv: kv[0]):
        name = name.replace(".base_layer", "")
        if any(tag in name for tag in _ADAPTER_TAGS):
            continue
        flat = param.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLE, flat.numel()), dtype=torch.float64).long()
        values = flat[idx.to(flat.device)].float().cpu()
        digest.update(name.encode())
        digest.update(",".join(f"{v:.4g}" for v in values.tolist()).encode())
    return digest.hexdigest()[:16]


_VOLATILE = {"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures", "quantization_config"}
_ADAPTER_TAGS = ("lora_", "sparse_", "steer_")


class FingerprintMismatchError(ValueError):
    """Raised when a saved result or adapter is applied to a different base model."""


def check_fingerprint(expected: str | None, model: nn.Module, what: str, override: bool = False) -> None:
    """Raise :class:`FingerprintMismatchError` unless ``model`` matches ``expected``."""
    if expected is None or override:
        return
    actual = model_fingerprint(model)
    if actual != expected:
        raise FingerprintMismatchError(
            f"{what} was made on a different base model (fingerprint {expected}, this model {actual}). "
            "Load the base model it was made for, or pass `ignore_fingerprint=True` to apply it anyway."
        )
