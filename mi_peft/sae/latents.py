"""Locate SAE latents for a behaviour: which latents fire more on the positive side of contrastive pairs.

``mean_diff`` scores each latent by its mean activation on positive prompts minus on negative ones, in
one vectorised pass per batch (``[batch, pos, d_sae]`` latents, masked mean or last token). The result
is a :class:`LatentScores`: ``top(k)`` for the latents to explain or steer with, ``save``/``load`` with
the model fingerprint and data hash, like :class:`~mi_peft.locate.LocalizationResult` for components.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from .._io import load_tensors_folder, save_tensors_folder
from ..data import ContrastivePairs, check_positive
from ..fingerprint import check_fingerprint, model_fingerprint
from .site import SAESite, latent_acts, sae_positions

POSITIONS: tuple[str, ...] = ("last", "mean")
SIGNS: tuple[str, ...] = ("abs", "positive", "negative")
SCORES_FILE, META_FILE, FORMAT_VERSION = "latents.safetensors", "latents.json", 1
_STATS = ("mean_positive", "mean_negative", "freq_positive", "freq_negative")


@dataclass(eq=False)
class LatentScores:
    """Per-latent scores of one SAE and how they were obtained.

    Args:
        scores (`Tensor`): ``[d_sae]`` float32; ``mean_positive - mean_negative`` for ``mean_diff``.
        stats (`dict[str, Tensor]`): ``[d_sae]`` each: mean activation and firing frequency per side.
        layer, hook_name: where the SAE reads. method, positions: how the scores were made.
        model_fingerprint, data_hash: identity of the model and the contrastive pairs.
    """

    scores: torch.Tensor
    layer: int
    hook_name: str
    method: str = "mean_diff"
    positions: str = "last"
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    model_fingerprint: str | None = None
    data_hash: str | None = None
    n_pairs: int | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: str = __version__

    def __post_init__(self) -> None:
        if not isinstance(self.scores, torch.Tensor) or self.scores.dim() != 1 or self.scores.numel() == 0:
            raise ValueError("`scores` must be a non-empty 1-D tensor [d_sae].")
        self.scores = self.scores.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(self.scores).all():
            raise ValueError("`scores` contains NaN or infinite values; the SAE or the activations are broken.")
        for name, value in self.stats.items():
            if tuple(value.shape) != tuple(self.scores.shape):
                raise ValueError(
                    f"stats[{name!r}] has shape {tuple(value.shape)}, expected {tuple(self.scores.shape)}."
                )
        self.stats = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.stats.items()}

    @property
    def d_sae(self) -> int:
        return self.scores.numel()

    def __repr__(self) -> str:
        return f"LatentScores(method={self.method!r}, layer={self.layer}, d_sae={self.d_sae}, n_pairs={self.n_pairs})"

    def top(self, k: int = 10, sign: Literal["abs", "positive", "negative"] = "abs") -> list[tuple[int, float]]:
        """The ``k`` best latents as ``(latent, score)``: by ``|score|`` (``"abs"``), highest, or lowest score."""
        check_positive(k, "k")
        if sign not in SIGNS:
            raise ValueError(f"`sign` must be one of {SIGNS}, got {sign!r}.")
        key = {"abs": self.scores.abs(), "positive": self.scores, "negative": -self.scores}[sign]
        order = torch.argsort(key, descending=True, stable=True)[: min(k, self.d_sae)]
        return [(int(i), float(self.scores[i])) for i in order]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``latents.safetensors`` + ``latents.json`` into folder ``path`` atomically."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("scores", "stats")}
        meta.update(format="mi_peft.LatentScores", format_version=FORMAT_VERSION, stats=sorted(self.stats))
        return save_tensors_folder(path, SCORES_FILE, {"scores": self.scores, **self.stats}, META_FILE, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | None = None, ignore_fingerprint: bool = False
    ) -> LatentScores:
        """Read saved scores; with ``model``, a different base model raises ``FingerprintMismatchError``."""
        tensors, meta = load_tensors_folder(path, SCORES_FILE, META_FILE, "LatentScores", FORMAT_VERSION)
        names = {f.name for f in dataclasses.fields(cls)} - {"scores", "stats"}
        stats = {name: tensors[name] for name in meta.get("stats", [])}
        result = cls(scores=tensors["scores"], stats=stats, **{k: v for k, v in meta.items() if k in names})
        if model is not None:
            check_fingerprint(result.model_fingerprint, model, f"LatentScores {path}", ignore_fingerprint)
        return result


def _side_stats(model: nn.Module, site: SAESite, batch: dict, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt latent activation ``[batch, d_sae]`` (last real token or mean over real tokens) and firing."""
    acts = latent_acts(model, site, batch)  # [b, pos, d_sae]; batches are left-padded
    if positions == "last":
        value = acts[:, -1]
        return value, (value > 0).float()
    mask = sae_positions(batch["attention_mask"]).to(acts.device, acts.dtype)[..., None]
    count = mask.sum(1).clamp_min(1)
    return (acts * mask).sum(1) / count, ((acts > 0).float() * mask).sum(1) / count


@torch.no_grad()
def locate_latents(
    model: nn.Module,
    tokenizer: Any,
    site: SAESite,
    pairs: ContrastivePairs,
    *,
    positions: Literal["last", "mean"] = "last",
    batch_size: int = 8,
    chat: bool | None = None,
    progress: bool = True,
) -> LatentScores:
    """Score every latent of ``site``'s SAE by ``mean(positive) - mean(negative)`` activation.

    Args:
        pairs: contrastive pairs (positive = behaviour present), formatted like :func:`mi_peft.locate.locate`.
        positions: ``"last"`` real token (where a chat model decides its reply) or ``"mean"`` over real tokens
            but the first (:func:`~mi_peft.sae.site.sae_positions`).

    Example:
        >>> scores = locate_latents(model, tok, site, ContrastivePairs.load("recipes/data/refusal").subset(64))
        >>> scores.top(5, sign="positive")  # latents that fire more on harmful prompts
    """
    if positions not in POSITIONS:
        raise ValueError(f"`positions` must be one of {POSITIONS}, got {positions!r}.")
    if not isinstance(pairs, ContrastivePairs):
        raise ValueError(f"`pairs` must be ContrastivePairs (see ContrastivePairs.load), got {type(pairs).__name__}.")
    check_positive(batch_size, "batch_size")
    totals = torch.zeros(4, site.d_sae)  # sum act pos, sum act neg, sum fire pos, sum fire neg
    batches = pairs.batches(tokenizer, batch_size=batch_size, chat=chat)
    total = -(-len(pairs) // batch_size)
    for pos, neg in tqdm(batches, total=total, desc="SAE latents", disable=not progress):
        for side, batch in ((0, pos), (1, neg)):
            value, fired = _side_stats(model, site, batch, positions)
            totals[side] += value.sum(0).cpu()
            totals[side + 2] += fired.sum(0).cpu()
    means = totals / len(pairs)
    return LatentScores(
        scores=means[0] - means[1],
        layer=site.layer,
        hook_name=site.hook_name,
        positions=positions,
        stats=dict(zip(_STATS, (means[0], means[1], means[2], means[3]), strict=True)),
        model_fingerprint=model_fingerprint(model),
        data_hash=pairs.data_hash(),
        n_pairs=len(pairs),
    )
