"""SAE features, the fifth interpretable object: train or load a sparse autoencoder, locate, explain, steer.

Built on ``sae-lens`` (optional extra: ``pip install 'mi-peft[sae]'``). Importing this package does not
import sae-lens; the functions that need it raise an ImportError naming the install command. The PEFT
adapter (:class:`SAESteeringConfig`) needs no sae-lens to load, and is registered when ``mi_peft`` is imported.

Example:
    >>> from mi_peft import load_model, ContrastivePairs
    >>> from mi_peft import locate, sae
    >>> model, tok = load_model()
    >>> site = sae.train_sae(model, tok, paragraphs, layer=15)          # or sae.load_sae(folder, model)
    >>> pairs = ContrastivePairs.load("recipes/data/refusal").subset(32)
    >>> result = locate(model, tok, pairs, method="attribution_patching", sae=site)  # or sae.locate_latents(...)
    >>> top = [latent for (_, latent), _ in result.top("sae", 5, sign="positive")]
    >>> for e in sae.explain_latents(model, tok, site, top, paragraphs):
    ...     print(e.render())
    >>> steered = get_peft_model(model, sae.SAESteeringConfig.from_sae(site, top, op="add", alpha=4.0))
"""

from ..locate.sae_kind import Latent, LatentSet, latent_stats
from ._lens import INSTALL, require_sae_lens
from .adapter import SAESteeringConfig, SAESteeringLayer, SAESteeringModel, encode_rows
from .explain import LatentExplanation, explain_latents
from .latents import SAE_METHODS, locate_latents, resolve_sites
from .site import (
    SAESite,
    attach,
    hook_layer,
    intervene,
    latent_acts,
    load_pretrained_sae,
    load_sae,
    resid_hook_name,
    residual_at,
    residuals_at,
    sae_positions,
)
from .train import SAEStats, collect_activations, reconstruction_stats, train_sae

__all__ = [
    "INSTALL",
    "SAE_METHODS",
    "Latent",
    "LatentExplanation",
    "LatentSet",
    "SAESite",
    "SAEStats",
    "SAESteeringConfig",
    "SAESteeringLayer",
    "SAESteeringModel",
    "attach",
    "collect_activations",
    "encode_rows",
    "explain_latents",
    "hook_layer",
    "intervene",
    "latent_acts",
    "latent_stats",
    "load_pretrained_sae",
    "load_sae",
    "locate_latents",
    "reconstruction_stats",
    "require_sae_lens",
    "resid_hook_name",
    "residual_at",
    "residuals_at",
    "resolve_sites",
    "sae_positions",
    "train_sae",
]
