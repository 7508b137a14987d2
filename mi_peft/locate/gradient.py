"""Gradient methods: first-order scores for every head, neuron and residual layer at once.

- :func:`grad_x_act`: ``grad(metric) . activation`` on the positive run.
- :func:`attribution_patching`: ``(a_pos - a_neg) . grad(metric)`` at the negative run, the
  first-order estimate of patching each component from the positive into the negative run
  (Nanda 2023; Syed et al. 2023). One no-grad forward (positive) plus one forward+backward
  (negative) per batch scores ALL components.

Gradients are taken with ``torch.autograd.grad`` on activations captured by
``capture.record(..., detach=False)``; parameters are frozen only for the call and their
``requires_grad`` flags restored afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import capture
from ..arch import spec_for
from ..metrics import Metric
from .magnitude import (
    KINDS,
    Batch,
    MethodOutput,
    PairBatches,
    Positions,
    _bar,
    eval_mode,
    flatten_stack,
    layer_sel,
    model_device,
    n_components,
    position_index,
    run_model,
    to_device,
    unflatten,
)


def check_metric_output(value: Tensor, batch: Batch, name: str = "metric") -> Tensor:
    """The metric must give one score per example: shape ``[batch]``."""
    rows = batch["input_ids"].shape[0]
    if not isinstance(value, Tensor) or value.shape != (rows,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must return one score per example, shape ({rows},); got {shape}.")
    return value


class LogitsPlan:
    """Decides once whether the metric reads only the last position's logits.

    If ``metric(logits[:, -1:], batch) == metric(logits, batch)`` on the first full forward, later
    forwards ask the model for the last position only (``logits_to_keep=1``): the unembedding of
    every other position is skipped, and exact patching can rerun just the last token.
    """

    def __init__(self, model: nn.Module, metric: Metric) -> None:
        self.metric = metric
        self.supports_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_only: bool | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"logits_to_keep": 1} if self.last_only and self.supports_keep else {}

    def observe(self, logits: Tensor, batch: Batch) -> None:
        if self.last_only is not None:
            return
        with torch.no_grad():
            full = check_metric_output(self.metric(logits, batch), batch)
            try:
                last = self.metric(logits[:, -1:], batch)
                same = isinstance(last, Tensor) and last.shape == full.shape
                self.last_only = bool(same and torch.allclose(last, full, rtol=1e-5, atol=1e-6, equal_nan=True))
            except (IndexError, RuntimeError, ValueError, KeyError):
                self.last_only = False

    def score(self, logits: Tensor, batch: Batch) -> Tensor:
        """Metric on ``logits`` (full or last-position only, matching :meth:`kwargs`)."""
        if self.last_only:
            logits = logits[:, -1:]
        return check_metric_output(self.metric(logits, batch), batch)


def _captured(cache: capture.ActivationCache, kinds: Sequence[str]) -> list[Tensor]:
    return [cache[kind][layer] for kind in kinds for layer in sorted(cache[kind])]


def _flat_grads(
    cache: capture.ActivationCache, kinds: Sequence[str], grads: Sequence[Tensor | None]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per kind: (activations, gradients), both ``[B, k, C, D]`` (at least float32)."""
    out, i = {}, 0
    for kind in kinds:
        layers = sorted(cache[kind])
        acts = [cache[kind][layer].detach() for layer in layers]
        gs = [
            g if g is not None else torch.zeros_like(a) for g, a in zip(grads[i : i + len(layers)], acts, strict=True)
        ]
        i += len(layers)
        out[kind] = (flatten_stack(kind, torch.stack(acts, 1)), flatten_stack(kind, torch.stack(gs, 1)))
    return out


