"""Conditional activation steering (CAST, Lee et al. 2024): steer only the prompts that trigger a condition.

A :class:`SteeringCondition` reads the residual stream after one decoder layer on the prompt and
scores each sequence by the mean, over its non-padding prompt tokens, of the cosine similarity
(``measure="cosine"``) or the dot product (``measure="projection"``) between each token's residual
vector and a unit condition direction. Sequences whose score lies on the ``comparator`` side of
``threshold`` are steered; the others are left bit-identical to the base model. The decision is
made on the prompt forward and remembered for the generated tokens of that sequence.

:func:`calibrate_condition` picks the layer and threshold that best separate positive from
negative prompts (maximum of true-positive rate minus false-positive rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ... import capture
from ...arch import ArchSpec, spec_for
from ...data import check_texts, format_prompts, tokenize

Comparator = Literal[">", "<"]
Measure = Literal["cosine", "projection"]
COMPARATORS: tuple[str, ...] = (">", "<")
MEASURES: tuple[str, ...] = ("cosine", "projection")


@dataclass
class SteeringCondition:
    """When to steer: ``score(prompt) <comparator> threshold`` at the residual stream after ``layer``.

    Args:
        direction (`torch.Tensor`): condition direction ``[d_model]`` (normalised to unit length).
        layer (`int`): decoder layer whose output (``hook_resid_post``) is read.
        threshold (`float`): decision threshold on the score.
        comparator (`str`, defaults to `">"`): ``">"`` steers sequences scoring above the threshold,
            ``"<"`` those below.
        measure (`str`, defaults to `"cosine"`): ``"cosine"`` averages cos(h_t, r) over prompt tokens,
            ``"projection"`` averages h_t · r.
    """

    direction: torch.Tensor
    layer: int
    threshold: float
    comparator: str = ">"
    measure: str = "cosine"

    def __post_init__(self) -> None:
        self.direction = unit_vector(self.direction, what="condition direction")
        fields = {"layer": self.layer, "threshold": self.threshold, "comparator": self.comparator}
        check_condition_fields({**fields, "measure": self.measure})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (the direction is stored in the adapter's safetensors)."""
        return {
            "layer": int(self.layer),
            "threshold": float(self.threshold),
            "comparator": self.comparator,
            "measure": self.measure,
        }


def check_condition_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the serialised condition fields and return them normalised."""
    missing = {"layer", "threshold"} - set(fields)
    if missing:
        raise ValueError(f"`condition` is missing {sorted(missing)}; pass a `SteeringCondition` or a dict with them.")
    layer, threshold = fields["layer"], fields["threshold"]
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"condition `layer` must be a non-negative int, got {layer!r}.")
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"condition `threshold` must be a finite number, got {threshold!r}.")
    comparator = fields.get("comparator", ">")
    if comparator not in COMPARATORS:
        raise ValueError(f"condition `comparator` must be one of {COMPARATORS}, got {comparator!r}.")
    measure = fields.get("measure", "cosine")
    if measure not in MEASURES:
        raise ValueError(f"condition `measure` must be one of {MEASURES}, got {measure!r}.")
    return {"layer": layer, "threshold": float(threshold), "comparator": comparator, "measure": measure}


def unit_vector(vector: Any, what: str = "direction") -> torch.Tensor:
    """``vector / ||vector||`` as float32 on CPU; NaN, infinite, zero or non-1-D input raises ``ValueError``."""
    v = torch.as_tensor(vector).detach().to("cpu", torch.float32)
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"{what} must be a 1-D vector [d_model], got shape {tuple(v.shape)}.")
    if not torch.isfinite(v).all():
        raise ValueError(f"{what} contains NaN or infinite values; recompute it from finite activations.")
    norm = v.norm()
    if norm <= 1e-12:
        raise ValueError(f"{what} is the zero vector (norm {norm.item():.3g}); it has no direction to steer along.")
    return v / norm


def condition_scores(
    hidden: torch.Tensor, direction: torch.Tensor, token_mask: torch.Tensor | None, measure: str
) -> torch.Tensor:
    """Per-sequence condition score ``[batch]`` from residual activations ``[batch, pos, d_model]``.

    ``token_mask`` ``[batch, pos]`` marks the tokens to average over (non-padding prompt tokens);
    ``None`` averages over all positions. Computed in float32 so that the decision does not depend
    on the model's dtype.
    """
    h = hidden.float()
    r = direction.to(h.device, torch.float32)
    proj = h @ r
    if measure == "cosine":
        proj = proj / h.norm(dim=-1).clamp_min(1e-12)
    if token_mask is None:
        return proj.mean(dim=1)
    m = token_mask.to(proj.device, proj.dtype)
    return (proj * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def decide(scores: torch.Tensor, threshold: float, comparator: str) -> torch.Tensor:
    """Boolean ``[batch]``: which sequences the condition selects for steering."""
    return scores > threshold if comparator == ">" else scores < threshold


@dataclass
class CalibrationReport:
    """Detection rates of the best threshold per candidate layer, and the chosen layer.

    ``tpr`` is the fraction of positive prompts selected, ``fpr`` the fraction of negative prompts
    selected, at that layer's best threshold (maximising ``tpr - fpr``).
    """

    measure: str
    n_positive: int
    n_negative: int
    chosen_layer: int
    tpr: dict[int, float] = field(default_factory=dict)
    fpr: dict[int, float] = field(default_factory=dict)
    threshold: dict[int, float] = field(default_factory=dict)
    comparator: dict[int, str] = field(default_factory=dict)

    @property
    def chosen(self) -> dict[str, Any]:
        layer = self.chosen_layer
        return {
            "layer": layer,
            "tpr": self.tpr[layer],
            "fpr": self.fpr[layer],
            "threshold": self.threshold[layer],
            "comparator": self.comparator[layer],
        }

    def to_markdown(self) -> str:
        """A table of every layer's rates; the chosen layer is marked with ``*``."""
        rows = ["| layer | TPR | FPR | threshold | comparator |", "|---|---|---|---|---|"]
        for layer in sorted(self.tpr):
            mark = " *" if layer == self.chosen_layer else ""
            rows.append(
                f"| {layer}{mark} | {self.tpr[layer]:.3f} | {self.fpr[layer]:.3f} | "
                f"{self.threshold[layer]:.4g} | {self.comparator[layer]} |"
            )
        return "\n".join(rows)


