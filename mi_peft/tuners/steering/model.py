"""The steering adapter model: wraps decoder layers (and, for ablation, the input embeddings)."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ...arch import ArchSpec, _get, spec_for
from ...fingerprint import stamp_or_check_fingerprint
from .._merge import merge_transaction
from .config import SteeringConfig
from .layer import LayerPlan, SteeringEmbedding, SteeringLayer, SteeringTunerLayer
from .state import SteeringState


class SteeringModel(BaseTuner):
    """Zero-training steering of a causal LM, registered with PEFT as ``"steering"``.

    Wraps the decoder layers whose residual stream it edits (``add``/``clamp``, a condition, head
    or neuron scales, head steering) and, for ``ablate``, every decoder layer and every input embedding. Nothing
    is trainable: directions are buffers named ``steer_*`` saved in ``adapter_model.safetensors``.

    Example:
        >>> from peft import get_peft_model
        >>> cfg = SteeringConfig.from_directions(dirs, layers=[8, 9, 10], alpha=4.0)
        >>> model = get_peft_model(base, cfg)
        >>> model.generate(**batch, max_new_tokens=20)
    """

    prefix: str = "steer_"
    tuner_layer_cls = SteeringTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ---- creation ---------------------------------------------------------------------------

    @property
    def steer_state(self) -> SteeringState:
        """Token bookkeeping shared by every wrapped layer of this model."""
        state = self.__dict__.get("_steer_state")
        if state is None:
            state = SteeringState()
            self.__dict__["_steer_state"] = state
        return state

    def _prepare_adapter_config(self, peft_config: SteeringConfig, model_config: dict) -> SteeringConfig:
        if not isinstance(peft_config, SteeringConfig):
            raise TypeError(f"SteeringModel needs a SteeringConfig, got {type(peft_config).__name__}.")
        cfg, spec = peft_config, spec_for(self.model)
        stamp_or_check_fingerprint(cfg, self.model, "This steering adapter")
        if cfg.model_type is None:
            cfg.model_type = spec.model_type
        _check_indices(cfg, spec)
        cfg.target_modules = sorted(self._targets(cfg, spec))
        self._install_state_hook(spec)
        return cfg

    def _targets(self, cfg: SteeringConfig, spec: ArchSpec) -> set[str]:
        layers = set(cfg.steered_layers) | set(cfg.head_scales or {}) | set(cfg.neuron_scales or {})
        layers |= set(cfg.head_layers)
        if cfg.condition is not None:
            layers.add(cfg.condition["layer"])
        if cfg.op == "ablate":
            layers |= set(range(spec.n_layers))
        names = {f"{spec.layers}.{layer}" for layer in layers}
        if cfg.op == "ablate":
            names |= set(_embedding_names(self.model, spec))
        return names

    def _create_and_replace(
        self,
        peft_config: SteeringConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        spec = spec_for(self.model)
        is_embedding = current_key in _embedding_names(self.model, spec)
        layer = -1 if is_embedding else int(current_key.rsplit(".", 1)[1])
        kwargs = _layer_kwargs(peft_config, adapter_name, layer)
        if isinstance(target, SteeringTunerLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(
            peft_config, adapter_name, target, spec=spec, embedding=is_embedding, **kwargs
        )
        self._replace_module(parent, target_name, new_module, target)

    def _create_new_module(
        self, peft_config: SteeringConfig, adapter_name: str, target: nn.Module, **kwargs: Any
    ) -> SteeringTunerLayer:
        cls = SteeringEmbedding if kwargs.pop("embedding") else SteeringLayer
        return cls(target, adapter_name, kwargs.pop("spec"), self.steer_state, **kwargs)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not isinstance(new_module, SteeringTunerLayer):  # unloading: the original module goes back as it was
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _install_state_hook(self, spec: ArchSpec) -> None:
        """Pre-hook on the module running the decoder layers, so every layer knows the token positions."""
        owner_path = spec.layers.rpartition(".")[0]
        owner = _get(self.model, owner_path) if owner_path else self.model
        state = self.steer_state
        if not any(getattr(hook, "__self__", None) is state for hook in owner._forward_pre_hooks.values()):
            owner.register_forward_pre_hook(state.on_forward, with_kwargs=True)

    def _remove_state_hook(self) -> None:
        # Matched by owner instead of a stored handle: handles do not survive deepcopy of the model.
        state = self.steer_state
        for module in self.model.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "__self__", None) is state:
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)

    # ---- generation -------------------------------------------------------------------------

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate`` that tells the layers where the prompt ends (for ``positions`` and conditions)."""
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            return self.model.generate(*args, **kwargs)
        with self.steer_state.generating(x.shape[1]):
            return self.model.generate(*args, **kwargs)

    # ---- merging ----------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        """Tied embeddings are untied before an ablation merges into them, so PEFT's warning does not apply."""

    def _prepare_merge(self, adapter_names: list[str] | None) -> None:
        """Refuse before touching any weight if some part cannot merge; untie embeddings an ablation edits."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        plans = []
        for module in self.model.modules():
            if not isinstance(module, SteeringTunerLayer):
                continue
            for plan in (module.steer_plan[n] for n in names if n in module.steer_plan):
                error = module.merge_error(plan)
                if error:
                    raise ValueError(f"cannot merge steering adapter {plan.adapter!r}: {error}")
                plans.append(plan)
        adding = {p.adapter for p in plans if p.op == "add"}
        ablating = {p.adapter for p in plans if p.ablate}
        if adding and ablating:  # at run time ablation acts inside the layers and `add` after them
            raise ValueError(
                f"cannot merge additive steering {sorted(adding)} together with ablation {sorted(ablating)}: merged "
                "weights would ablate the added vector too. Merge the ablation alone and keep the addition unmerged."
            )
        if any(plan.layer == -1 for plan in plans):
            _untie_output_embeddings(self.model)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into the weights; on any error (a refused part, NaN with ``safe_merge``) nothing changes."""
        with merge_transaction(self.model):
            self._prepare_merge(adapter_names)
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merge every layer first (all or nothing), then unwrap them and remove the position hook."""
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        model = super()._unload_and_optionally_merge(
            merge=False, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._remove_state_hook()
        return model


def _check_indices(cfg: SteeringConfig, spec: ArchSpec) -> None:
    """Every layer, head, neuron and vector length of ``cfg`` must exist in the model."""
    for layer in cfg.layers or []:
        spec.check_layer(layer)
    for name, check in (("head_scales", spec.check_head), ("neuron_scales", spec.check_neuron)):
        for layer, factors in (getattr(cfg, name) or {}).items():
            spec.check_layer(layer)
            for index in factors:
                check(index)
    if cfg.condition is not None:
        spec.check_layer(cfg.condition["layer"])
    _check_head_steering(cfg, spec)
    vectors = list((cfg.vectors or {}).values()) + ([cfg.condition_vector] if cfg.condition_vector is not None else [])
    for vector in vectors:
        if vector.numel() != spec.d_model:
            raise ValueError(
                f"direction has {vector.numel()} entries but this model's residual stream has d_model={spec.d_model}; "
                "use directions computed on this model."
            )


def _check_head_steering(cfg: SteeringConfig, spec: ArchSpec) -> None:
    """Layers and heads of ``head_stds``/``head_directions`` exist; every direction is ``[head_dim]``."""
    for layer, heads in (cfg.head_stds or {}).items():
        if not 0 <= layer < spec.n_layers:
            raise ValueError(
                f"head steering names layer {layer}, but this {spec.model_type} model has {spec.n_layers} layers "
                f"(0..{spec.n_layers - 1})."
            )
        for head in heads:
            if not 0 <= head < spec.n_heads:
                raise ValueError(
                    f"head steering names head {head} of layer {layer}, but this {spec.model_type} model has "
                    f"{spec.n_heads} heads per layer (0..{spec.n_heads - 1})."
                )
    for layer, heads in (cfg.head_directions or {}).items():
        for head, vector in heads.items():
            if vector.numel() != spec.head_dim:
                raise ValueError(
                    f"`head_directions[{layer}][{head}]` has {vector.numel()} entries but this {spec.model_type} "
                    f"model's heads have head_dim={spec.head_dim}; compute head directions on this model."
                )


def _embedding_names(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Input embeddings that write to the residual stream: ``nn.Embedding``s outside the decoder layers.

    Covers token embeddings and learned position embeddings (GPT-2 ``wpe``); the output embedding is excluded.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, SteeringTunerLayer) else module
        if name == spec.layers or name.startswith(spec.layers + ".") or ".base_layer" in name:
            continue
        if isinstance(base, nn.Embedding) and base is not output:
            names.append(name)
    return names


def _layer_kwargs(cfg: SteeringConfig, adapter_name: str, layer: int) -> dict[str, Any]:
    """The :class:`LayerPlan` and tensors one wrapped module needs for ``adapter_name``."""
    vectors = cfg.vectors or {}
    if layer == -1:
        source = (cfg.layers or [0])[0]
        plan = LayerPlan(adapter=adapter_name, layer=-1, positions=cfg.positions, ablate=True)
        return {"plan": plan, "direction": vectors.get(source)}
    op = cfg.op if layer in cfg.steered_layers else None
    condition = cfg.condition
    plan = LayerPlan(
        adapter=adapter_name,
        layer=layer,
        positions=cfg.positions,
        op=op,
        alpha=cfg.alpha_for(layer) if op == "add" else 0.0,
        value=cfg.value if op == "clamp" else None,
        ablate=cfg.op == "ablate",
        head_scale=layer in (cfg.head_scales or {}),
        neuron_scale=layer in (cfg.neuron_scales or {}),
        head_steer=layer in cfg.head_layers,
        head_alpha=cfg.alpha_for(layer) if layer in cfg.head_layers else 0.0,
        condition=condition,
        is_condition_layer=condition is not None and condition["layer"] == layer,
    )
    direction = vectors.get((cfg.layers or [0])[0] if cfg.op == "ablate" else layer)
    return {
        "plan": plan,
        "direction": direction,
        "condition_direction": cfg.condition_vector if plan.is_condition_layer else None,
        "head_factors": (cfg.head_scales or {}).get(layer),
        "neuron_factors": (cfg.neuron_scales or {}).get(layer),
        "head_vectors": (cfg.head_directions or {}).get(layer),
        "head_stds": (cfg.head_stds or {}).get(layer),
    }


def _untie_output_embeddings(model: nn.Module) -> None:
    """Give the output embedding its own copy of a tied weight, so orthogonalising the input side keeps logits."""
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or in_emb is None or out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
        return
    out_emb.weight = nn.Parameter(out_emb.weight.detach().clone(), requires_grad=out_emb.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