def _grad_pass(
    model: nn.Module, batch: Batch, kinds: Sequence[str], positions: Positions, plan: LogitsPlan
) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Forward+backward on ``batch``: activations and d metric / d activation at ``positions``."""
    mask = batch["attention_mask"]
    idx = position_index(positions, mask)
    with (
        torch.enable_grad(),
        capture.record(model, **layer_sel(kinds), positions=idx, attention_mask=mask, detach=False) as cache,
    ):
        out = run_model(model, batch, **plan.kwargs())
        plan.observe(out.logits, batch)
        value = plan.score(out.logits, batch)
        tensors = _captured(cache, kinds)
        grads = torch.autograd.grad(value.sum(), tensors, allow_unused=True)
    return _flat_grads(cache, kinds, grads), value.detach()


def grad_x_act(
    model: nn.Module,
    batches: PairBatches,
    *,
    metric: Metric,
    components: Sequence[str] = KINDS,
    positions: Positions = "last",
    progress: bool = False,
) -> MethodOutput:
    """Score = mean over positive examples of ``sum_d grad(metric)_d * a_d`` (summed over positions).

    A first-order estimate of the metric change when the component is zero-ablated (with the sign
    flipped): > 0 means the component pushes the metric up on the positive prompts.
    """
    spec = spec_for(model)
    plan = LogitsPlan(model, metric)
    totals = {k: torch.zeros(n_components(spec, k), dtype=torch.float64) for k in components}
    n, metric_sum = 0, 0.0
    device = model_device(model)
    with eval_mode(model, freeze=True), _bar(len(batches), progress, "grad_x_act") as bar:
        for pos, _ in batches:
            pos = to_device(pos, device)
            flat, value = _grad_pass(model, pos, components, positions, plan)
            for kind, (a, g) in flat.items():
                totals[kind] += (a * g).sum((-1, 1)).sum(0).double().cpu()
            n += value.shape[0]
            metric_sum += float(value.sum())
            bar.update(1)
    scores = {k: unflatten(spec, k, v / n) for k, v in totals.items()}
    return scores, {"metric_positive": metric_sum / n}


def attribution_patching(
    model: nn.Module,
    batches: PairBatches,
    *,
    metric: Metric,
    components: Sequence[str] = KINDS,
    positions: Positions = "last",
    progress: bool = False,
) -> MethodOutput:
    """Score = mean over pairs of ``sum_d (a_pos - a_neg)_d * d metric / d a_d`` at the negative run.

    Estimates ``metric(negative with the component patched to its positive value) - metric(negative)``
    for every component at once; compare :func:`~mi_peft.locate.causal.activation_patching` (exact).
    """
    spec = spec_for(model)
    plan = LogitsPlan(model, metric)
    totals = {k: torch.zeros(n_components(spec, k), dtype=torch.float64) for k in components}
    n, pos_sum, neg_sum = 0, 0.0, 0.0
    device = model_device(model)
    with eval_mode(model, freeze=True), _bar(len(batches), progress, "attribution_patching") as bar:
        for pos, neg in batches:
            pos, neg = to_device(pos, device), to_device(neg, device)
            pos_idx = position_index(positions, pos["attention_mask"])
            neg_idx = position_index(positions, neg["attention_mask"])
            if pos_idx.shape != neg_idx.shape:
                raise ValueError(
                    f"positions={positions!r} select {pos_idx.shape[1]} positive vs {neg_idx.shape[1]} negative "
                    "tokens; patching needs the same number: use 'last' or negative indices such as [-2, -1]."
                )
            with (
                torch.no_grad(),
                capture.record(
                    model, **layer_sel(components), positions=pos_idx, attention_mask=pos["attention_mask"]
                ) as cache,
            ):
                out = run_model(model, pos, **plan.kwargs())
            plan.observe(out.logits, pos)
            pos_sum += float(plan.score(out.logits, pos).sum())
            a_pos = {k: flatten_stack(k, cache.stack(k)) for k in components}
            flat, value = _grad_pass(model, neg, components, positions, plan)
            for kind, (a_neg, g) in flat.items():
                totals[kind] += ((a_pos[kind] - a_neg) * g).sum((-1, 1)).sum(0).double().cpu()
            n += value.shape[0]
            neg_sum += float(value.sum())
            bar.update(1)
    scores = {k: unflatten(spec, k, v / n) for k, v in totals.items()}
    return scores, {"metric_positive": pos_sum / n, "metric_negative": neg_sum / n}
