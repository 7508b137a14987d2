"""Conditional sparse adapters: apply the trained slices only to the sequences that trigger a condition.

A located adapter trained to refuse harmful requests also refuses some harmless ones. Gating it with
the condition of conditional activation steering (CAST, Lee et al. 2024) keeps the base model,
bit for bit, on every sequence the condition does not select. The decision is taken on the **base
model's** residual stream (the slices switched off), exactly where
:func:`~mi_peft.tuners.steering.condition.calibrate_condition` measured it, by a forward that stops
after the condition layer. ``generate`` decides once on the prompt and keeps the decision for the
generated tokens; a plain forward (training, log-likelihood scoring) decides on all of its
non-padding tokens, unless its KV cache is already filled, in which case the decision of the forward
that filled it is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ...arch import ArchSpec
from ..steering.condition import SteeringCondition, check_condition_fields, condition_scores, decide, residual_until


class SparseGate:
    """Per conditional adapter, which sequences (boolean ``[batch]``) of the running forward it applies to.

    Shared by every :class:`~mi_peft.tuners.sparse.layer.SparseLayer` of one model. ``deciding`` is
    set during the decision forward, when every sparse layer acts as its base layer.
    """

    def __init__(self) -> None:
        self.rows: dict[str, Tensor] = {}
        self._extremes: dict[str, tuple[bool, bool]] = {}
        self.deciding = False
        self.locked = False
        self.pending = False  # the call's inputs reach `SparseModel.forward` only, which then decides

    def set_rows(self, rows: Mapping[str, Tensor]) -> None:
        """Record a decision; whether all or none are selected is read once here, not in every layer."""
        self.rows = dict(rows)
        self._extremes = {a: (bool(r.all()), bool(r.any())) for a, r in self.rows.items()}

    def rows_for(self, adapter: str, batch: int) -> tuple[Tensor | None, bool]:
        """``(rows, skip)``: the selected sequences of ``adapter`` (``None``: all of them), and whether none is."""
        rows = self.rows.get(adapter)
        if rows is None:
            return None, False
        if rows.shape[0] != batch:
            raise ValueError(
                f"conditional sparse adapter {adapter!r} decided for {rows.shape[0]} sequences but this forward has "
                f"{batch}; start a new prompt (empty KV cache) when the batch changes. Beam search is not supported."
            )
        every, some = self._extremes[adapter]
        return (None if every else rows), not some

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block, the first ``SparseModel.forward`` decides on its inputs and keeps that decision."""
        self.pending, self.locked = True, True
        try:
            yield
        finally:
            self.pending, self.locked = False, False

    @contextmanager
    def locked_rows(self, rows: Mapping[str, Tensor]) -> Iterator[None]:
        """Keep ``rows`` for every forward inside the block (``generate``: the prompt's decision)."""
        saved = self.rows, self.locked
        self.set_rows(rows)
        self.locked = True
        try:
            yield
        finally:
            self.set_rows(saved[0])
            self.locked = saved[1]


def condition_record(condition: SteeringCondition | Mapping[str, Any], spec: ArchSpec) -> tuple[dict, list[float]]:
    """``(fields, direction)`` of a condition as :class:`SparseConfig` stores them (JSON), checked against ``spec``."""
    if isinstance(condition, SteeringCondition):
        fields, direction = condition.to_dict(), condition.direction
    elif isinstance(condition, Mapping) and "direction" in condition:
        fields = {k: v for k, v in condition.items() if k != "direction"}
        direction = SteeringCondition(direction=torch.as_tensor(condition["direction"]), **fields).direction
    else:
        raise TypeError(
            "`condition` must be a SteeringCondition (e.g. from `SteeringConfig.calibrate_condition`) or a dict with "
            f"`direction`, `layer` and `threshold`, got {type(condition).__name__}."
        )
    if direction.numel() != spec.d_model:
        raise ValueError(f"condition direction has {direction.numel()} values; this model's d_model is {spec.d_model}.")
    fields = check_condition_fields(fields)
    spec.check_layer(fields["layer"])
    return fields, direction.tolist()


@torch.no_grad()
def decide_rows(
    model: nn.Module, gate: SparseGate, conditions: Mapping[str, tuple[dict, list[float]]], batch: Mapping[str, Any]
) -> dict[str, Tensor]:
    """Per adapter, the sequences of ``batch`` its condition selects, read on the base model."""
    mask = batch.get("attention_mask")
    layers = sorted({fields["layer"] for fields, _ in conditions.values()})
    gate.deciding = True
    try:
        cache = residual_until(model, batch, layers, "all")
    finally:
        gate.deciding = False
    out = {}
    for adapter, (fields, direction) in conditions.items():
        hidden = cache.residual[fields["layer"]]
        unit = torch.tensor(direction, dtype=torch.float32)
        scores = condition_scores(hidden, unit, mask, fields["measure"])
        out[adapter] = decide(scores, fields["threshold"], fields["comparator"]).to(hidden.device)
    return out


def model_inputs(args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The token inputs of a causal-LM forward or ``generate`` call (``None`` when it has none)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
    batch = {"input_ids": ids} if ids is not None else {}
    if ids is None and kwargs.get("inputs_embeds") is not None:
        batch["inputs_embeds"] = kwargs["inputs_embeds"]
    if not batch:
        return None
    if kwargs.get("attention_mask") is not None:
        batch["attention_mask"] = kwargs["attention_mask"]
    return batch


def continues_cache(kwargs: Mapping[str, Any]) -> bool:
    """Whether this forward continues a filled KV cache (its decision was taken on an earlier forward)."""
    cache = kwargs.get("past_key_values")
    return hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0


def on_rows(update: Tensor, rows: Tensor | None) -> Tensor:
    """``update`` on the selected sequences, zero on the others (``None``: every sequence)."""
    if rows is None:
        return update
    if update.dim() < 2:
        raise ValueError(
            f"a conditional sparse adapter needs batched inputs [batch, ...], got shape {tuple(update.shape)}."
        )
    keep = rows.to(update.device).view(-1, *([1] * (update.dim() - 1)))
    return torch.where(keep, update, torch.zeros((), dtype=update.dtype, device=update.device))
