"""Where the capture hook points live and how hooks attach to them (used by :mod:`mi_peft.capture`).

Position selection (``"last"`` real token, ``"all"``, explicit indices), gathering and scattering rows at
those positions, the module behind each hook point, and hook registration that returns new tensors
instead of writing into a module's output in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .arch import ArchSpec

Positions = Union[Literal["last", "all", "mean"], Sequence[int], torch.Tensor]
LayerSel = Union[bool, Iterable[int], None]


def selected_layers(spec: ArchSpec, sel: LayerSel) -> list[int]:
    """Layers named by ``sel``: none (None/False), all (True) or the given indices, checked against ``spec``."""
    if sel is None or sel is False:
        return []
    if sel is True:
        return list(range(spec.n_layers))
    layers = sorted({int(i) for i in sel})
    for layer in layers:
        spec.check_layer(layer)
    return layers


def position_index(x: torch.Tensor, positions: Positions, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row position indices ``[batch, k]`` for ``x`` ``[batch, pos, ...]``; None means all."""
    batch, seq = x.shape[0], x.shape[1]
    if isinstance(positions, str):
        if positions == "all":
            return None
        if positions == "last":
            if attention_mask is None:
                return torch.full((batch, 1), seq - 1, device=x.device)
            mask = check_mask(attention_mask, x)
            ar = torch.arange(seq, device=x.device)
            return (mask * ar).argmax(-1, keepdim=True)
        raise ValueError(f"`positions` must be 'last', 'all', 'mean' or a list of indices, got {positions!r}.")
    idx = torch.as_tensor(positions, dtype=torch.long, device=x.device)
    if idx.numel() == 0:
        raise ValueError(f"empty position set: pass at least one position in 0..{seq - 1} (or 'last'/'all'/'mean').")
    if idx.min() < -seq or idx.max() >= seq:
        raise ValueError(f"position index out of range: sequence has positions 0..{seq - 1} (or -{seq}..-1).")
    idx = idx % seq
    return idx.expand(batch, -1) if idx.dim() == 1 else idx


def check_mask(attention_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if attention_mask.shape != x.shape[:2]:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match the hooked sequence "
            f"{tuple(x.shape[:2])}; pass the mask of the batch you run."
        )
    return attention_mask.to(x.device, x.dtype if x.is_floating_point() else torch.float32)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, idx]


def scatter(x: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return values
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
    return x.index_put((rows, idx), values.to(x.dtype))


def squeeze_single(values: torch.Tensor, positions: Positions) -> torch.Tensor:
    return values[:, 0] if isinstance(positions, str) and positions == "last" else values


def unsqueeze_single(values: torch.Tensor, positions: Positions) -> torch.Tensor:
    return values[:, None] if isinstance(positions, str) and positions == "last" else values


def site_module(model: nn.Module, spec: ArchSpec, kind: str, layer: int) -> nn.Module:
    if kind == "heads":
        return spec.attn_out_module(model, layer)
    if kind == "neurons":
        return spec.mlp_out_module(model, layer)
    return spec.decoder_layers(model)[layer]


def view_site(kind: str, spec: ArchSpec, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (spec.n_heads, spec.head_dim)) if kind == "heads" else x


def unview_site(kind: str, x: torch.Tensor) -> torch.Tensor:
    return x.flatten(-2) if kind == "heads" else x


def register_site_hook(
    module: nn.Module, kind: str, transform: Callable[[torch.Tensor], torch.Tensor]
) -> RemovableHandle:
    """Hook ``module`` so that ``transform`` maps the site tensor to its replacement."""
    if kind == "residual":

        def post_hook(_mod, _args, output):
            if isinstance(output, tuple):
                return (transform(output[0]), *output[1:])
            return transform(output)

        return module.register_forward_hook(post_hook)

    def pre_hook(_mod, args, kwargs):
        if args:
            return (transform(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: transform(kwargs[key])}

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextmanager
def hooked(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
