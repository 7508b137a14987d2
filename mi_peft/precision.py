"""Training and evaluation precision: bfloat16 autocast where the hardware multiplies bfloat16 natively.

On a CPU with bfloat16 matrix units (Intel AMX, AVX-512-BF16, Arm's BF16 extension) autocast runs the
matmuls in bfloat16 and keeps weights, optimizer state and reductions in float32: measured by
``benchmarks/adapters.py`` on the embedded model, sparse steps ran 1.65-2.18x faster and the held-out
loss after 20 steps matched float32's to 2e-4. Without such units, bfloat16
is emulated and several times *slower*, so ``"auto"`` keeps float32 there. Locating stays in float32
everywhere: attribution scores are differences of small gradients.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: recipes and the CLI parser check precision names without it
    import torch

PRECISIONS = ("auto", "float32", "bfloat16")
# Linux /proc/cpuinfo flags of CPUs that multiply bfloat16 in hardware (x86: AMX, AVX-512-BF16; Arm: BF16).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flag() -> str | None:
    """The first bfloat16 matrix-unit flag this CPU reports, or ``None``.

    Read from Linux's ``/proc/cpuinfo``; elsewhere ``None``, so ``"auto"`` stays float32 (pass
    ``"bfloat16"`` explicitly on such machines).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return cpu_bf16_flag_from(text)


def cpu_bf16_flag_from(cpuinfo: str) -> str | None:
    """The bfloat16 flag in a ``/proc/cpuinfo`` text (x86 ``flags`` or Arm ``Features`` lines)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def check_precision(precision: str, where: str = "precision") -> str:
    """``precision`` unchanged if it is one of :data:`PRECISIONS`, else a ValueError that lists them."""
    if precision not in PRECISIONS:
        raise ValueError(f"`{where}` must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    return precision


def resolve_precision(precision: str = "auto", device: str | torch.device | None = None) -> str:
    """``"float32"`` or ``"bfloat16"``: ``"auto"`` picks bfloat16 on a bf16-capable GPU or CPU, float32 elsewhere.

    ``device`` is where the work runs (default: CUDA when available, else the CPU).
    """
    import torch

    check_precision(precision)
    if precision != "auto":
        return precision
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if kind == "cpu" and cpu_bf16_kernels() else "float32"


def cpu_bf16_kernels() -> bool:
    """The CPU has bfloat16 matrix units AND torch dispatches to them.

    On x86 the units are only used by AVX-512 kernels: torch capped below them (``ATEN_CPU_CAPABILITY=avx2``,
    an old build, a VM that hides AVX-512 state) emulates bfloat16 and runs several times slower.
    """
    import torch

    flag = cpu_bf16_flag()
    if flag is None:
        return False
    return flag == "bf16" or torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


@contextlib.contextmanager
def autocast(precision: str = "auto", device: str | torch.device | None = None) -> Iterator[str]:
    """Run the block under bfloat16 autocast when ``precision`` resolves to bfloat16; yields the resolved name."""
    import torch

    resolved = resolve_precision(precision, device)
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=resolved == "bfloat16"):
        yield resolved