class _StopForward(Exception):
    """Raised after the last layer a measurement needs, to skip the rest of the forward pass."""


def _stop_forward(*_: Any) -> None:
    raise _StopForward


@torch.no_grad()
def residual_until(model: nn.Module, batch: Mapping[str, torch.Tensor], layers: Sequence[int], positions: str) -> Any:
    """Residual stream after ``layers`` for one tokenized batch; the forward stops after the last of them.

    Later layers and the unembedding are never run. Runs without a KV cache, so a forward inside
    generation (the conditional sparse gate) leaves the generation's cache untouched.
    """
    mask = batch.get("attention_mask")
    with capture.record(model, residual=list(layers), positions=positions, attention_mask=mask) as cache:
        last = spec_for(model).decoder_layers(model)[max(layers)]
        handle = last.register_forward_hook(_stop_forward)
        try:
            model(**batch, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
    return cache


def _layer_features(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layers: list[int],
    directions: Mapping[int, torch.Tensor] | None,
    measure: str,
    batch_size: int,
    desc: str,
) -> dict[int, torch.Tensor]:
    """Per layer: scores ``[n]`` when ``directions`` is given, else mean prompt activations ``[n, d_model]``."""
    texts = format_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=desc, disable=len(starts) < 4):
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, texts[start : start + batch_size]).items()}
        mask = batch["attention_mask"]
        cache = residual_until(model, batch, layers, "all" if directions is not None else "mean")
        for layer in layers:
            h = cache.residual[layer]
            value = h.float() if directions is None else condition_scores(h, directions[layer], mask, measure)
            out[layer].append(value.cpu())
    return {layer: torch.cat(values) for layer, values in out.items()}


def best_threshold(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, str, float, float]:
    """Threshold and comparator maximising TPR - FPR; returns (threshold, comparator, tpr, fpr)."""
    values = torch.cat([pos, neg]).double().sort().values
    mids = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:] + 1.0])
    p, n, t = pos.double()[None, :], neg.double()[None, :], mids[:, None]
    tpr_gt, fpr_gt = (p > t).double().mean(1), (n > t).double().mean(1)
    tpr_lt, fpr_lt = (p < t).double().mean(1), (n < t).double().mean(1)
    i_gt, i_lt = int((tpr_gt - fpr_gt).argmax()), int((tpr_lt - fpr_lt).argmax())
    if tpr_gt[i_gt] - fpr_gt[i_gt] >= tpr_lt[i_lt] - fpr_lt[i_lt]:
        return float(mids[i_gt]), ">", float(tpr_gt[i_gt]), float(fpr_gt[i_gt])
    return float(mids[i_lt]), "<", float(tpr_lt[i_lt]), float(fpr_lt[i_lt])


