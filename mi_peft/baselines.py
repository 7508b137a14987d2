"""Baselines that spend the same parameter budget as a sparse adapter, without its localization.

A located sparse adapter trains a few slices of the attention- and MLP-output projections. The
fair low-rank comparison trains LoRA on the same kind of projections with a trainable count within
``tolerance`` of the sparse adapter's, so that "located slices vs low rank" is compared at equal cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peft import LoraConfig
from torch import nn

from .arch import ArchSpec, spec_for


@dataclass(frozen=True)
class MatchedLora:
    """A LoRA config and what it costs, next to the budget it was matched to."""

    config: LoraConfig
    rank: int
    layers: tuple[int, ...]
    n_params: int
    target_params: int

    @property
    def ratio(self) -> float:
        return self.n_params / self.target_params


def _rank_cost(model: nn.Module, spec: ArchSpec, layer: int, path: str) -> int:
    """LoRA parameters per unit of rank on one projection: its ``in + out`` features."""
    weight = spec.layer_module(model, layer, path).weight
    return int(weight.shape[0]) + int(weight.shape[1])


def matched_lora(
    model: nn.Module,
    n_params: int,
    layer_order: Sequence[int] | None = None,
    projections: tuple[str, ...] = ("attn_out", "mlp_out"),
    tolerance: float = 0.1,
    layers: Sequence[int] | None = None,
) -> MatchedLora:
    """LoRA on the attention/MLP output projections with ``n_params`` trainable parameters (within ``tolerance``).

    Projections are filled in ``layer_order`` (default: all layers in order; pass the layers the located
    adapter uses first) at the lowest rank whose total lands within the tolerance (closest count on that
    rank), so the budget is spread over as many projections as it allows. ``layers`` keeps it to those
    layers (PEFT's ``layers_to_transform``; default all). Raises when nothing fits.
    """
    if n_params <= 0:
        raise ValueError(f"`n_params` must be a positive parameter count, got {n_params}.")
    unknown = sorted(set(projections) - {"attn_out", "mlp_out"})
    if unknown or not projections:
        raise ValueError(f"`projections` must name 'attn_out' and/or 'mlp_out', got {projections!r}.")
    spec = spec_for(model)
    paths = tuple(getattr(spec, name) for name in projections)
    allowed = spec.layers_or_all(layers)
    order = [layer for layer in (layer_order or []) if layer in allowed]
    order += [layer for layer in allowed if layer not in order]
    modules = [(layer, path) for layer in order for path in paths]  # filled in this order
    costs = [_rank_cost(model, spec, layer, path) for layer, path in modules]
    candidates = []  # (rank, relative error, number of modules)
    for rank in range(1, n_params // min(costs) + 2):
        total = 0
        for count, cost in enumerate(costs, start=1):
            total += rank * cost
            candidates.append((rank, abs(total - n_params) / n_params, count))
    fitting = [c for c in candidates if c[1] <= tolerance]
    # the lowest rank that fits spreads the budget over the most projections, as the sparse adapter does
    rank, error, count = min(fitting) if fitting else min(candidates, key=lambda c: c[1])
    if error > tolerance:
        raise ValueError(
            f"no LoRA on {projections} matches {n_params:,} parameters within {tolerance:.0%} (closest: "
            f"{error:.1%} off); a rank-1 update of one projection costs {costs[0]:,}. Raise the budget or `tolerance`."
        )
    chosen = sorted(modules[:count])
    layers = tuple(sorted({layer for layer, _ in chosen}))
    names = [f"{spec.layers}.{layer}.{path}" for layer, path in chosen]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names)
    used = rank * sum(costs[:count])
    return MatchedLora(config=config, rank=rank, layers=layers, n_params=used, target_params=int(n_params))
