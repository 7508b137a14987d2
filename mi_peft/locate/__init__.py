"""Locate: score heads, neurons and residual layers from contrastive prompts.

``locate(model, tokenizer, pairs, method=...)`` runs one of :data:`METHODS` and returns a
:class:`LocalizationResult`; ``directions(...)`` extracts per-layer steering directions.
"""

from .api import METHODS, locate
from .directions import Directions, directions
from .result import LocalizationResult

__all__ = ["METHODS", "Directions", "LocalizationResult", "directions", "locate"]
