"""What a steering adapter does at one wrapped module (:class:`LayerPlan`), its weight forms for merging, and the
cache of tensors derived from its buffers (:class:`DerivedCache`)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._merge import add_to_bias

# Families whose sublayer outputs pass through a norm before reaching the residual stream: the
# direction must be projected out of that norm's output, and ablation cannot merge into weights.
POST_NORM_WRITERS: dict[str, tuple[str, str]] = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


@dataclass(frozen=True)
class LayerPlan:
    """What one adapter does at one wrapped module."""

    adapter: str
    layer: int  # -1 for an input embedding
    positions: str
    op: str | None = None  # "add"/"clamp" when this layer's output is steered
    alpha: float = 0.0
    value: float | None = None
    ablate: bool = False
    head_scale: bool = False
    neuron_scale: bool = False
    head_steer: bool = False  # head steering (ITI): alpha * sigma * direction added to steered heads
    head_alpha: float = 0.0
    condition: dict[str, Any] | None = None
    is_condition_layer: bool = False

    def merge_error(self, model_type: str, mlp_out_bias: bool = False, attn_out_bias: bool = False) -> str | None:
        """Why this plan cannot be merged into weights (``None`` when it can).

        ``add`` merges into the bias of the layer's MLP output projection, which writes straight into
        the residual stream, so it needs that bias (``mlp_out_bias``) and no norm after the MLP. Head
        steering shifts the input of the attention output projection ``W_o``: it merges into that
        projection's bias (``b += W_o · shift``), so it needs one (``attn_out_bias``).
        """
        if self.op == "add" and (not mlp_out_bias or model_type in POST_NORM_WRITERS):
            return (
                "`op='add'` adds a constant vector to the residual stream, which this model can only hold in the "
                "bias of an MLP output projection that writes straight into the residual stream, and it has none. "
                "Keep the adapter unmerged, or export it for llama.cpp with "
                "`mi_peft.export.to_gguf_control_vector(adapter_dir, 'steer.gguf')`."
            )
        if self.head_steer and not attn_out_bias:
            return (
                "head steering (`head_directions`) adds a constant vector to heads' outputs, the input of the "
                "attention output projection; it merges only into that projection's bias (b += W_o · shift), and "
                "this model's attention output projection has no bias (e.g. Llama's `o_proj`). Keep the adapter "
                "unmerged."
            )
        if self.op == "clamp":
            return "`op='clamp'` sets a projection of the residual stream; it has no weight form. Keep it unmerged."
        if self.condition is not None:
            return "conditional steering decides per prompt at run time; it cannot be merged into weights."
        if self.positions != "all":
            return f"`positions={self.positions!r}` acts on some tokens only; only positions='all' can be merged."
        if self.ablate and model_type in POST_NORM_WRITERS:
            return (
                f"directional ablation cannot merge exactly into {model_type} weights: a norm after each attention/"
                "MLP output re-scales channels before the residual stream. Keep the adapter unmerged."
            )
        return None


def project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x - (x · r) r`` along the last axis (``r`` a unit vector)."""
    r = r.to(x.device, x.dtype)
    return x - (x @ r)[..., None] * r


def _masked(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return new if mask is None else torch.where(mask, new, old)


def _project_weight(r: torch.Tensor, conv1d: bool, rows_are_outputs: bool = True):
    """Merge fn making a module's output orthogonal to ``r``: ``W <- P W``, ``b <- P b`` (computed in float32)."""

    def fn(weight: torch.Tensor, bias: torch.Tensor | None):
        w, rr = weight.float(), r.to(weight.device, torch.float32)
        if conv1d or not rows_are_outputs:  # [in, out] (Conv1D) or [vocab, d_model] (embedding)
            w = w - torch.outer(w @ rr, rr)
        else:  # nn.Linear [out, in]
            w = w - torch.outer(rr, rr @ w)
        b = None if bias is None else (bias.float() - (bias.float() @ rr) * rr).to(bias.dtype)
        return w.to(weight.dtype), b

    return fn


def _scale_weight(scale: torch.Tensor, conv1d: bool):
    """Merge fn multiplying the input features of a projection by ``scale``."""

    def fn(weight: torch.Tensor, bias: torch.Tensor | None):
        s = scale.to(weight.device, torch.float32)
        w = weight.float() * (s[:, None] if conv1d else s[None, :])
        return w.to(weight.dtype), bias

    return fn


def _shift_input(shift: torch.Tensor, conv1d: bool):
    """Merge fn for a constant added to a projection's input: ``b <- b + W shift`` (the weight is kept)."""

    def fn(weight: torch.Tensor, bias: torch.Tensor | None):
        w, d = weight.float(), shift.to(weight.device, torch.float32)
        return add_to_bias(d @ w if conv1d else w @ d)(weight, bias)

    return fn


def head_overlap_error(
    plan: LayerPlan, plans: Mapping[str, LayerPlan], head_stds: Mapping[str, torch.Tensor], head_scales: Mapping
) -> str | None:
    """Why ``plan`` cannot merge beside another adapter of the same layer (``None`` when it can).

    One adapter shifting heads that another adapter scales does not commute: the merged bias would take W_o
    before or after the scaling, whichever merged first. Heads that only one of them touches commute exactly.
    """
    if not (plan.head_steer or plan.head_scale):
        return None
    for other in plans.values():
        if other.adapter == plan.adapter:
            continue
        for shifting, scaling in ((plan, other), (other, plan)):
            if not (shifting.head_steer and scaling.head_scale):
                continue
            both = ((head_stds[shifting.adapter] > 0) & (head_scales[scaling.adapter] != 1)).nonzero().flatten()
            if both.numel():
                return (
                    f"adapter {shifting.adapter!r} steers heads {both.tolist()} of layer {plan.layer} that adapter "
                    f"{scaling.adapter!r} scales; merged weights cannot keep both orders of shifting and scaling. "
                    "Keep one of them unmerged, or put both in one adapter."
                )
    return None


class DerivedCache:
    """Tensors derived from buffers (cast to the activations' dtype, scaled), built once and reused.

    An entry is keyed by name, dtype, device and inference mode, and rebuilt when a source buffer is replaced
    (``.to``, a new adapter) or written in place (its version counter moves, e.g. when a saved adapter's
    state dict is loaded into it). Sources without a version counter (inference tensors) are never cached.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[tuple[torch.Tensor, ...], tuple[int, ...], torch.Tensor]] = {}

    def get(
        self,
        name: tuple,
        like: torch.Tensor,
        sources: tuple[torch.Tensor, ...],
        build: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``build(like)``, from the cache while ``sources`` are unchanged."""
        key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
        try:
            versions = tuple([s._version for s in sources])
        except RuntimeError:  # inference tensors have no version counter
            return build(like)
        hit = self.entries.get(key)
        if hit is not None and hit[1] == versions and all(map(operator.is_, hit[0], sources)):
            return hit[2]
        value = build(like)
        self.entries[key] = (sources, versions, value)
        return value

    def clear(self) -> None:
        self.entries.clear()
