"""Ranking, budgeted greedy selection and rank correlation for localization scores."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..arch import ArchSpec


class _Candidates(NamedTuple):
    """Scored components in rank order: kind position, flat index within the kind, raw ``|score|``."""

    kind: torch.Tensor
    flat: torch.Tensor
    raw: torch.Tensor


SIGNS: tuple[str, ...] = ("abs", "positive", "negative")


def _order(flat: torch.Tensor, sign: str = "abs") -> torch.Tensor:
    """Flat indices of the non-NaN entries by decreasing ``|score|`` (or score, or -score; stable: ties by index)."""
    if sign not in SIGNS:
        raise ValueError(f"`sign` must be one of {SIGNS}, got {sign!r}.")
    idx = (~torch.isnan(flat)).nonzero().squeeze(1)
    key = {"abs": flat[idx].abs(), "positive": flat[idx], "negative": -flat[idx]}[sign]
    return idx[torch.sort(key, descending=True, stable=True).indices]


def _candidates(scores: list[torch.Tensor]) -> _Candidates:
    kind, flat, raw, key = [], [], [], []
    for i, s in enumerate(scores):
        idx = _order(s.flatten())
        a = s.flatten()[idx].abs()
        kind.append(torch.full_like(idx, i))
        flat.append(idx)
        raw.append(a)
        key.append(a / a[0] if a[0] > 0 else torch.zeros_like(a))
    order = torch.sort(torch.cat(key), descending=True, stable=True).indices
    return _Candidates(torch.cat(kind)[order], torch.cat(flat)[order], torch.cat(raw)[order])


def _greedy_fixed(cost: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy knapsack in rank order with fixed per-item costs, vectorized.

    Each round takes the longest affordable prefix of the remaining items; the first item that did
    not fit and every item costlier than what is left can never fit later, so they drop out. Costs
    shrink strictly between rounds, so there are at most as many rounds as distinct costs.
    """
    taken = torch.zeros_like(cost, dtype=torch.bool)
    alive = cost <= budget
    remaining = budget
    while alive.any():
        idx = alive.nonzero().squeeze(1)
        csum = cost[idx].cumsum(0)
        n = int((csum <= remaining).sum())
        taken[idx[:n]] = True
        if n == idx.numel():
            break
        remaining -= int(csum[n - 1]) if n else 0
        alive[idx[: n + 1]] = False
        alive &= cost <= remaining
    return taken


def _greedy_qkvo(cand: _Candidates, costs: list[int], budget: int, spec: ArchSpec, head_kind: int) -> torch.Tensor:
    """Greedy in rank order where a head's cost depends on earlier picks (k/v rows shared per kv head).

    Loops over heads only; the neurons ranked between two heads are taken in bulk.
    """
    taken = torch.zeros_like(cand.kind, dtype=torch.bool)
    heads = (cand.kind == head_kind).nonzero().squeeze(1).tolist()
    neurons = (cand.kind != head_kind).nonzero().squeeze(1)
    per, c_neuron = spec.d_model * spec.head_dim, costs[1 - head_kind] if len(costs) == 2 else None
    remaining, paid, next_neuron, neurons_open = budget, set(), 0, c_neuron is not None
    for pos in [*heads, cand.kind.numel()]:
        end = int(torch.searchsorted(neurons, pos))
        if neurons_open:
            n = min(end - next_neuron, remaining // c_neuron)
            taken[neurons[next_neuron : next_neuron + n]] = True
            remaining -= n * c_neuron
            neurons_open = n == end - next_neuron
        next_neuron = end
        if pos == cand.kind.numel():
            break
        flat = int(cand.flat[pos])
        group = (flat // spec.n_heads, (flat % spec.n_heads) // spec.group_size)
        cost = 2 * per + (0 if group in paid else 2 * per)
        if cost <= remaining:
            taken[pos], remaining = True, remaining - cost
            paid.add(group)
        elif not neurons_open and remaining < 2 * per:
            break
    return taken


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    values, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = ((2 * ends - counts - 1).double() / 2)[inverse]
    return ranks


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return max(-1.0, min(1.0, (ra @ rb).item() / denom)) if denom > 0 else float("nan")
