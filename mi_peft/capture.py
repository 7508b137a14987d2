"""Read, patch, ablate and scale heads, neurons and the residual stream with forward hooks.

Three hook points per decoder layer, named as in TransformerLens:

- ``hook_z`` — per-head outputs, the input of the attention output projection,
  viewed as ``[batch, pos, n_heads, d_head]``;
- ``hook_post`` — MLP neuron activations, the input of the MLP output projection, ``[batch, pos, d_mlp]``;
- ``hook_resid_post`` — the decoder layer output, ``[batch, pos, d_model]``.

Every context manager removes its hooks in ``finally``; hooks return new tensors and never
write into a module's output in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .arch import ArchSpec, spec_for
from .capture_sites import (
    LayerSel,
    Positions,
    check_mask,
    gather,
    hooked,
    position_index,
    register_site_hook,
    scatter,
    selected_layers,
    site_module,
    squeeze_single,
    unsqueeze_single,
    unview_site,
    view_site,
)

Kind = Literal["heads", "neurons", "residual"]
KINDS: tuple[str, ...] = ("heads", "neurons", "residual")
EditFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ActivationCache:
    """Activations captured in one forward pass, per kind and layer.

    Shapes for ``positions="last"`` or ``"mean"``: heads ``[batch, n_heads, d_head]``, neurons
    ``[batch, d_mlp]``, residual ``[batch, d_model]``. For ``"all"`` or an index list a position
    axis follows the batch axis.
    """

    positions: Positions
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    residual: dict[int, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> dict[int, torch.Tensor]:
        if kind not in KINDS:
            raise KeyError(f"unknown kind {kind!r}; expected one of {KINDS}.")
        return getattr(self, kind)

    def stack(self, kind: str) -> torch.Tensor:
        """All captured layers of ``kind`` stacked on a new axis 1 (ordered by layer)."""
        by_layer = self[kind]
        if not by_layer:
            raise ValueError(f"nothing of kind {kind!r} was captured; pass `{kind}=True` to `record`.")
        return torch.stack([by_layer[k] for k in sorted(by_layer)], dim=1)


# ---- public API ---------------------------------------------------------------------------


@contextmanager
def record(
    model: nn.Module,
    *,
    heads: LayerSel = None,
    neurons: LayerSel = None,
    residual: LayerSel = None,
    positions: Positions = "last",
    attention_mask: torch.Tensor | None = None,
    detach: bool = True,
) -> Iterator[ActivationCache]:
    """Capture heads, neurons and/or residual stream of chosen layers in one forward pass.

    Args:
        heads, neurons, residual: ``True`` for every layer, or an iterable of layer indices.
        positions: ``"last"`` (last non-padding token when ``attention_mask`` is given),
            ``"all"``, ``"mean"`` (mean over non-padding tokens) or explicit indices.
        attention_mask: mask of the batch that will run; needed for padded batches.
        detach: ``False`` keeps captured tensors in the autograd graph, so that
            ``torch.autograd.grad(metric, cache.heads[l])`` gives the gradient at the captured
            positions (the forward pass then routes those positions through the cached tensor).

    Example:
        >>> with record(model, heads=True, positions="last", attention_mask=mask) as cache:
        ...     model(input_ids=ids, attention_mask=mask)
        >>> cache.stack("heads").shape  # [batch, n_layers, n_heads, d_head]
    """
    spec = spec_for(model)
    if not detach and isinstance(positions, str) and positions == "mean":
        raise ValueError("`detach=False` needs concrete positions ('last', 'all' or indices), not 'mean'.")
    cache = ActivationCache(positions=positions)
    handles: list[RemovableHandle] = []

    def make(kind: str, layer: int):
        def transform(x: torch.Tensor) -> torch.Tensor:
            v = view_site(kind, spec, x)
            if isinstance(positions, str) and positions == "mean":
                if attention_mask is None:
                    cache[kind][layer] = v.mean(1).detach()
                else:
                    m = check_mask(attention_mask, v)
                    m = m.reshape(*m.shape, *([1] * (v.dim() - 2)))
                    cache[kind][layer] = ((v * m).sum(1) / m.sum(1).clamp_min(1)).detach()
                return x
            idx = position_index(v, positions, attention_mask)
            picked = v if idx is None else gather(v, idx)
            if detach:
                cache[kind][layer] = squeeze_single(picked, positions).detach()
                return x
            # The cached tensor itself must feed the rest of the forward pass for its gradient to exist.
            core = squeeze_single(picked, positions)
            if not core.requires_grad:
                core = core.detach().requires_grad_(True)
            cache[kind][layer] = core
            return unview_site(kind, scatter(v, idx, unsqueeze_single(core, positions)))

        return transform

    for kind, sel in (("heads", heads), ("neurons", neurons), ("residual", residual)):
        for layer in selected_layers(spec, sel):
            handles.append(register_site_hook(site_module(model, spec, kind, layer), kind, make(kind, layer)))
    with hooked(handles):
        yield cache


@contextmanager
def edit(
    model: nn.Module,
    *,
    heads: Mapping[int, EditFn] | None = None,
    neurons: Mapping[int, EditFn] | None = None,
    residual: Mapping[int, EditFn] | None = None,
) -> Iterator[None]:
    """Replace activations with ``fn(activation)`` per layer, for arbitrary interventions.

    ``fn`` receives heads as ``[batch, pos, n_heads, d_head]``, neurons as ``[batch, pos, d_mlp]``
    and the residual stream as ``[batch, pos, d_model]``, and must return a tensor of the same shape.
    """
    spec = spec_for(model)
    handles: list[RemovableHandle] = []
    for kind, fns in (("heads", heads), ("neurons", neurons), ("residual", residual)):
        for layer, fn in (fns or {}).items():
            spec.check_layer(layer)

            def transform(x, kind=kind, fn=fn):
                return unview_site(kind, fn(view_site(kind, spec, x)))

            handles.append(register_site_hook(site_module(model, spec, kind, layer), kind, transform))
    with hooked(handles):
        yield


def _check_indices(spec: ArchSpec, kind: str, layer: int, indices: Iterable[int]) -> list[int]:
    spec.check_layer(layer)
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError(f"empty {kind} selection for layer {layer}; pass at least one index.")
    check = spec.check_head if kind == "heads" else spec.check_neuron
    for i in idx:
        check(i)
    return idx


def _component_axis(kind: str) -> Callable[[torch.Tensor, list[int]], tuple]:
    # heads: [b, pos, H, D] -> index axis -2; neurons: [b, pos, N] -> axis -1
    if kind == "heads":
        return lambda x, idx: (Ellipsis, idx, slice(None))
    return lambda x, idx: (Ellipsis, idx)


def _positional(
    positions: Positions, attention_mask: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]
) -> EditFn:
    """Apply ``fn`` only at ``positions`` (``fn`` sees ``[batch, k, ...]``)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        if isinstance(positions, str) and positions == "mean":
            raise ValueError("interventions need concrete positions ('last', 'all' or indices), not 'mean'.")
        idx = position_index(x, positions, attention_mask)
        if idx is None:
            return fn(x)
        return scatter(x, idx, fn(gather(x, idx)))

    return apply


