"""Tuner layers of the steering adapter: a wrapped decoder layer and a wrapped input embedding.

A wrapped decoder layer edits its output (the residual stream after the layer) for ``add`` and
``clamp``, reads it for a condition, and, for the duration of its own forward only, hooks its
attention/MLP output projections to scale heads/neurons and shift steered heads (their inputs)
and to project the ablated direction out of what they write to the residual stream. Hooks are registered and
removed inside each forward, so nothing outlives the wrapper and copies of the model stay
independent. Which tokens are prompt or generated comes from a :class:`SteeringState` shared by
all layers of one adapter model (see :mod:`.model`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...arch import ArchSpec, _get
from .._merge import add_to_bias
from .condition import condition_scores, decide
from .plan import (
    POST_NORM_WRITERS,
    DerivedCache,
    LayerPlan,
    _masked,
    _project_weight,
    _scale_weight,
    _shift_input,
    head_overlap_error,
    project_out,
)
from .state import Mask, SteeringState


class SteeringTunerLayer(BaseTunerLayer):
    """State shared by both steering layer types: per-adapter plans, directions and merge backups."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names = (
        "steer_plan",
        "steer_direction",
        "steer_condition",
        "steer_head_scale",
        "steer_neuron_scale",
        "steer_head_direction",
        "steer_head_std",
    )

    def _init_steering(self, base_layer: nn.Module, spec: ArchSpec, state: SteeringState) -> None:
        self.base_layer = base_layer
        self.steer_spec = spec
        self.steer_state = state
        self.steer_plan: dict[str, LayerPlan] = {}
        self.steer_direction = BufferDict({}, persistent=True)
        self.steer_condition = BufferDict({}, persistent=True)
        self.steer_head_scale = BufferDict({}, persistent=False)
        self.steer_neuron_scale = BufferDict({}, persistent=False)
        self.steer_head_direction = BufferDict({}, persistent=True)  # [n_heads, head_dim], zeros if not steered
        self.steer_head_std = BufferDict({}, persistent=False)  # [n_heads] sigma from the config, 0 if not steered
        self.steer_cache = DerivedCache()  # cast and scaled vectors, rebuilt when a source buffer changes
        self.steer_backup: dict[str, list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]]] = {}
        self.steer_checked: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    def _get_available_adapters(self) -> set[str]:
        return set(self.steer_plan)

    def _runtime_plans(self) -> list[LayerPlan]:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        plans = [
            self.steer_plan[a] for a in self.active_adapters if a in self.steer_plan and a not in self.merged_adapters
        ]
        for plan in plans:
            if plan.adapter not in self.steer_checked:
                self._check_loaded(plan)
        return plans

    def _check_loaded(self, plan: LayerPlan) -> None:
        """A direction that is still all zeros was never given (nor loaded): refuse instead of doing nothing."""
        missing = (plan.op is not None or plan.ablate) and not bool(self.steer_direction[plan.adapter].any())
        missing = missing or (plan.head_steer and not bool(self.steer_head_direction[plan.adapter].any()))
        if missing or (plan.is_condition_layer and not bool(self.steer_condition[plan.adapter].any())):
            raise ValueError(
                f"steering adapter {plan.adapter!r} has no direction at layer {plan.layer}: build its config with "
                "`SteeringConfig.from_directions(...)` (heads: `head_directions=` or `SteeringConfig.from_head_probes`) "
                "or load a saved adapter with `PeftModel.from_pretrained`."
            )
        self.steer_checked.add(plan.adapter)

    def _cached(self, name: str, adapter: str, like: torch.Tensor, sources: tuple, build: Callable) -> torch.Tensor:
        """``build(like)``, derived from ``sources`` for inputs like ``like``, built once (see :class:`DerivedCache`)."""
        return self.steer_cache.get((name, adapter), like, sources, build)

    def _store_direction(self, adapter: str, vector: torch.Tensor | None, d_model: int) -> None:
        """Keep the unit direction (zeros until a saved adapter's state dict is loaded into it)."""
        value = torch.zeros(d_model) if vector is None else vector.detach().to("cpu", torch.float32)
        self.steer_direction[adapter] = value.to(self.steer_device)

    @property
    def steer_device(self) -> torch.device:
        return next(self.base_layer.parameters()).device

    def merge_error(self, plan: LayerPlan) -> str | None:
        """Why ``plan`` cannot merge into this module's weights (``None`` when it can)."""
        return plan.merge_error(self.steer_spec.model_type)

    def _plans_to_merge(self, adapter_names: list[str] | None) -> Iterator[tuple[str, LayerPlan]]:
        """``(adapter, plan)`` of each adapter to merge here; a plan that cannot merge raises its reason."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            plan = self.steer_plan.get(adapter)
            if plan is None:
                continue
            error = self.merge_error(plan)
            if error:
                raise ValueError(error)
            yield adapter, plan

    def _merge_modules(self, adapter: str, edits: list[tuple[nn.Module, Any]], safe_merge: bool) -> None:
        """Apply ``fn(weight, bias) -> (weight, bias)`` to each module, keeping the originals to unmerge exactly.

        Every new tensor is computed first (edits of one module chain); the modules change only when all
        of them succeeded, so an error (NaN with ``safe_merge``, a quantized weight) changes nothing.
        """
        pending: dict[int, list[Any]] = {}  # id(module) -> [module, new weight, new bias]
        for module, fn in edits:
            weight, bias = module.weight, getattr(module, "bias", None)
            if not weight.dtype.is_floating_point:
                raise ValueError(f"cannot merge into quantized weights of {type(module).__name__}; keep it unmerged.")
            slot = pending.setdefault(id(module), [module, weight.data, None if bias is None else bias.data])
            slot[1], slot[2] = fn(slot[1], slot[2])  # new tensors; originals intact
            if safe_merge and not (
                torch.isfinite(slot[1]).all() and (slot[2] is None or torch.isfinite(slot[2]).all())
            ):
                raise ValueError(f"NaNs detected while merging steering adapter {adapter!r}; it seems to be broken.")
        backup = []
        for module, new_w, new_b in pending.values():
            bias = getattr(module, "bias", None)
            backup.append((module, module.weight.data, None if bias is None else bias.data))
            module.weight.data = new_w
            if bias is not None:
                bias.data = new_b
        self.steer_backup[adapter] = backup
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            backup = self.steer_backup.pop(adapter, None)
            if backup is None:
                raise ValueError(f"adapter {adapter!r} was merged without a backup (merge_and_unload); cannot unmerge.")
            for module, weight, bias in reversed(backup):
                module.weight.data = weight
                if bias is not None:
                    module.bias.data = bias


class _SteeringModule(nn.Module, SteeringTunerLayer):
    """Construction and repr shared by the wrapped decoder layers and input embeddings."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, spec: ArchSpec, state: SteeringState, **plan):
        super().__init__()
        self._init_steering(base_layer, spec, state)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **plan)

    def __repr__(self) -> str:
        return "steering." + super().__repr__()


