"""Causal methods: exact activation patching and ablation, batched over components.

Patching or ablating one component is one forward pass per component. Two things make that cheap:

- **batching over components**: the run is replicated ``K`` times along the batch axis and replica
  ``j`` gets component ``j`` patched (a per-row mask inside one ``capture.edit`` hook per layer), so
  ``K`` components cost one forward; ``max_batch`` bounds the rows of one forward.
- **prefix reuse** (``reuse_prefix=True``): a patch at token ``t`` cannot change tokens before ``t``
  (causal attention), so the tokens before the first patched position run once into a KV cache and
  only the remaining tokens are recomputed per chunk. With ``positions="last"`` that is one token.

Both are exact: the scores equal one-component-at-a-time patching up to float rounding.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import capture
from ..arch import ArchSpec, spec_for
from ..metrics import Metric
from .gradient import LogitsPlan
from .magnitude import (
    KINDS,
    MODEL_INPUTS,
    Batch,
    MethodOutput,
    PairBatches,
    Positions,
    _bar,
    collect,
    eval_mode,
    mean_activations,
    model_device,
    n_components,
    per_layer,
    position_index,
    run_model,
    to_device,
    unflatten,
)
from .probes import probe  # noqa: F401  (the probe method lives in probes.py; `locate` lists it here)

Source = Callable[[Tensor, Tensor], Tensor]  # (batch rows [n], flat components [n]) -> values [n, k, D]


class _SplitRun:
    """One batch split at token ``p0``: the prefix runs once into a KV cache, the suffix per chunk."""

    def __init__(self, model: nn.Module, batch: Batch, idx: Tensor, plan: LogitsPlan, reuse_prefix: bool) -> None:
        self.model, self.plan, self.batch = model, plan, batch
        self.p0 = int(idx.min()) if reuse_prefix else 0
        self.rel = idx - self.p0  # patched positions inside the suffix, [B, k]
        self.cache, self.prefix_logits = None, None
        if self.p0 > 0:
            prefix = {k: batch[k][:, : self.p0] for k in MODEL_INPUTS if k in batch}
            with torch.no_grad():
                out = run_model(model, prefix, use_cache=True, **plan.kwargs())
            self.cache = out["cache"] if "cache" in out else out["past_key_values"]
            if not plan.last_only:
                self.prefix_logits = out.logits
        self.suffix = {k: batch[k][:, self.p0 :] for k in ("input_ids", "position_ids") if k in batch}
        self.suffix["attention_mask"] = batch["attention_mask"]
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def metric(self, repeats: int) -> Tensor:
        """Metric of the (hooked) run with every row repeated ``repeats`` times (row ``b * repeats + j``)."""
        inputs = {k: v.repeat_interleave(repeats, 0) for k, v in self.suffix.items()}
        kwargs: dict[str, Any] = dict(self.plan.kwargs())
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            if repeats > 1:
                cache.batch_repeat_interleave(repeats)
            kwargs.update({self.cache_arg: cache, "use_cache": True})
        with torch.no_grad():
            logits = self.model(**inputs, **kwargs).logits
        if self.prefix_logits is not None:
            logits = torch.cat([self.prefix_logits.repeat_interleave(repeats, 0), logits], 1)
        batch = {k: v.repeat_interleave(repeats, 0) if isinstance(v, Tensor) else v for k, v in self.batch.items()}
        return self.plan.score(logits, batch).double()


def _edit_fn(kind: str, rows: Tensor, rel: Tensor, within: Tensor, values: Tensor) -> Callable[[Tensor], Tensor]:
    """Set component ``within[i]`` of row ``rows[i]`` at suffix positions ``rel[i]`` to ``values[i]``."""

    def fn(x: Tensor) -> Tensor:
        r, p, w = rows.to(x.device)[:, None], rel.to(x.device), within.to(x.device)[:, None]
        v = values.to(x.device, x.dtype)
        if kind == "heads":  # x [R, s, n_heads, d_head]
            return x.index_put((r, p, w), v)
        if kind == "neurons":  # x [R, s, d_mlp]
            return x.index_put((r, p, w), v[..., 0])
        return x.index_put((r, p), v)  # residual x [R, s, d_model]

    return fn


def _sweep(
    spec: ArchSpec, run: _SplitRun, kind: str, comps: Tensor, source: Source, clean: Tensor, max_batch: int, bar: Any
) -> Tensor:
    """Effects ``metric(hooked) - metric(clean)`` per row and component: ``[B, len(comps)]``."""
    b = clean.shape[0]
    size = per_layer(spec, kind)
    chunk_size = max(1, max_batch // b)
    effects = []
    for chunk in comps.split(chunk_size):
        k_c = len(chunk)
        rel = run.rel.repeat_interleave(k_c, 0)
        layer_of, within = chunk // size, chunk % size
        fns = {}
        for layer in layer_of.unique().tolist():
            js = (layer_of == layer).nonzero()[:, 0]
            rows = (torch.arange(b)[:, None] * k_c + js[None, :]).reshape(-1)
            b_rows = torch.arange(b).repeat_interleave(len(js))
            values = source(b_rows, chunk[js].repeat(b))
            fns[int(layer)] = _edit_fn(kind, rows, rel[rows.to(rel.device)], within[js].repeat(b), values)
        with capture.edit(run.model, **{kind: fns}):
            value = run.metric(k_c).view(b, k_c)
        effects.append((value - clean[:, None]).cpu())
        bar.update(1)
    return torch.cat(effects, 1)


def _targets(
    spec: ArchSpec, components: Sequence[str], neuron_sample: int | None, seed: int
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Flat component indices to score per kind; neurons optionally a random sample."""
    targets = {k: torch.arange(n_components(spec, k)) for k in components}
    extra: dict[str, Any] = {}
    if "neurons" in components and neuron_sample is not None:
        total = n_components(spec, "neurons")
        if isinstance(neuron_sample, bool) or not isinstance(neuron_sample, int) or neuron_sample < 1:
            raise ValueError(f"`neuron_sample` must be a positive int or None, got {neuron_sample!r}.")
        if neuron_sample < total:
            gen = torch.Generator().manual_seed(seed)
            targets["neurons"] = torch.randperm(total, generator=gen)[:neuron_sample].sort().values
            extra["neuron_sample"] = {"n": neuron_sample, "seed": seed, "of": total, "unsampled": "NaN"}
    return targets, extra