@contextmanager
def ablate(
    model: nn.Module,
    *,
    heads: Mapping[int, Iterable[int]] | None = None,
    neurons: Mapping[int, Iterable[int]] | None = None,
    mode: Literal["zero", "mean"] = "zero",
    means: ActivationCache | None = None,
    positions: Positions = "all",
    attention_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Zero- or mean-ablate heads/neurons (``{layer: [indices]}``).

    For ``mode="mean"`` pass ``means``: a cache whose per-layer tensors are averaged over the
    batch (and over positions, if it kept them) to give each component's mean activation.
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"`mode` must be 'zero' or 'mean', got {mode!r}.")
    if mode == "mean" and means is None:
        raise ValueError("`mode='mean'` needs `means=`: a cache recorded on reference inputs.")
    spec = spec_for(model)
    fns: dict[str, dict[int, EditFn]] = {"heads": {}, "neurons": {}}
    for kind, sel in (("heads", heads), ("neurons", neurons)):
        where = _component_axis(kind)
        for layer, indices in (sel or {}).items():
            idx = _check_indices(spec, kind, layer, indices)
            if mode == "mean":
                ref = means[kind].get(layer) if means is not None else None
                if ref is None:
                    raise ValueError(f"`means` has no {kind} for layer {layer}; record them with `{kind}=True`.")
                dims = ref.dim() - (2 if kind == "heads" else 1)
                fill = ref.mean(dim=tuple(range(dims))) if dims > 0 else ref
            else:
                fill = None

            def fn(x, idx=idx, where=where, fill=fill):
                out = x.clone()
                out[where(x, idx)] = 0.0 if fill is None else fill[idx].to(x.dtype)
                return out

            fns[kind][layer] = _positional(positions, attention_mask, fn)
    with edit(model, heads=fns["heads"], neurons=fns["neurons"]):
        yield


