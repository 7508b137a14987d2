"""Causal validation of a localization: does zero-ablating the located components move the metric more
than ablating as many random ones?

A ranking (by attribution, or by probe accuracy) is only a hypothesis about where a behaviour lives;
ablating the top components against a random set of the same size is the cheap test of it. Recipes whose
locate method has no metric (``probe``) either name one in ``validate.metric`` or skip the test with
``validate.top_k: 0``; the report states which.
"""

from __future__ import annotations

from typing import Any

import torch

from .capture import ablate
from .data import ContrastivePairs
from .metrics import get_metric, metric_name
from .recipe import Recipe


def recipe_metric(recipe: Recipe, tokenizer: Any, section: str):
    """The metric of ``locate`` or ``validate`` (validate falls back to the locate metric)."""
    loc, val = recipe.locate, recipe.validate
    if section == "validate" and val.metric is not None:
        return get_metric(val.metric, tokenizer, **(val.metric_args or {}))
    if loc.metric is None:
        if section == "locate":
            return None
        raise ValueError(
            f"{recipe.path}: `locate.metric` is null, so set `validate.metric` for causal validation "
            "or skip it with `validate.top_k: 0`."
        )
    return get_metric(loc.metric, tokenizer, **(loc.metric_args or {}))


def metric_mean(model, tokenizer, pairs: ContrastivePairs, metric, batch_size: int, contrast: bool = False) -> float:
    """Mean metric on the positive side (the behaviour-present prompts), or of positive minus negative per pair."""
    total, n = 0.0, 0
    with torch.no_grad():
        for pos, neg in pairs.batches(tokenizer, batch_size=batch_size):
            scores = metric(model(**pos).logits, pos)
            if contrast:
                scores = scores - metric(model(**neg).logits, neg)
            total, n = total + float(scores.sum()), n + scores.numel()
    return total / max(n, 1)


def validate_causally(model, tokenizer, recipe: Recipe, result, val: ContrastivePairs) -> dict[str, Any]:
    """Ablate the top-k located heads+neurons vs a random set of the same size; compare the metric.

    With ``validate.top_k: 0`` nothing is measured and the returned dict says so under ``"skipped"``.
    """
    k = recipe.validate.top_k
    if k == 0:
        return {"k": 0, "skipped": "`validate.top_k: 0` in the recipe"}
    metric = recipe_metric(recipe, tokenizer, "validate")
    contrast = recipe.validate.contrast
    pairs = val.subset(min(recipe.validate.pairs, len(val)), seed=recipe.seed)
    kinds = tuple(kind for kind in ("heads", "neurons") if kind in result.scores)
    top = result.select(top_k=k, kinds=kinds)
    rand = result.select(top_k=k, kinds=kinds, random=recipe.seed)
    size = recipe.locate.batch_size
    clean = metric_mean(model, tokenizer, pairs, metric, size, contrast)
    name = metric_name(metric) + (" (positive - negative)" if contrast else "")
    out = {"k": k, "metric": name, "pairs": len(pairs), "clean": clean}
    for label, comps in (("top", top), ("random", rand)):
        with ablate(model, heads=comps.heads or None, neurons=comps.neurons or None):
            out[label] = metric_mean(model, tokenizer, pairs, metric, size, contrast)
        out[f"{label}_components"] = comps.to_dict()
    out["top_effect"], out["random_effect"] = out["top"] - clean, out["random"] - clean
    return out