def _check_max_batch(max_batch: int) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"`max_batch` must be a positive int (rows per forward pass), got {max_batch!r}.")


def _n_chunks(batches: PairBatches, targets: dict[str, Tensor], max_batch: int) -> int:
    total = 0
    for pos, _ in batches:
        chunk = max(1, max_batch // pos["input_ids"].shape[0])
        total += sum(math.ceil(len(t) / chunk) for t in targets.values())
    return total


def _finish(spec: ArchSpec, targets: dict[str, Tensor], totals: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    scores = {}
    for kind, comps in targets.items():
        flat = torch.full((n_components(spec, kind),), float("nan"), dtype=torch.float64)
        flat[comps] = totals[kind] / n
        scores[kind] = unflatten(spec, kind, flat)
    return scores


def activation_patching(
    model: nn.Module,
    batches: PairBatches,
    *,
    metric: Metric,
    components: Sequence[str] = KINDS,
    positions: Positions = "last",
    max_batch: int = 128,
    neuron_sample: int | None = None,
    seed: int = 0,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> MethodOutput:
    """Score = mean over pairs of ``metric(negative, component <- positive value) - metric(negative)``.

    Every component is patched exactly, at ``positions``, from the positive run of its pair.
    ``neuron_sample`` scores a random sample of neurons (seeded by ``seed``); the rest are NaN.
    """
    _check_max_batch(max_batch)
    spec = spec_for(model)
    targets, extra = _targets(spec, components, neuron_sample, seed)
    plan = LogitsPlan(model, metric)
    totals = {k: torch.zeros(len(t), dtype=torch.float64) for k, t in targets.items()}
    n, pos_sum, neg_sum = 0, 0.0, 0.0
    device = model_device(model)
    with eval_mode(model), _bar(_n_chunks(batches, targets, max_batch), progress, "activation_patching") as bar:
        for pos, neg in batches:
            pos, neg = to_device(pos, device), to_device(neg, device)
            neg_idx = position_index(positions, neg["attention_mask"])
            a_pos, _, out = collect(model, pos, components, positions, **plan.kwargs())
            plan.observe(out.logits, pos)
            pos_sum += float(plan.score(out.logits, pos).sum())
            if a_pos[components[0]].shape[1] != neg_idx.shape[1]:
                raise ValueError(
                    f"positions={positions!r} select a different number of positive and negative tokens; "
                    "patching needs the same number: use 'last' or negative indices such as [-2, -1]."
                )
            run = _SplitRun(model, neg, neg_idx, plan, reuse_prefix)
            clean = run.metric(1)
            for kind, comps in targets.items():
                src = a_pos[kind]

                def source(b_rows: Tensor, flat: Tensor, src: Tensor = src) -> Tensor:
                    return src[b_rows.to(src.device), :, flat.to(src.device)]

                totals[kind] += _sweep(spec, run, kind, comps, source, clean, max_batch, bar).sum(0).double()
            n += clean.shape[0]
            neg_sum += float(clean.sum())
    extra.update(metric_positive=pos_sum / n, metric_negative=neg_sum / n, reuse_prefix=reuse_prefix)
    return _finish(spec, targets, totals, n), extra


def ablation(
    model: nn.Module,
    batches: PairBatches,
    *,
    metric: Metric,
    components: Sequence[str] = KINDS,
    positions: Positions = "last",
    mode: Literal["zero", "mean"] = "zero",
    max_batch: int = 128,
    neuron_sample: int | None = None,
    seed: int = 0,
    reuse_prefix: bool = True,
    progress: bool = False,
) -> MethodOutput:
    """Score = mean over positive prompts of ``metric(ablated) - metric(clean)``.

    ``mode="zero"`` sets the component to 0, ``mode="mean"`` to its mean over all prompts (positive
    and negative) at ``positions``. Negative scores mark components the behaviour depends on.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"`mode` must be 'zero' or 'mean', got {mode!r}.")
    _check_max_batch(max_batch)
    spec = spec_for(model)
    targets, extra = _targets(spec, components, neuron_sample, seed)
    device = model_device(model)
    plan = LogitsPlan(model, metric)
    with eval_mode(model):
        means = mean_activations(model, batches, components, positions) if mode == "mean" else None
        first = to_device(batches[0][0], device)
        with torch.no_grad():
            plan.observe(run_model(model, first).logits, first)
    totals = {k: torch.zeros(len(t), dtype=torch.float64) for k, t in targets.items()}
    n, clean_sum = 0, 0.0
    with eval_mode(model), _bar(_n_chunks(batches, targets, max_batch), progress, "ablation") as bar:
        for pos, _ in batches:
            pos = to_device(pos, device)
            idx = position_index(positions, pos["attention_mask"])
            run = _SplitRun(model, pos, idx, plan, reuse_prefix)
            clean = run.metric(1)
            for kind, comps in targets.items():
                width = means[kind].shape[-1] if means is not None else _width(spec, kind)

                def source(b_rows: Tensor, flat: Tensor, kind: str = kind, width: int = width, k: int = idx.shape[1]):
                    if means is None:
                        return torch.zeros(len(flat), k, width)
                    return means[kind][flat].unsqueeze(1).expand(-1, k, -1)

                totals[kind] += _sweep(spec, run, kind, comps, source, clean, max_batch, bar).sum(0).double()
            n += clean.shape[0]
            clean_sum += float(clean.sum())
    extra.update(mode=mode, metric_positive=clean_sum / n, reuse_prefix=reuse_prefix)
    return _finish(spec, targets, totals, n), extra


def _width(spec: ArchSpec, kind: str) -> int:
    return {"heads": spec.head_dim, "neurons": 1, "residual": spec.d_model}[kind]
