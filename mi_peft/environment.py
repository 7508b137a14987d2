"""What a run ran on, recorded in every ``results.json`` so that two reports can be compared number by number.

Greedy replies and log-likelihoods move with the library versions (attention kernels, GGUF
dequantization), with the CPU class (``precision: auto`` trains under bfloat16 autocast only where the
CPU or GPU has bfloat16 units) and with the exact base weights. A difference between two reports can be
explained only when these are on record: equal ``weights_sha256`` and packages with different numbers
point at the code (``source_commit`` names it in a git checkout); a different ``weights_sha256`` points
at the model.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import _unwrap
from .fingerprint import _base_parameters, model_fingerprint
from .precision import cpu_bf16_flag, resolve_precision

PACKAGES: tuple[str, ...] = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "mi-peft")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every base parameter's name, dtype, shape and bytes (adapter weights excluded, tied ones once).

    Exact, unlike :func:`~mi_peft.fingerprint.model_fingerprint`, which is built to survive dtype casts:
    this one tells whether two runs scored the very same numbers.
    """
    digest = hashlib.sha256()
    for name, param in _base_parameters(_unwrap(model)):
        data = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_commit() -> str | None:
    """Git commit of the checkout this package runs from (``+dirty`` with uncommitted tracked changes).

    ``None`` for an installed wheel or when git is unavailable: the package version stands for the code then.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        run = [["git", "-C", str(root), *args] for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "-uno"])]
        commit, changes = (
            subprocess.run(a, capture_output=True, text=True, timeout=20, check=True).stdout for a in run
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.strip() + ("+dirty" if changes.strip() else "")


def run_environment(model: nn.Module, precision: str = "auto") -> dict[str, Any]:
    """Library versions, machine, training precision and base-model identity of a run on ``model``."""
    cuda = torch.cuda.is_available()
    return {
        "source_commit": source_commit(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flag": cpu_bf16_flag(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch_threads": torch.get_num_threads(),
        "train_precision": resolve_precision(precision),
        "model_fingerprint": model_fingerprint(model),
        "weights_sha256": weights_sha256(model),
    }
