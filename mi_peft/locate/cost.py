"""What training a component costs on ordinary text, and localization scores per unit of that cost.

A score such as :func:`~mi_peft.locate.weight_gradient.weight_gradient` ranks components by how much
training their slice can move a behaviour. It says nothing about what the same step does to everything
else: a neuron that fires on most text ranks high for almost any metric, and training its column moves
most replies. :func:`slice_fisher` measures that side of the trade. For a component's trainable slice
``W_c`` (a head's columns of the attention output projection, a neuron's column of the MLP output
projection) it returns ``sqrt(mean_x ||d log p(x) / d W_c||^2)`` over generic texts ``x``: the square
root of the trace of the slice's empirical Fisher information, i.e. how fast the model's likelihood of
ordinary text changes when the slice moves. To second order, a step ``dW`` on the slice changes the
log-likelihood of generic text by ``dW^T F dW / 2``: the Fisher is the KL cost of the step.

:func:`per_cost` divides a result's scores by ``1 + penalty * cost / median(cost)`` per kind, so the
ranking becomes gain per unit of side effect, with ``penalty`` setting how much the cost counts.

Example:
    >>> gain = locate(model, tok, pairs, method="weight_gradient", metric="logprob", components=("neurons",))
    >>> cost = slice_fisher(model, tok, load_paragraphs("recipes/data/general/wikitext2_valid.txt")[:64])
    >>> result = per_cost(gain, cost, penalty=1.0)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..arch import spec_for
from ..data import check_positive, check_texts, tokenize
from ..fingerprint import fingerprints_match
from ..metrics import completion_logprob
from .magnitude import _bar, eval_mode, model_device, to_device
from .result import LocalizationResult
from .weight_gradient import KINDS, projection_io

METHOD = "slice_fisher"


def slice_fisher(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    components: Sequence[str] = KINDS,
    max_length: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> LocalizationResult:
    """Per head and neuron: ``sqrt(mean over texts of ||d log p(text) / d W_c||^2)`` (see the module docstring).

    ``texts`` are plain text (no chat template), each cut to its last ``max_length`` tokens; every token
    after the first is scored. The model is left in the mode and with the ``requires_grad`` flags it came with.
    """
    texts = check_texts(texts, "texts")
    kinds = (components,) if isinstance(components, str) else tuple(components)
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise ValueError(f"slice_fisher scores the trainable slices of {KINDS}; got {components!r}.")
    check_positive(max_length, "max_length")
    check_positive(batch_size, "batch_size")
    spec, device = spec_for(model), model_device(model)
    totals = {kind: torch.zeros(spec.n_layers, spec.n_heads if kind == "heads" else spec.n_neurons) for kind in kinds}
    starts = range(0, len(texts), batch_size)
    with eval_mode(model, freeze=True), _bar(len(starts), progress, "slice_fisher") as bar:
        for start in starts:
            batch = to_device(_scored_batch(tokenizer, texts[start : start + batch_size], max_length), device)
            for kind, squares in _per_text_squares(model, batch, kinds).items():
                totals[kind] += squares.cpu()
            bar.update(1)
    scores = {kind: (total / len(texts)).sqrt() for kind, total in totals.items()}
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()[:16]
    extra = {"n_texts": len(texts), "max_length": max_length, "components": list(kinds)}
    return LocalizationResult.from_model(model, scores, METHOD, metric="text_logprob", data_hash=digest, extra=extra)


def _scored_batch(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Tokenized texts whose ``completion_mask`` marks every real token after the first (each has a real context)."""
    batch = tokenize(tokenizer, texts, max_length=max_length)
    mask = batch["attention_mask"]
    batch["completion_mask"] = mask * (mask.cumsum(-1) > 1).to(mask.dtype)
    return batch


def _per_text_squares(model: nn.Module, batch: dict[str, Tensor], kinds: Sequence[str]) -> dict[str, Tensor]:
    """Sum over the batch's texts of ``||d log p(text) / d W_c||^2``: heads ``[L, H]``, neurons ``[L, N]``.

    Rows are independent, so the gradient of the summed log-likelihood at a row's positions is that
    row's own gradient, and the per-text slice gradient is an einsum over its positions.
    """
    spec = spec_for(model)
    with torch.enable_grad(), projection_io(model, kinds) as store:
        logits = model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits
        value = completion_logprob()(logits, batch)
        keys = sorted(store)
        grads = torch.autograd.grad(value.sum(), [store[k][1] for k in keys], allow_unused=True)
    out: dict[str, list[Tensor]] = {kind: [] for kind in kinds}
    for key, g in zip(keys, grads, strict=True):
        kind, (x, leaf) = key[0], store[key]
        g = (torch.zeros_like(leaf) if g is None else g).float()
        x = x.float()
        if kind == "heads":
            per_text = torch.einsum("bthe,btd->bhed", x.unflatten(-1, (spec.n_heads, spec.head_dim)), g)
            out[kind].append(per_text.square().sum((-2, -1)).sum(0))
        else:
            out[kind].append(torch.einsum("btn,btd->bnd", x, g).square().sum(-1).sum(0))
    return {kind: torch.stack(rows) for kind, rows in out.items()}


def check_penalty(penalty: Any, name: str = "penalty") -> float:
    """``penalty`` if it is a finite number >= 0 (not a bool), else a ValueError naming ``name``."""
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 <= penalty < float("inf"):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {penalty!r}.")
    return penalty


def per_cost(result: LocalizationResult, cost: LocalizationResult, penalty: float = 1.0) -> LocalizationResult:
    """``result`` with each score divided by ``1 + penalty * cost / median(cost)`` (per kind; see the module docs).

    ``cost`` must come from the same model (fingerprint checked) and score every selectable kind of
    ``result``; a component the cost did not score (NaN) stays unscored. ``penalty=0`` returns equal scores.
    """
    check_penalty(penalty)
    fingerprints = (result.model_fingerprint, cost.model_fingerprint)
    if all(fingerprints) and not fingerprints_match(*fingerprints):
        raise ValueError("the cost result was scored on another model than the result; compute both on the same model.")
    kinds = [k for k in result.scores if k in KINDS]
    missing = [k for k in kinds if k not in cost.scores]
    if not kinds or missing:
        raise ValueError(
            f"per_cost divides head and neuron scores; the cost result scores {sorted(cost.scores)}, "
            f"the result {sorted(result.scores)}. Score {missing or list(KINDS)} in both (slice_fisher(components=...))."
        )
    scores = dict(result.scores)
    for kind in kinds:
        c = cost.scores[kind]
        if c.shape != result.scores[kind].shape:
            raise ValueError(f"cost scores[{kind!r}] {tuple(c.shape)} do not match {tuple(result.scores[kind].shape)}.")
        scale = c.nanmedian().clamp_min(torch.finfo(c.dtype).tiny)
        scores[kind] = result.scores[kind] / (1.0 + penalty * c / scale)
    extra = {**result.extra, "cost": {"method": cost.method, "data_hash": cost.data_hash, "penalty": float(penalty)}}
    return dataclasses.replace(result, scores=scores, extra=extra)
