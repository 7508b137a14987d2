"""The one place that imports ``sae_lens``, so a missing install fails with the command that fixes it.

``sae-lens`` is an optional extra (``pip install 'mi-peft[sae]'``); everything else in mi-peft imports
without it, including :mod:`mi_peft.sae.adapter`, so saved SAE adapters load on machines without it.
"""

from __future__ import annotations

from types import ModuleType

INSTALL = "pip install 'mi-peft[sae]'  (or: pip install 'sae-lens>=6.54')"


def require_sae_lens() -> ModuleType:
    """The ``sae_lens`` module, or an ImportError that names the install command."""
    try:
        import sae_lens
    except ImportError as err:  # pragma: no cover - exercised only where sae-lens is missing
        raise ImportError(f"mi_peft.sae needs the sae-lens package, which is not installed: {INSTALL}") from err
    return sae_lens


def is_sae(obj: object) -> bool:
    """Whether ``obj`` is a sae-lens ``SAE`` (inference or training class)."""
    return isinstance(obj, require_sae_lens().SAE)