class SteeringLayer(_SteeringModule):
    """A decoder layer with steering: edits ``hook_resid_post`` and, inside its forward, its output projections."""

    def update_layer(
        self,
        adapter_name: str,
        plan: LayerPlan,
        direction: torch.Tensor | None = None,
        condition_direction: torch.Tensor | None = None,
        head_factors: dict[int, float] | None = None,
        neuron_factors: dict[int, float] | None = None,
        head_vectors: dict[int, torch.Tensor] | None = None,
        head_stds: dict[int, float] | None = None,
    ) -> None:
        spec = self.steer_spec
        self.steer_plan[adapter_name] = plan
        self.steer_checked.discard(adapter_name)
        self.steer_cache.clear()
        if plan.op is not None or plan.ablate:
            self._store_direction(adapter_name, direction, spec.d_model)
        if plan.is_condition_layer:
            value = torch.zeros(spec.d_model) if condition_direction is None else condition_direction.float()
            self.steer_condition[adapter_name] = value.to(self.steer_device)
        for factors, size, store in (
            (head_factors, spec.n_heads, self.steer_head_scale),
            (neuron_factors, spec.n_neurons, self.steer_neuron_scale),
        ):
            if factors:
                vec = torch.ones(size)
                vec[torch.tensor(list(factors))] = torch.tensor(list(factors.values()), dtype=torch.float32)
                store[adapter_name] = vec.to(self.steer_device)
        if plan.head_steer:
            # Unit directions stay zeros until a saved adapter's state dict is loaded into them.
            units, sigma = torch.zeros(spec.n_heads, spec.head_dim), torch.zeros(spec.n_heads)
            for head, value in (head_stds or {}).items():
                sigma[head] = value
            for head, vector in (head_vectors or {}).items():
                units[head] = vector.detach().to("cpu", torch.float32)
            self.steer_head_direction[adapter_name] = units.to(self.steer_device)
            self.steer_head_std[adapter_name] = sigma.to(self.steer_device)
        self.set_adapter(self.active_adapters)

    def _module(self, kind: str, writer: bool) -> nn.Module:
        spec, base = self.steer_spec, self.base_layer
        if writer and spec.model_type in POST_NORM_WRITERS:
            return _get(base, POST_NORM_WRITERS[spec.model_type][0 if kind == "attn" else 1])
        return _get(base, spec.attn_out if kind == "attn" else spec.mlp_out)

    def _input_scale(self, kind: str, adapter: str) -> torch.Tensor:
        """Per input feature of the output projection: head factors repeated d_head times, or neuron factors."""
        if kind == "attn":
            return self.steer_head_scale[adapter].repeat_interleave(self.steer_spec.head_dim)
        return self.steer_neuron_scale[adapter]

    def _head_shift(self, plan: LayerPlan) -> torch.Tensor:
        """Head steering's shift of the attention output projection's input: ``alpha * sigma_h * u_h`` per head,
        ``[n_heads * head_dim]`` float32 (zeros for heads that are not steered)."""
        units, sigma = self.steer_head_direction[plan.adapter].float(), self.steer_head_std[plan.adapter].float()
        return (plan.head_alpha * sigma[:, None] * units).flatten()

    @contextmanager
    def _writer_hooks(self, plans: list[LayerPlan]) -> Iterator[None]:
        state, handles = self.steer_state, []

        def input_hook(kind: str, chosen: list[LayerPlan]):
            flag = "head_scale" if kind == "attn" else "neuron_scale"

            def hook(_mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                for p in chosen:
                    mask = state.steer_mask(p, x.shape[0], x.shape[1], x.device)
                    if mask is False:
                        continue
                    if getattr(p, flag):
                        scale = self._cached(
                            f"{kind}_scale",
                            p.adapter,
                            x,
                            (self.steer_head_scale if kind == "attn" else self.steer_neuron_scale)[p.adapter],
                            lambda like, p=p: self._input_scale(kind, p.adapter).to(like.dtype),
                        )
                        x = _masked(x * scale, x, mask)
                    if kind == "attn" and p.head_steer:
                        shift = self._cached(
                            "head_shift",
                            p.adapter,
                            x,
                            (self.steer_head_direction[p.adapter], self.steer_head_std[p.adapter]),
                            lambda like, p=p: self._head_shift(p).to(like.device, like.dtype),
                        )
                        x = _masked(x + shift, x, mask)
                return ((x, *args[1:]), kwargs) if args else ((), {**kwargs, next(iter(kwargs)): x})

            return hook

        def ablate_hook(chosen: list[LayerPlan]):
            def hook(_mod, _args, output):
                for p in chosen:
                    mask = state.steer_mask(p, output.shape[0], output.shape[1], output.device)
                    if mask is not False:
                        output = _masked(project_out(output, self.steer_direction[p.adapter]), output, mask)
                return output

            return hook

        try:
            for kind, flags in (("attn", ("head_scale", "head_steer")), ("mlp", ("neuron_scale",))):
                chosen = [p for p in plans if any(getattr(p, flag) for flag in flags)]
                if chosen:
                    module = self._module(kind, writer=False)
                    handles.append(module.register_forward_pre_hook(input_hook(kind, chosen), with_kwargs=True))
                ablating = [p for p in plans if p.ablate]
                if ablating:
                    handles.append(self._module(kind, writer=True).register_forward_hook(ablate_hook(ablating)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plans = self._runtime_plans()
        if not plans:
            return self.base_layer(*args, **kwargs)
        writers = [p for p in plans if p.ablate or p.head_scale or p.neuron_scale or p.head_steer]
        if writers:
            if self.training and getattr(self.base_layer, "gradient_checkpointing", False):
                raise ValueError(
                    "steering with ablation, head/neuron scales or head directions hooks this layer's projections "
                    "during its forward, which gradient checkpointing would recompute without them; disable "
                    "gradient checkpointing."
                )
            with self._writer_hooks(writers):
                out = self.base_layer(*args, **kwargs)
        else:
            out = self.base_layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        state = self.steer_state
        for p in plans:
            if p.is_condition_layer and p.adapter not in state.decisions:
                tokens = state.prompt_tokens(hidden.shape[0], hidden.shape[1], hidden.device)
                cond = p.condition
                scores = condition_scores(hidden, self.steer_condition[p.adapter], tokens, cond["measure"])
                state.decide(p.adapter, decide(scores, cond["threshold"], cond["comparator"]))
        for p in plans:
            if p.op is None:
                continue
            mask: Mask = state.steer_mask(p, hidden.shape[0], hidden.shape[1], hidden.device)
            if mask is False:
                continue
            source = self.steer_direction[p.adapter]
            if p.op == "add":
                vector = self._cached(
                    "add", p.adapter, hidden, (source,), lambda like, p=p: p.alpha * self._cast(p, like)
                )
                new = hidden + vector
            else:
                r = self._cached("clamp", p.adapter, hidden, (source,), lambda like, p=p: self._cast(p, like))
                new = hidden + (p.value - hidden @ r)[..., None] * r
            hidden = _masked(new, hidden, mask)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def _cast(self, plan: LayerPlan, like: torch.Tensor) -> torch.Tensor:
        return self.steer_direction[plan.adapter].to(like.device, like.dtype)

    def merge_error(self, plan: LayerPlan) -> str | None:
        has_bias = getattr(self._module("mlp", writer=False), "bias", None) is not None
        attn_bias = getattr(self._module("attn", writer=False), "bias", None) is not None
        error = plan.merge_error(self.steer_spec.model_type, mlp_out_bias=has_bias, attn_out_bias=attn_bias)
        return error or head_overlap_error(plan, self.steer_plan, self.steer_head_std, self.steer_head_scale)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        spec = self.steer_spec
        for adapter, plan in self._plans_to_merge(adapter_names):
            edits = []
            if plan.op == "add":  # after the MLP output, the layer output is h + mlp: its bias shifts both
                vector = plan.alpha * self.steer_direction[adapter].float()
                edits.append((self._module("mlp", False), add_to_bias(vector)))
            if plan.head_steer:  # at run time heads are scaled first, then shifted: the bias takes W_o before scaling
                edits.append((self._module("attn", False), _shift_input(self._head_shift(plan), spec.conv1d)))
            for kind, flag in (("attn", "head_scale"), ("mlp", "neuron_scale")):
                if getattr(plan, flag):
                    edits.append(
                        (self._module(kind, False), _scale_weight(self._input_scale(kind, adapter), spec.conv1d))
                    )
                if plan.ablate:
                    edits.append(
                        (self._module(kind, True), _project_weight(self.steer_direction[adapter], spec.conv1d))
                    )
            self._merge_modules(adapter, edits, safe_merge)


class SteeringEmbedding(_SteeringModule):
    """An input embedding whose output has the ablated direction projected out (``op="ablate"``)."""

    def update_layer(self, adapter_name: str, plan: LayerPlan, direction: torch.Tensor | None = None, **_: Any) -> None:
        self.steer_plan[adapter_name] = plan
        self.steer_checked.discard(adapter_name)
        self._store_direction(adapter_name, direction, self.steer_spec.d_model)
        self.set_adapter(self.active_adapters)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        for p in self._runtime_plans():
            mask = self.steer_state.steer_mask(p, out.shape[0], out.shape[1], out.device)
            if mask is not False:
                out = _masked(project_out(out, self.steer_direction[p.adapter]), out, mask)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter, _plan in self._plans_to_merge(adapter_names):
            fn = _project_weight(self.steer_direction[adapter], conv1d=False, rows_are_outputs=False)
            self._merge_modules(adapter, [(self.base_layer, fn)], safe_merge)
