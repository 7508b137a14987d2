"""mi-peft: turn mechanistic-interpretability findings into PEFT adapters (Locate -> Steer -> Improve)."""

from . import arch, capture
from .arch import ArchSpec, spec_for
from .components import ComponentSet, Head, Neuron, Residual
from .models import load_model

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "ComponentSet",
    "Head",
    "Neuron",
    "Residual",
    "__version__",
    "arch",
    "capture",
    "load_model",
    "spec_for",
]
