"""The ``"sae"`` kind of a :class:`~mi_peft.locate.LocalizationResult`: SAE latents scored like components.

``scores["sae"]`` is ``[n_layers, d_sae]``: row ``L`` holds the latents of the SAE reading layer ``L``'s
output, NaN rows are layers no SAE reads (and, with SAEs of different widths, NaN pads the narrower rows).
Laid out per layer like heads and neurons, so ``top``, ``to_frame``, ``compare`` and the plots need no
special case. Selecting latents gives a :class:`LatentSet`, not a :class:`~mi_peft.components.ComponentSet`:
latents are directions in an SAE, not weights a sparse adapter trains; steer with them through
:class:`~mi_peft.sae.SAESteeringConfig`.

Per-latent statistics (mean activation and firing frequency per side) live in
``result.extra["sae"][str(layer)]``; :func:`latent_stats` reads them back as tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..data import check_positive
from ._select import _order

if TYPE_CHECKING:
    from .result import LocalizationResult

KIND = "sae"


class Latent(NamedTuple):
    layer: int
    index: int


@dataclass
class LatentSet:
    """SAE latents chosen per layer, ``{layer: [latent indices]}`` (sorted, de-duplicated).

    Pass it to ``SAESteeringConfig.from_sae(site, latent_set)`` (the latents at ``site.layer`` are used).
    It is deliberately not iterable: a sparse adapter built from it would mistake latents for neurons;
    use :meth:`to_list` for ``Latent(layer, index)`` tuples.

    Example:
        >>> chosen = result.select(top_k=5, kinds=("sae",))
        >>> config = SAESteeringConfig.from_sae(site, chosen, op="add", alpha=4.0)
    """

    latents: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cleaned = {int(layer): sorted({int(i) for i in idx}) for layer, idx in self.latents.items()}
        self.latents = {layer: idx for layer, idx in sorted(cleaned.items()) if idx}

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(
            "a LatentSet holds SAE latents, not adapter components: steer with "
            "`SAESteeringConfig.from_sae(site, latent_set)`, or iterate `latent_set.to_list()`."
        )

    def __len__(self) -> int:
        return sum(len(v) for v in self.latents.values())

    @property
    def layers(self) -> list[int]:
        return list(self.latents)

    def at(self, layer: int) -> list[int]:
        """Latent indices chosen at ``layer`` (empty when none)."""
        return list(self.latents.get(layer, []))

    def to_list(self) -> list[Latent]:
        return [Latent(layer, i) for layer, idx in self.latents.items() for i in idx]

    def to_dict(self) -> dict[str, list[int]]:
        return {str(layer): idx for layer, idx in self.latents.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatentSet:
        return cls({int(layer): list(idx) for layer, idx in data.items()})


def sae_shape(n_layers: int, value: Any = None) -> tuple[int, Any]:
    """``(n_layers, d_sae)``: the latent width is the SAE's, not the model's, so any width >= 1 is accepted."""
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] >= 1:
        return (n_layers, int(value.shape[1]))
    return (n_layers, "d_sae")


def select_latents(
    result: LocalizationResult,
    top_k: int | Mapping[str, int] | None,
    param_budget: Any,
    threshold: float | Mapping[str, float] | None,
    random: int | None,
) -> LatentSet:
    """``result.select(kinds=("sae",))``: latents by ``|score|`` across every SAE layer of the result."""
    if param_budget is not None:
        raise ValueError(
            "`param_budget` counts adapter weights; SAE latents have none to train. Select latents with "
            "`top_k` or `threshold`."
        )
    if KIND not in result.scores:
        raise ValueError(
            f"this result has no 'sae' scores; it has {result.kinds}. Score latents with `locate(..., sae=site)`."
        )
    flat = result.scores[KIND].flatten()
    ranked = _order(flat)
    if top_k is not None:
        k = _one(top_k, "top_k")
        check_positive(k, "top_k")
        chosen = ranked[:k]
    else:
        limit = _one(threshold, "threshold")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
            raise ValueError(f"`threshold` must be a number >= 0, got {limit!r}.")
        chosen = ranked[flat[ranked].abs() >= limit]
    if chosen.numel() == 0:
        raise ValueError("the selection is empty here; pass a larger `top_k` or a lower `threshold`.")
    if random is not None:
        gen = torch.Generator().manual_seed(random)
        chosen = ranked[torch.randperm(ranked.numel(), generator=gen)[: chosen.numel()]]
    width = result.scores[KIND].shape[1]
    layers, index = chosen // width, chosen % width
    return LatentSet({layer: index[layers == layer].tolist() for layer in layers.unique().tolist()})


def _one(value: Any, name: str) -> Any:
    """A per-kind dict must name only ``"sae"``; a plain value passes through."""
    if isinstance(value, Mapping):
        if set(value) != {KIND}:
            raise ValueError(f"`{name}` for SAE latents takes a number or {{'sae': number}}, got {dict(value)!r}.")
        return value[KIND]
    return value


def latent_stats(result: LocalizationResult, layer: int | None = None) -> dict[str, torch.Tensor]:
    """Per-latent statistics stored with a ``"sae"`` result: ``mean_positive``, ``mean_negative``,
    ``freq_positive``, ``freq_negative`` (``[d_sae]`` each) of the SAE at ``layer`` (default: the only one)."""
    stored = result.extra.get("sae")
    if KIND not in result.scores or not isinstance(stored, Mapping):
        raise ValueError(f"this result holds no SAE latent scores (kinds {result.kinds}).")
    if layer is None:
        if len(stored) != 1:
            raise ValueError(f"this result scored SAEs at layers {sorted(map(int, stored))}; pass `layer=`.")
        layer = int(next(iter(stored)))
    if str(layer) not in stored:
        raise ValueError(f"no SAE was scored at layer {layer}; this result has layers {sorted(map(int, stored))}.")
    entry = stored[str(layer)]
    return {
        name: torch.tensor(entry[name]) for name in ("mean_positive", "mean_negative", "freq_positive", "freq_negative")
    }
