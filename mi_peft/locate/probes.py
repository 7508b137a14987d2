"""Linear probes: the ``probe`` locate method and the package's one logistic regression.

:func:`fit_logistic` serves both the ``probe`` component scores (held-out accuracy per head, layer)
and the ``"probe"`` steering directions of :func:`mi_peft.locate.directions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import spec_for
from .magnitude import (
    KINDS,
    MethodOutput,
    PairBatches,
    Positions,
    _bar,
    collect,
    eval_mode,
    keep_one,
    model_device,
    to_device,
    unflatten,
)


def probe(
    model: nn.Module,
    batches: PairBatches,
    *,
    components: Sequence[str] = KINDS,
    positions: Positions = "last",
    test_size: float = 0.3,
    steps: int = 100,
    l2: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> MethodOutput:
    """Score = held-out accuracy of a linear probe (positive vs negative) on each component (ITI-style).

    Heads (``d_head`` features) and residual layers (``d_model``) get a logistic regression each, all
    trained at once by :func:`fit_logistic` (L-BFGS, at most ``steps`` iterations, L2 ``l2``, standardised
    features). Neurons are single features, so they get the best single threshold on the training
    split. Pairs are split (``test_size``, ``seed``) so both sides of a pair land in the same split.
    Chance is 0.5.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"`test_size` must be a fraction in (0, 1), got {test_size!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int, got {steps!r}.")
    spec = spec_for(model)
    feats: dict[str, list[Tensor]] = {f"{k}/{s}": [] for k in components for s in ("pos", "neg")}
    device = model_device(model)
    with eval_mode(model), _bar(len(batches), progress, "probe") as bar:
        for pair in batches:
            for name, side in zip(("pos", "neg"), pair, strict=True):
                acts, weight, _ = collect(model, to_device(side, device), components, positions, **keep_one(model))
                w = weight.cpu()[..., None, None]
                for kind in components:
                    mean = (acts[kind].float().cpu() * w).sum(1) / w.sum(1).clamp_min(1)  # [B, C, D]
                    feats[f"{kind}/{name}"].append(mean)
            bar.update(1)
    n = sum(len(f) for f in feats[f"{components[0]}/pos"])
    if n < 2:
        raise ValueError(f"probe needs at least 2 pairs (one to train, one to test), got {n}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(test_size * n)))
    test, train = order[:n_test], order[n_test:]
    scores, train_acc = {}, {}
    for kind in components:
        pos, neg = torch.cat(feats[f"{kind}/pos"]), torch.cat(feats[f"{kind}/neg"])
        x_tr, y_tr = torch.cat([pos[train], neg[train]]), _labels(len(train))
        x_te, y_te = torch.cat([pos[test], neg[test]]), _labels(len(test))
        if kind == "neurons":
            acc_te, acc_tr = _threshold_probe(x_tr[..., 0], y_tr, x_te[..., 0], y_te)
        else:
            acc_te, acc_tr = _logistic_probe(x_tr, y_tr, x_te, y_te, steps=steps, l2=l2)
        scores[kind] = unflatten(spec, kind, acc_te)
        train_acc[kind] = float(acc_tr.mean())
    extra = {"n_train": 2 * len(train), "n_test": 2 * len(test), "steps": steps, "mean_train_accuracy": train_acc}
    return scores, extra


def _labels(n: int) -> Tensor:
    return torch.cat([torch.ones(n), torch.zeros(n)])


def fit_logistic(x: Tensor, y: Tensor, *, l2: float, steps: int) -> tuple[Tensor, Tensor]:
    """Batched L2-regularised logistic regression: one model per column ``c`` of ``x`` ``[n, C, D]``.

    The one probe of the package (component probes and probe directions): full-batch L-BFGS in float64,
    deterministic, minimising ``mean BCE + l2 / 2 * ||w||^2`` per column; the caller rescales the features.
    Returns ``weight [C, D]`` and ``bias [C]`` (float32); a positive logit predicts ``y = 1``.
    """
    x = x.double()
    target = y.double()[:, None].expand(-1, x.shape[1])
    weight = torch.zeros(x.shape[1:], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = torch.einsum("ncd,cd->nc", x, weight) + bias
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0).sum()
        (loss + l2 / 2 * weight.pow(2).sum()).backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def logistic_accuracy(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-column accuracy ``[C]`` of :func:`fit_logistic`'s models on ``x`` ``[n, C, D]`` with labels ``y``."""
    predicted = torch.einsum("ncd,cd->nc", x.float(), weight) + bias > 0
    return (predicted.float() == y.float()[:, None]).float().mean(0)


def _logistic_probe(
    x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor, *, steps: int, l2: float
) -> tuple[Tensor, Tensor]:
    """Held-out and training accuracy of one logistic regression per component on standardised features."""
    mu, sd = x_tr.mean(0), x_tr.std(0, unbiased=False).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    weight, bias = fit_logistic(x_tr, y_tr, l2=l2, steps=steps)
    return logistic_accuracy(x_te, y_te, weight, bias), logistic_accuracy(x_tr, y_tr, weight, bias)


def _threshold_probe(x_tr: Tensor, y_tr: Tensor, x_te: Tensor, y_te: Tensor) -> tuple[Tensor, Tensor]:
    """Best single threshold (either direction) per column of ``x_tr`` ``[n, C]``. Returns accuracies."""
    n, c = x_tr.shape
    vals, order = x_tr.sort(0)
    pos_below = torch.cat([torch.zeros(1, c), y_tr[order].cumsum(0)])  # positives among the i smallest
    neg_below = torch.arange(n + 1, dtype=torch.float32)[:, None] - pos_below
    acc_up = (neg_below + y_tr.sum() - pos_below) / n  # predict positive when x >= threshold i
    best_up, i_up = acc_up.max(0)
    best_down, i_down = (1 - acc_up).max(0)
    up = best_up >= best_down
    i = torch.where(up, i_up, i_down)
    edges = torch.cat([torch.full((1, c), -math.inf), vals, torch.full((1, c), math.inf)])
    lo, hi = edges.gather(0, i[None])[0], edges.gather(0, (i + 1)[None])[0]
    threshold = torch.where(torch.isinf(lo), lo, torch.where(torch.isinf(hi), hi, (lo + hi) / 2))

    def accuracy(x: Tensor, y: Tensor) -> Tensor:
        above = x >= threshold
        return (torch.where(up, above, ~above).float() == y[:, None]).float().mean(0)

    return accuracy(x_te, y_te), accuracy(x_tr, y_tr)
