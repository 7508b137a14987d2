"""Locate: score heads, neurons, residual layers and SAE latents from contrastive prompts.

``locate(model, tokenizer, pairs, method=...)`` runs one of :data:`METHODS` and returns a
:class:`LocalizationResult` (``sae=site`` scores SAE latents as the ``"sae"`` kind);
``directions(...)`` extracts per-layer steering directions; ``slice_fisher(...)`` measures what training each
component costs on generic text and ``per_cost(result, cost)`` ranks by gain per unit of that cost.
"""

from .api import METHODS, locate
from .cost import per_cost, slice_fisher
from .directions import Directions, directions
from .result import LocalizationResult
from .sae_kind import Latent, LatentSet, latent_stats

__all__ = [
    "METHODS",
    "Directions",
    "Latent",
    "LatentSet",
    "LocalizationResult",
    "directions",
    "latent_stats",
    "locate",
    "per_cost",
    "slice_fisher",
]