@contextmanager
def scale(
    model: nn.Module,
    *,
    heads: Mapping[int, Mapping[int, float]] | None = None,
    neurons: Mapping[int, Mapping[int, float]] | None = None,
    positions: Positions = "all",
    attention_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Multiply heads/neurons by factors: ``{layer: {index: factor}}`` (0 ablates, >1 amplifies)."""
    spec = spec_for(model)
    fns: dict[str, dict[int, EditFn]] = {"heads": {}, "neurons": {}}
    for kind, sel in (("heads", heads), ("neurons", neurons)):
        size = spec.n_heads if kind == "heads" else spec.n_neurons
        for layer, factors in (sel or {}).items():
            idx = _check_indices(spec, kind, layer, factors.keys())
            vec = torch.ones(size)
            vec[idx] = torch.tensor([float(factors[i]) for i in idx])
            if not torch.isfinite(vec).all():
                raise ValueError(f"scale factors for {kind} in layer {layer} must be finite, got {dict(factors)}.")

            def fn(x, vec=vec, kind=kind):
                v = vec.to(x.device, x.dtype)
                return x * (v[:, None] if kind == "heads" else v)

            fns[kind][layer] = _positional(positions, attention_mask, fn)
    with edit(model, heads=fns["heads"], neurons=fns["neurons"]):
        yield


@contextmanager
def patch(
    model: nn.Module,
    source: ActivationCache,
    *,
    heads: Mapping[int, Iterable[int]] | None = None,
    neurons: Mapping[int, Iterable[int]] | None = None,
    residual: Iterable[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Overwrite components with values recorded in ``source`` (at ``source.positions``).

    ``heads``/``neurons`` are ``{layer: [indices]}``; ``residual`` is a list of layers.
    The running batch must match the recorded one in size (and in length for ``"all"``).
    """
    spec = spec_for(model)
    if isinstance(source.positions, str) and source.positions == "mean":
        raise ValueError("cannot patch from a cache recorded with positions='mean'; record 'last', 'all' or indices.")
    fns: dict[str, dict[int, EditFn]] = {"heads": {}, "neurons": {}, "residual": {}}

    def stored(kind: str, layer: int) -> torch.Tensor:
        value = source[kind].get(layer)
        if value is None:
            raise ValueError(f"`source` has no {kind} for layer {layer}; record them before patching.")
        return unsqueeze_single(value.detach(), source.positions)

    for kind, sel in (("heads", heads), ("neurons", neurons)):
        where = _component_axis(kind)
        for layer, indices in (sel or {}).items():
            idx = _check_indices(spec, kind, layer, indices)
            value = stored(kind, layer)

            def fn(x, idx=idx, where=where, value=value):
                if value.shape[:2] != x.shape[:2]:
                    raise ValueError(f"patch source shape {tuple(value.shape)} does not match batch {tuple(x.shape)}.")
                out = x.clone()
                out[where(x, idx)] = value.to(x.device, x.dtype)[where(value, idx)]
                return out

            fns[kind][layer] = _positional(source.positions, attention_mask, fn)
    for layer in residual or []:
        spec.check_layer(int(layer))
        value = stored("residual", int(layer))
        fns["residual"][int(layer)] = _positional(
            source.positions, attention_mask, lambda x, v=value: v.to(x.device, x.dtype)
        )
    with edit(model, **fns):
        yield
