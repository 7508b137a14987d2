"""The SAE row of a recipe run: steer with the SAE latents that separate the recipe's pairs.

With ``steer.sae`` set, ``mi-peft run`` trains (or loads from the cache) an SAE on one layer, ranks its
latents by ``mean_diff`` on the same pairs that diff-in-means steering uses, adds the top latents'
decoder rows (:class:`~mi_peft.sae.SAESteeringConfig`, ``op="add"``) and picks the strength on the
validation items. The row sits next to diff-in-means steering in the report, scored on the same
held-out prompts, so the two ways of finding a steering direction are compared directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..data import ContrastivePairs, format_prompts
from ..evaluate.general import general_data_dir, load_paragraphs
from ..recipe import is_finite_number
from .adapter import SAESteeringConfig


@dataclass(frozen=True)
class SAESteerOptions:
    """``steer.sae`` of a recipe: the SAE to train and how many of its latents steer, at which strengths."""

    layer: int
    d_sae: int = 2048
    k: int = 32
    tokens: int = 40_000
    epochs: int = 3
    lr: float = 3e-3  # 40,000 activations x 3 epochs is ~120 Adam steps: 1e-3 leaves most latents dead
    top_k: int = 5
    alphas: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    texts: str | None = None  # a text file (a paragraph per line), relative to the recipe; None: WikiText-2 valid

    @classmethod
    def from_raw(cls, raw: Any, where: str) -> SAESteerOptions:
        """Checked options from the recipe's ``steer.sae`` mapping; errors name the key and the fix."""
        if not isinstance(raw, Mapping) or "layer" not in raw:
            raise ValueError(f"{where}: `steer.sae` must be a mapping with at least `layer`, e.g. {{layer: 15}}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown `steer.sae` keys {unknown}; known keys: {sorted(known)}.")
        for key in ("layer", "d_sae", "k", "tokens", "epochs", "top_k"):
            value = raw.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "layer" else 1):
                raise ValueError(f"{where}: `steer.sae.{key}` must be a positive integer, got {value!r}.")
        if not is_finite_number(raw.get("lr", 1.0)) or raw.get("lr", 1.0) <= 0:
            raise ValueError(f"{where}: `steer.sae.lr` must be a positive number, got {raw['lr']!r}.")
        alphas = raw.get("alphas", cls.alphas)
        if not isinstance(alphas, (list, tuple)) or not alphas or not all(is_finite_number(a) for a in alphas):
            raise ValueError(f"{where}: `steer.sae.alphas` must be a non-empty list of numbers, got {alphas!r}.")
        return cls(**{**raw, "alphas": tuple(float(a) for a in alphas)})


HELD_OUT_PARAGRAPHS = 32  # generic paragraphs kept out of SAE training to measure its reconstruction


def training_texts(
    options: SAESteerOptions, tokenizer: Any, pairs: ContrastivePairs, base: Path
) -> tuple[list[str], list[str]]:
    """(training texts, held-out paragraphs): generic text plus the pairs' chat-formatted prompts, so the
    SAE also sees the recipe's prompt format. The first paragraphs of the generic text are held out to
    measure the SAE's reconstruction. The default corpus, WikiText-2's validation split, shares no text with
    the test excerpt that the run's perplexity column reads."""
    source = base / options.texts if options.texts else general_data_dir() / "wikitext2_valid.txt"
    if not source.is_file():
        raise FileNotFoundError(f"`steer.sae.texts`: {source} does not exist; give a text file (a paragraph per line).")
    paragraphs = load_paragraphs(source)
    if len(paragraphs) <= 2 * HELD_OUT_PARAGRAPHS:
        raise ValueError(
            f"`steer.sae.texts`: {source} has {len(paragraphs)} paragraphs; an SAE needs more than "
            f"{2 * HELD_OUT_PARAGRAPHS} (the first {HELD_OUT_PARAGRAPHS} measure its reconstruction)."
        )
    train = paragraphs[HELD_OUT_PARAGRAPHS:] + format_prompts(tokenizer, pairs.positive + pairs.negative)
    return train, paragraphs[:HELD_OUT_PARAGRAPHS]


def sae_steering(
    model: Any,
    tokenizer: Any,
    options: SAESteerOptions,
    pairs: ContrastivePairs,
    sweep: Callable[[Callable[[float], SAESteeringConfig], tuple[float, ...]], list[dict[str, float]]],
    pick: Callable[[list[dict[str, float]]], float],
    base: Path,
) -> tuple[dict[str, Any], SAESteeringConfig]:
    """Train/load the SAE, take the ``top_k`` latents that fire more on the positive side, sweep the alphas.

    ``sweep(make_config, alphas)`` scores each alpha on the validation items and ``pick`` chooses one (the
    recipe run passes the same two functions it uses for residual steering). Returns the report info and
    the chosen adapter config.
    """
    from ..locate import locate
    from .train import reconstruction_stats, train_sae

    texts, held_out = training_texts(options, tokenizer, pairs, base)
    site = train_sae(
        model, tokenizer, texts, layer=options.layer, d_sae=options.d_sae, k=options.k,
        tokens=options.tokens, epochs=options.epochs, lr=options.lr,
    )  # fmt: skip
    stats = reconstruction_stats(model, tokenizer, site, held_out)
    result = locate(model, tokenizer, pairs, method="mean_diff", sae=site, progress=False)
    latents = [int(latent) for (_, latent), _ in result.top("sae", options.top_k, sign="positive")]

    def config(alpha: float) -> SAESteeringConfig:
        return SAESteeringConfig.from_sae(site, latents, op="add", alpha=alpha)

    scores = sweep(config, options.alphas)
    alpha = pick(scores)
    info = {
        "layer": options.layer,
        "d_sae": options.d_sae,
        "latents": latents,
        "reconstruction": asdict(stats),
        "sweep": scores,
        "best_alpha": alpha,
    }
    return info, config(alpha)
