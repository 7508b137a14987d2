"""Magnitude methods: score components from activations alone, with no metric and no backward pass.

- :func:`mean_diff`: norm of ``mean(positive) - mean(negative)`` per component.
- :func:`activation_stats`: Fisher ratio (squared mean difference over pooled variance); the mean
  ``|activation|`` difference is kept in ``extra``.
- :func:`lape`: class-specific components (LAPE): entropy of per-class activation probabilities.

The module also holds the activation plumbing shared by all methods: every layer of every kind is
captured in ONE forward pass and flattened to ``[batch, k, C, D]`` (``k`` positions, ``C``
components of the kind, ``D`` their width: ``d_head`` for heads, 1 for neurons, ``d_model`` for
the residual stream), so scoring is plain batched tensor maths.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import capture
from ..arch import ArchSpec, spec_for
from ..capture_sites import hooked

Batch = Mapping[str, Tensor]
PairBatches = Sequence[tuple[Batch, Batch]]
Scores = dict[str, Tensor]
MethodOutput = tuple[Scores, dict[str, Any]]
Positions = Union[Literal["last", "all", "mean"], Sequence[int]]
KINDS: tuple[str, ...] = ("heads", "neurons", "residual")
MODEL_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")


# ---- shared plumbing ------------------------------------------------------------------------


def n_components(spec: ArchSpec, kind: str) -> int:
    """Number of components of ``kind`` over all layers (the flat axis ``C``)."""
    return spec.n_layers * {"heads": spec.n_heads, "neurons": spec.n_neurons, "residual": 1}[kind]


def per_layer(spec: ArchSpec, kind: str) -> int:
    return {"heads": spec.n_heads, "neurons": spec.n_neurons, "residual": 1}[kind]


def unflatten(spec: ArchSpec, kind: str, flat: Tensor) -> Tensor:
    """Flat ``[C]`` scores -> ``[n_layers, n_heads]``, ``[n_layers, n_neurons]`` or ``[n_layers]`` (float32, cpu)."""
    shape = (spec.n_layers,) if kind == "residual" else (spec.n_layers, per_layer(spec, kind))
    return flat.detach().to("cpu", torch.float32).reshape(shape)


def flatten_stack(kind: str, stacked: Tensor) -> Tensor:
    """``cache.stack(kind)`` ``[B, L, k, ...]`` -> ``[B, k, C, D]`` (``C`` layer-major), at least float32."""
    b, n_layers, k = stacked.shape[:3]
    if kind == "heads":  # [B, L, k, H, D]
        flat = stacked.permute(0, 2, 1, 3, 4).reshape(b, k, n_layers * stacked.shape[3], stacked.shape[4])
    elif kind == "neurons":  # [B, L, k, N]
        flat = stacked.permute(0, 2, 1, 3).reshape(b, k, n_layers * stacked.shape[3], 1)
    else:  # residual [B, L, k, d] -> [B, k, L, d]
        flat = stacked.permute(0, 2, 1, 3)
    return flat if flat.dtype == torch.float64 else flat.float()


def check_positions(positions: Any, allowed: tuple[str, ...]) -> Positions:
    """Validate ``positions``: one of ``allowed`` strings or a non-empty list of ints."""
    if isinstance(positions, str):
        if positions not in allowed:
            raise ValueError(f"`positions` must be one of {allowed} or a list of token indices, got {positions!r}.")
        return positions
    if isinstance(positions, int) and not isinstance(positions, bool):
        return [positions]
    if not isinstance(positions, Sequence) or not positions:
        raise ValueError(f"`positions` must be one of {allowed} or a non-empty list of ints, got {positions!r}.")
    if any(isinstance(p, bool) or not isinstance(p, int) for p in positions):
        raise ValueError(f"`positions` indices must be ints (negative counts from the end), got {list(positions)!r}.")
    return list(dict.fromkeys(positions))  # de-duplicated, order kept


def position_index(positions: Positions, attention_mask: Tensor) -> Tensor:
    """Per-row token indices ``[B, k]`` for ``"last"`` (last real token), ``"all"`` or explicit indices."""
    b, seq = attention_mask.shape
    device = attention_mask.device
    if positions == "last":
        return (attention_mask.to(torch.long) * torch.arange(seq, device=device)).argmax(-1, keepdim=True)
    if positions == "all":
        return torch.arange(seq, device=device).expand(b, seq)
    if positions == "mean":
        raise ValueError("positions='mean' has no token indices; this method needs 'last', 'all' or indices.")
    idx = torch.tensor(list(positions), dtype=torch.long, device=device)
    if idx.min() < -seq or idx.max() >= seq:
        raise ValueError(f"position index out of range in {list(positions)}: this batch has positions 0..{seq - 1}.")
    return (idx % seq).expand(b, -1)


def to_device(batch: Batch, device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def layer_sel(kinds: Sequence[str]) -> dict[str, bool]:
    """Keyword arguments for :func:`capture.record` capturing every layer of ``kinds``."""
    return {kind: kind in kinds for kind in KINDS}


@contextmanager
def eval_mode(model: nn.Module, freeze: bool = False) -> Iterator[None]:
    """Put ``model`` in eval mode (and optionally freeze parameters) for the block, then restore both."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()] if freeze else []
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def run_model(model: nn.Module, batch: Batch, **kwargs: Any) -> Any:
    """Forward with the model inputs of ``batch`` only (metrics may add other keys)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return model(**inputs, use_cache=kwargs.pop("use_cache", False), **kwargs)


def collect(
    model: nn.Module, batch: Batch, kinds: Sequence[str], positions: Positions, **forward_kwargs: Any
) -> tuple[dict[str, Tensor], Tensor, Any]:
    """One no-grad forward: activations per kind ``[B, k, C, D]``, token weights ``[B, k]``, model output.

    ``positions="mean"`` averages over real tokens (``k = 1``); the weights are 0 on padding picked by
    ``"all"`` or explicit indices, so statistics ignore it.
    """
    mask = batch["attention_mask"]
    if positions == "mean":
        where: Any = "mean"
        weight = torch.ones(mask.shape[0], 1, device=mask.device)
    else:
        where = position_index(positions, mask)
        weight = torch.gather(mask, 1, where).float()
    with torch.no_grad(), capture.record(model, **layer_sel(kinds), positions=where, attention_mask=mask) as cache:
        out = run_model(model, batch, **forward_kwargs)
    acts = {}
    for kind in kinds:
        stacked = cache.stack(kind)
        if positions == "mean":
            stacked = stacked.unsqueeze(2)
        acts[kind] = flatten_stack(kind, stacked)
    return acts, weight, out


@contextmanager
def gates_at(model: nn.Module, where: Tensor) -> Iterator[list[Tensor]]:
    """Hooks that append, per layer and forward pass, whether each neuron fires at ``where`` (``[B, k]``).

    This is LAPE's firing test. A gated neuron's value ``act(gate) * up`` takes the sign of ``up``, so
    "value > 0" is not "firing"; the neuron fires where ``act(gate) > 0``, i.e. ``gate > 0`` for SiLU and
    GELU. The gate is the first ``n_neurons`` outputs of the architecture map's first MLP input projection
    (the fused gate/up module's first half; the only input projection of an ungated MLP).
    """
    spec = spec_for(model)
    rows: list[Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Tensor) -> None:
        gate = output[..., : spec.n_neurons]
        rows.append(torch.gather(gate, 1, where[..., None].expand(-1, -1, gate.shape[-1])) > 0)

    modules = [spec.layer_module(model, layer, spec.mlp_in[0]) for layer in range(spec.n_layers)]
    with hooked([m.register_forward_hook(keep) for m in modules]):
        yield rows


def gate_open(model: nn.Module, batch: Batch, positions: Positions) -> tuple[Tensor, Tensor]:
    """Whether each neuron fires (:func:`gates_at`): ``[B, k, C]`` (0/1 float) and token weights ``[B, k]``."""
    mask = batch["attention_mask"]
    where = position_index(positions, mask)
    with torch.no_grad(), gates_at(model, where) as rows:
        run_model(model, batch, **keep_one(model))
    return torch.cat(rows, -1).float(), torch.gather(mask, 1, where).float()


def _bar(total: int, progress: bool, desc: str) -> tqdm:
    return tqdm(total=total, disable=not progress, desc=desc, leave=False)


class _Moments:
    """Running weighted count, sum and sum of squares of ``[C, D]`` activations (float64)."""

    def __init__(self) -> None:
        self.n: Tensor | float = 0.0
        self.s: Tensor | float = 0.0
        self.s2: Tensor | float = 0.0
        self.abs: Tensor | float = 0.0  # sum of per-component norms

    def add(self, acts: Tensor, weight: Tensor) -> None:
        w = weight.double()[..., None, None]  # [B, k, 1, 1]
        a = acts.double()
        self.n = self.n + weight.double().sum()
        self.s = self.s + (a * w).sum((0, 1))
        self.s2 = self.s2 + (a * a * w).sum((0, 1))
        self.abs = self.abs + (a.norm(dim=-1, keepdim=True) * w).sum((0, 1))[..., 0]

    def mean(self) -> Tensor:
        return self.s / self.n

    def var(self) -> Tensor:
        n = torch.as_tensor(self.n)
        return ((self.s2 - self.s * self.s / n) / (n - 1).clamp_min(1)).clamp_min(0)


def _moments(
    model: nn.Module, batches: PairBatches, kinds: Sequence[str], positions: Positions, progress: bool, desc: str
) -> tuple[dict[str, _Moments], dict[str, _Moments]]:
    pos_m = {k: _Moments() for k in kinds}
    neg_m = {k: _Moments() for k in kinds}
    device = model_device(model)
    with eval_mode(model), _bar(len(batches), progress, desc) as bar:
        for pos, neg in batches:
            for side, moments in ((pos, pos_m), (neg, neg_m)):
                acts, weight, _ = collect(model, to_device(side, device), kinds, positions, **keep_one(model))
                for kind in kinds:
                    moments[kind].add(acts[kind], weight)
            bar.update(1)
    return pos_m, neg_m


def keep_one(model: nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model supports it: capture-only passes need no full logits."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def mean_activations(
    model: nn.Module, batches: PairBatches, kinds: Sequence[str], positions: Positions
) -> dict[str, Tensor]:
    """Mean activation per component ``[C, D]`` over every prompt (both sides) at ``positions``."""
    sums: dict[str, Tensor] = {}
    count = torch.zeros(())
    device = model_device(model)
    for pair in batches:
        for side in pair:
            acts, weight, _ = collect(model, to_device(side, device), kinds, positions, **keep_one(model))
            w = weight.cpu()[..., None, None]
            count += weight.sum().cpu()
            for kind in kinds:
                sums[kind] = sums.get(kind, 0) + (acts[kind].cpu() * w).sum((0, 1))
    return {k: v / count for k, v in sums.items()}


# ---- methods --------------------------------------------------------------------------------


def mean_diff(
    model: nn.Module,
    batches: PairBatches,
    *,
    components: Sequence[str] = KINDS,
    positions: Positions = "last",
    progress: bool = False,
) -> MethodOutput:
    """Score = ``|| mean(positive) - mean(negative) ||`` per component (over ``d_head``, abs per neuron, over
    ``d_model`` for the residual stream). Always >= 0: it says how much, not in which direction."""
    spec = spec_for(model)
    pos_m, neg_m = _moments(model, batches, components, positions, progress, "mean_diff")
    scores = {k: unflatten(spec, k, (pos_m[k].mean() - neg_m[k].mean()).norm(dim=-1)) for k in components}
    return scores, {}


def activation_stats(
    model: nn.Module,
    batches: PairBatches,
    *,
    components: Sequence[str] = KINDS,
    positions: Positions = "last",
    stat: Literal["fisher", "abs_diff"] = "fisher",
    progress: bool = False,
) -> MethodOutput:
    """Two statistics per component; ``stat`` picks the score, the other goes to ``extra[<name>][kind]``.

    - ``"fisher"`` (default): ``sum_d (mu_pos - mu_neg)^2 / sum_d pooled_var`` (scale-free separation).
    - ``"abs_diff"``: ``mean ||a||`` over positive minus over negative (signed: > 0 = larger on positive).
    """
    if stat not in ("fisher", "abs_diff"):
        raise ValueError(f"`stat` must be 'fisher' or 'abs_diff', got {stat!r}.")
    spec = spec_for(model)
    pos_m, neg_m = _moments(model, batches, components, positions, progress, "activation_stats")
    fisher, abs_diff = {}, {}
    for k in components:
        p, q = pos_m[k], neg_m[k]
        n_p, n_q = torch.as_tensor(p.n), torch.as_tensor(q.n)
        pooled = ((n_p - 1).clamp_min(0) * p.var() + (n_q - 1).clamp_min(0) * q.var()) / (n_p + n_q - 2).clamp_min(1)
        diff2 = ((p.mean() - q.mean()) ** 2).sum(-1)
        fisher[k] = unflatten(spec, k, diff2 / pooled.sum(-1).clamp_min(1e-12))
        abs_diff[k] = unflatten(spec, k, p.abs / p.n - q.abs / q.n)
    chosen, other = (fisher, abs_diff) if stat == "fisher" else (abs_diff, fisher)
    other_name = "abs_diff" if stat == "fisher" else "fisher"
    return chosen, {"stat": stat, other_name: {k: v.tolist() for k, v in other.items()}}


def lape(
    model: nn.Module,
    class_batches: Mapping[str, Sequence[Batch]],
    *,
    components: Sequence[str] = ("neurons",),
    positions: Positions = "all",
    min_prob: float = 0.01,
    progress: bool = False,
) -> MethodOutput:
    """Class-specific components (LAPE, Tang et al. 2024), for two or more classes.

    Neurons: ``p_c`` = fraction of real tokens of class ``c`` where the neuron fires (:func:`gate_open`:
    its activation function's input is > 0, as in the paper; not the sign of a gated value). Heads and the
    residual stream: ``p_c`` = mean activation norm on class ``c``. With ``q = p / sum_c p`` the score is
    ``1 - H(q) / log(n_classes)``: 1 = active on one class only, 0 = equally active on all. Neurons whose
    largest ``p_c`` is below ``min_prob`` (almost never active) score 0. With exactly two classes the
    score is signed: positive when the FIRST class (``"positive"`` for contrastive pairs) is the more active.
    ``extra["argmax_class"][kind]`` names, per component, the index of the class it is most active on.
    """
    names = list(class_batches)
    if len(names) < 2:
        raise ValueError(f"lape needs at least two classes, got {names}; pass {{'class_a': [...], 'class_b': [...]}}.")
    if not 0.0 <= min_prob < 1.0:
        raise ValueError(f"`min_prob` must be in [0, 1), got {min_prob!r}.")
    spec = spec_for(model)
    device = model_device(model)
    total = sum(len(b) for b in class_batches.values())
    level = {k: torch.zeros(len(names), n_components(spec, k), dtype=torch.float64) for k in components}
    tokens = torch.zeros(len(names), dtype=torch.float64)
    with eval_mode(model), _bar(total, progress, "lape") as bar:
        for c, name in enumerate(names):
            for batch in class_batches[name]:
                batch = to_device(batch, device)
                others = [k for k in components if k != "neurons"]
                where = position_index(positions, batch["attention_mask"])
                with gates_at(model, where) if "neurons" in components else nullcontext([]) as gates:
                    acts, weight, _ = collect(model, batch, others, positions, **keep_one(model))
                if "neurons" in components:  # one forward pass for the gates and the other kinds
                    acts["neurons"] = torch.cat(gates, -1).float()
                w = weight.double().cpu()
                tokens[c] += w.sum()
                for kind in components:
                    a = acts[kind].double().cpu()
                    value = a if kind == "neurons" else a.norm(dim=-1)
                    level[kind][c] += (value * w[..., None]).sum((0, 1))
                bar.update(1)
    if (tokens == 0).any():
        empty = [n for n, t in zip(names, tokens.tolist(), strict=True) if t == 0]
        raise ValueError(f"lape classes {empty} have no tokens at positions={positions!r}; give them prompts.")
    scores, argmax = {}, {}
    for kind in components:
        p = level[kind] / tokens[:, None]  # [n_classes, C]
        q = p / p.sum(0, keepdim=True).clamp_min(1e-12)
        entropy = -(q * q.clamp_min(1e-12).log()).sum(0) / math.log(len(names))
        score = (1.0 - entropy).clamp_min(0)
        if kind == "neurons":
            score = torch.where(p.max(0).values < min_prob, torch.zeros_like(score), score)
        if len(names) == 2:
            score = score * torch.sign(p[0] - p[1])
        scores[kind] = unflatten(spec, kind, score)
        argmax[kind] = unflatten(spec, kind, p.argmax(0).float()).long().tolist()
    extra = {"classes": names, "min_prob": min_prob, "tokens_per_class": tokens.tolist(), "argmax_class": argmax}
    return scores, extra


def lape_pairs(
    model: nn.Module,
    batches: PairBatches,
    *,
    components: Sequence[str] = ("neurons",),
    positions: Positions = "all",
    min_prob: float = 0.01,
    progress: bool = False,
) -> MethodOutput:
    """:func:`lape` on contrastive pairs: classes ``"positive"`` and ``"negative"`` (signed score)."""
    classes = {"positive": [p for p, _ in batches], "negative": [n for _, n in batches]}
    return lape(model, classes, components=components, positions=positions, min_prob=min_prob, progress=progress)