def calibrate_condition(
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    directions: Any = None,
    layers: Sequence[int] | None = None,
    measure: str = "cosine",
    batch_size: int = 8,
) -> tuple[SteeringCondition, CalibrationReport]:
    """Pick the layer and threshold whose condition best separates ``positive`` from ``negative``.

    Args:
        model: the base model (a PEFT-wrapped model is measured with its adapters disabled).
        tokenizer: its tokenizer; prompts are chat-formatted when it has a chat template.
        positive: prompts that should trigger steering (e.g. harmful requests).
        negative: prompts that must not (e.g. harmless requests).
        directions: condition directions per layer (a ``Directions`` or ``{layer: Tensor}``). ``None``
            computes them from these prompts as the difference of mean prompt activations, in which
            case the reported rates are in-sample; pass directions from separate data for honest rates.
        layers: candidate layers (default: the layers of ``directions``, else every layer).
        measure: ``"cosine"`` or ``"projection"`` (see :class:`SteeringCondition`).
        batch_size: prompts per forward pass.

    Returns:
        ``(condition, report)``: the best layer's condition and the per-layer detection rates.
    """
    positive, negative = check_texts(positive, "positive"), check_texts(negative, "negative")
    if measure not in MEASURES:
        raise ValueError(f"`measure` must be one of {MEASURES}, got {measure!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    vectors = getattr(directions, "vectors", directions)
    layers = _candidate_layers(spec_for(model), vectors, layers)
    with _on_base_model(model):
        if vectors is not None:
            units = {layer: unit_vector(vectors[layer]) for layer in layers}
        else:
            units = _mean_difference_units(model, tokenizer, positive, negative, layers, batch_size)
        pos = _layer_features(model, tokenizer, positive, layers, units, measure, batch_size, "condition scores +")
        neg = _layer_features(model, tokenizer, negative, layers, units, measure, batch_size, "condition scores -")
    report = _report(pos, neg, measure, len(positive), len(negative))
    chosen = report.chosen
    condition = SteeringCondition(
        direction=units[chosen["layer"]],
        layer=chosen["layer"],
        threshold=chosen["threshold"],
        comparator=chosen["comparator"],
        measure=measure,
    )
    return condition, report


def selection_rates(
    model: nn.Module,
    tokenizer: Any,
    condition: SteeringCondition,
    positive: Sequence[str],
    negative: Sequence[str],
    batch_size: int = 8,
) -> dict[str, float]:
    """How often ``condition`` fires on prompts it was not calibrated on: ``{"tpr", "fpr", "n_positive", "n_negative"}``.

    Read on the base model (a PEFT model is measured with its adapters disabled), as the condition is
    applied by conditional steering and conditional sparse adapters.
    """
    positive, negative = check_texts(positive, "positive"), check_texts(negative, "negative")
    layer, unit = condition.layer, {condition.layer: condition.direction}
    with _on_base_model(model):
        rates = {}
        for key, prompts in (("tpr", positive), ("fpr", negative)):
            scores = _layer_features(model, tokenizer, prompts, [layer], unit, condition.measure, batch_size, key)
            rates[key] = int(decide(scores[layer], condition.threshold, condition.comparator).sum()) / len(prompts)
    return {**rates, "n_positive": len(positive), "n_negative": len(negative)}


def _on_base_model(model: nn.Module) -> Any:
    """A PEFT model's ``disable_adapter()`` context (conditions are read on the base model), else ``no_grad``."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else torch.no_grad()


def _mean_difference_units(
    model: nn.Module, tokenizer: Any, positive: list[str], negative: list[str], layers: list[int], batch_size: int
) -> dict[int, torch.Tensor]:
    """Per layer, the unit difference of mean prompt activations (positive minus negative)."""
    pos = _layer_features(model, tokenizer, positive, layers, None, "cosine", batch_size, "condition means +")
    neg = _layer_features(model, tokenizer, negative, layers, None, "cosine", batch_size, "condition means -")
    return {
        layer: unit_vector(pos[layer].mean(0) - neg[layer].mean(0), f"condition direction {layer}") for layer in layers
    }


def _candidate_layers(spec: ArchSpec, vectors: Mapping[int, Any] | None, layers: Sequence[int] | None) -> list[int]:
    """Sorted candidate layers, checked against the model and the given directions."""
    if layers is None:
        layers = sorted(vectors) if vectors is not None else list(range(spec.n_layers))
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ValueError("`layers` is empty; pass at least one candidate layer.")
    for layer in layers:
        spec.check_layer(layer)
        if vectors is not None and layer not in vectors:
            raise ValueError(f"`directions` has no vector for layer {layer}; it has layers {sorted(vectors)}.")
    return layers


def _report(
    pos: Mapping[int, torch.Tensor], neg: Mapping[int, torch.Tensor], measure: str, n_pos: int, n_neg: int
) -> CalibrationReport:
    """Best threshold per layer and the layer that separates the scores best (maximum TPR - FPR)."""
    report = CalibrationReport(measure=measure, n_positive=n_pos, n_negative=n_neg, chosen_layer=-1)
    best = -math.inf
    for layer in pos:
        threshold, comparator, tpr, fpr = best_threshold(pos[layer], neg[layer])
        report.tpr[layer], report.fpr[layer] = tpr, fpr
        report.threshold[layer], report.comparator[layer] = threshold, comparator
        if tpr - fpr > best:
            best, report.chosen_layer = tpr - fpr, layer
    return report
