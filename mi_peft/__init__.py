"""mi-peft: turn mechanistic-interpretability findings into PEFT adapters (Locate -> Steer -> Improve).

Importing this package registers the ``sparse``, ``steering`` and ``sae_steering`` adapter types with PEFT, so
``PeftModel.from_pretrained(base, adapter_dir)`` works after ``import mi_peft`` in every process.
"""

__version__ = "0.1.0"

from . import arch, capture, data, metrics, sae, tuners  # noqa: E402
from .arch import ArchSpec, spec_for  # noqa: E402
from .components import ComponentSet, Head, Neuron, Residual  # noqa: E402
from .data import ContrastivePairs  # noqa: E402
from .lens import LensResult, logit_lens  # noqa: E402
from .locate import Directions, LocalizationResult, directions, locate  # noqa: E402
from .models import load_model  # noqa: E402
from .tuners import SparseConfig, SteeringConfig, save_adapter  # noqa: E402

__all__ = [
    "ArchSpec",
    "ComponentSet",
    "ContrastivePairs",
    "Directions",
    "Head",
    "LensResult",
    "LocalizationResult",
    "Neuron",
    "Residual",
    "SparseConfig",
    "SteeringConfig",
    "__version__",
    "arch",
    "capture",
    "data",
    "directions",
    "load_model",
    "locate",
    "logit_lens",
    "metrics",
    "sae",
    "save_adapter",
    "spec_for",
    "tuners",
]
