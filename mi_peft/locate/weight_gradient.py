"""Weight-gradient scores: what training each head's or neuron's own weights could do to a metric.

The sparse adapter's default modes train a head's columns of the attention output projection and a
neuron's column of the MLP output projection. The gradient of a metric with respect to such a slice is
``sum_t x_c(t) * dM/dy(t)``: the component's input to the projection at token ``t`` times the gradient at
the projection's output. Its norm is the first-order gain one optimiser step on that slice alone can buy,
so the score ranks components by what *training* them can change, not by what they already do
(``grad_x_act``, ``attribution_patching``). A neuron that never fires where the metric is decided gets
no gradient, however strongly it separates the classes. With ``metric="logprob"`` on completion pairs
this is the gradient of the SFT loss on the positive completions, minus that on the negative ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..arch import ArchSpec, spec_for
from ..capture_sites import hooked
from ..metrics import Metric
from .gradient import LogitsPlan
from .magnitude import (
    Batch,
    MethodOutput,
    PairBatches,
    Positions,
    _bar,
    eval_mode,
    model_device,
    position_index,
    run_model,
    to_device,
)

NORMS: tuple[str, ...] = ("l1", "l2")
KINDS: tuple[str, ...] = ("heads", "neurons")


def _projection(model: nn.Module, spec: ArchSpec, kind: str, layer: int) -> nn.Module:
    return spec.attn_out_module(model, layer) if kind == "heads" else spec.mlp_out_module(model, layer)


@contextmanager
def projection_io(model: nn.Module, kinds: Sequence[str]) -> Iterator[dict[tuple[str, int], tuple[Tensor, Tensor]]]:
    """Per ``(kind, layer)``: the input of its output projection and that projection's output, in the graph.

    ``autograd.grad`` with respect to an output gives the metric's total derivative through every later
    component; the parameters stay frozen and nothing before the first projection is differentiated.
    """
    spec = spec_for(model)
    store: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def make(key: tuple[str, int]):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            # Only the first projection of the forward pass (nothing before it needs grad) becomes a leaf;
            # later outputs stay in the graph, so every path through later components is differentiated.
            y = output if output.requires_grad else output.detach().requires_grad_(True)
            store[key] = (x.detach(), y)
            return y

        return hook

    handles = [
        _projection(model, spec, kind, layer).register_forward_hook(make((kind, layer)), with_kwargs=True)
        for kind in kinds
        for layer in range(spec.n_layers)
    ]
    with hooked(handles):
        yield store


def _side_gradient(
    model: nn.Module, batch: Batch, kinds: Sequence[str], positions: Positions, plan: LogitsPlan
) -> tuple[dict[str, Tensor], Tensor]:
    """d sum(metric) / d slice for every component of ``kinds``: heads ``[L, H, d_head, D]``, neurons ``[L, N, D]``."""
    spec = spec_for(model)
    where = position_index(positions, batch["attention_mask"])
    with torch.enable_grad(), projection_io(model, kinds) as store:
        out = run_model(model, batch, **plan.kwargs())
        plan.observe(out.logits, batch)
        value = plan.score(out.logits, batch)
        keys = sorted(store)
        grads = torch.autograd.grad(value.sum(), [store[k][1] for k in keys], allow_unused=True)
    per_kind: dict[str, list[Tensor]] = {kind: [] for kind in kinds}
    for key, g in zip(keys, grads, strict=True):
        kind, (x, leaf) = key[0], store[key]
        g = torch.zeros_like(leaf) if g is None else g
        x = torch.gather(x, 1, where[..., None].expand(-1, -1, x.shape[-1])).float()
        g = torch.gather(g, 1, where[..., None].expand(-1, -1, g.shape[-1])).float()
        if kind == "heads":
            x = x.unflatten(-1, (spec.n_heads, spec.head_dim))
            per_kind[kind].append(torch.einsum("bkhe,bkd->hed", x, g))
        else:
            per_kind[kind].append(torch.einsum("bkn,bkd->nd", x, g))
    return {kind: torch.stack(v) for kind, v in per_kind.items()}, value.detach()


def weight_gradient(
    model: nn.Module,
    batches: PairBatches,
    *,
    metric: Metric,
    components: Sequence[str] = KINDS,
    positions: Positions = "all",
    negative_weight: float = 1.0,
    norm: str = "l1",
    progress: bool = False,
) -> MethodOutput:
    """Score = ``|| d/dW_c [mean metric(positive) - negative_weight * mean metric(negative)] ||`` per component.

    ``W_c`` is the slice the sparse adapter trains in its ``"out"`` modes (a head's ``d_model x d_head``
    columns of the attention output projection, a neuron's column of the MLP output projection). ``norm="l1"``
    (default) is the first-order gain of one Adam-like step, which moves every coordinate by about the
    learning rate; ``"l2"`` that of one gradient-descent step. ``negative_weight=0`` scores the positive side
    alone (the SFT loss on positive completions). ``positions`` limits the tokens whose gradient counts.
    """
    bad = [k for k in components if k not in KINDS]
    if bad:
        raise ValueError(
            f"weight_gradient scores the trainable slices of heads and neurons; {bad} have none. "
            f"Pass components={KINDS} or a subset."
        )
    if norm not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {norm!r}.")
    if isinstance(negative_weight, bool) or not isinstance(negative_weight, (int, float)) or negative_weight < 0:
        raise ValueError(f"`negative_weight` must be a number >= 0, got {negative_weight!r}.")
    plan = LogitsPlan(model, metric)
    device = model_device(model)
    totals: dict[str, dict[str, Any]] = {side: {"n": 0, "metric": 0.0, "grad": {}} for side in ("positive", "negative")}
    sides = ("positive", "negative") if negative_weight else ("positive",)
    with eval_mode(model, freeze=True), _bar(len(batches) * len(sides), progress, "weight_gradient") as bar:
        for pair in batches:
            for side, batch in zip(sides, pair, strict=False):
                grads, value = _side_gradient(model, to_device(batch, device), components, positions, plan)
                acc = totals[side]
                for kind, g in grads.items():
                    acc["grad"][kind] = g if kind not in acc["grad"] else acc["grad"][kind] + g
                acc["n"] += value.shape[0]
                acc["metric"] += float(value.sum())
                bar.update(1)
    scores = {}
    for kind in components:
        g = totals["positive"]["grad"][kind] / totals["positive"]["n"]
        if negative_weight:
            g = g - negative_weight * totals["negative"]["grad"][kind] / totals["negative"]["n"]
        dims = (-2, -1) if kind == "heads" else (-1,)
        scores[kind] = (g.abs().sum(dims) if norm == "l1" else g.square().sum(dims).sqrt()).cpu()
    if all(not bool(s.any()) for s in scores.values()):
        raise ValueError(
            f"every weight gradient is zero: the metric does not depend on the tokens at positions={positions!r} "
            "(e.g. 'last' with metric='logprob', whose last token predicts nothing); use positions='all'."
        )
    extra = {side: t["metric"] / t["n"] for side, t in totals.items() if t["n"]}
    return scores, {f"metric_{side}": v for side, v in extra.items()}
