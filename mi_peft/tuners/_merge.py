"""Merging adapters into base weights all or nothing, without biases that a saved model would drop.

A merge edits many modules, one tuner layer after another; an error in the last one must not
leave the first ones edited. :func:`merge_transaction` remembers every parameter tensor (merges
replace tensors, never write into them) and puts them all back on any error.

A merge that gives a bias-free projection a bias (sparse ``bias`` mode, steering ``add``) must also
declare it in the model config, or ``from_pretrained`` drops it with only an "unexpected key"
notice. :func:`switch_on_biases` sets the architecture's :class:`~mi_peft.arch.BiasSwitch` flag and
gives every projection the flag turns on a zero bias; without such a flag the merge refuses first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..arch import ArchSpec, BiasSwitch, _get

_TUNER_STATE = ("merged_adapters", "steer_backup", "sparse_merge_cache", "_sparse_created_bias")


@contextmanager
def merge_transaction(model: nn.Module) -> Iterator[None]:
    """Restore every parameter, config flag and tuner merge state of ``model`` if the block raises."""
    params = {module: dict(module._parameters) for module in model.modules()}
    data = {id(p): p.data for saved in params.values() for p in saved.values() if p is not None}
    configs = [(config, dict(config.__dict__)) for config in _configs(model)]
    tuners = {
        module: {name: _copy(getattr(module, name)) for name in _TUNER_STATE if hasattr(module, name)}
        for module in model.modules()
        if isinstance(module, BaseTunerLayer)
    }
    try:
        yield
    except BaseException:
        for module, saved in params.items():
            module._parameters.clear()
            module._parameters.update(saved)
            for param in saved.values():
                if param is not None:
                    param.data = data[id(param)]
        for config, saved_dict in configs:
            config.__dict__.clear()
            config.__dict__.update(saved_dict)
        for module, state in tuners.items():
            for name, value in state.items():
                setattr(module, name, value)
        raise


def _copy(value: Any) -> Any:
    return type(value)(value) if isinstance(value, (list, dict)) else value


def _configs(model: nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return list({id(c): c for c in (config, text)}.values())


def base_of(module: nn.Module) -> nn.Module:
    """The wrapped module under a PEFT tuner layer (the module itself otherwise)."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def projection(model: nn.Module, spec: ArchSpec, layer: int, path: str) -> nn.Module:
    """The unwrapped projection at ``path`` of decoder layer ``layer`` (tuner layers looked through)."""
    decoder = base_of(spec.decoder_layers(model)[layer])
    obj: nn.Module = decoder
    for part in path.split("."):
        obj = base_of(_get(base_of(obj), part))
    return obj


@dataclass
class BiasPlan:
    """The projections a merge gives a bias, and the switches that make the config declare them."""

    switches: list[BiasSwitch] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "layer L: path" that no config flag can declare


def plan_biases(model: nn.Module, spec: ArchSpec, needs: Iterable[tuple[int, str]]) -> BiasPlan:
    """Which switches the ``(layer, projection path)`` pairs that must hold a bias need (no change made)."""
    plan = BiasPlan()
    for layer, path in sorted(set(needs)):
        if getattr(projection(model, spec, layer, path), "bias", None) is not None:
            continue
        switch = spec.bias_switch(path)
        if switch is None:
            plan.refused.append(f"layer {layer}: {path}")
        elif switch not in plan.switches:
            plan.switches.append(switch)
    return plan


def bias_refusal(spec: ArchSpec, plan: BiasPlan) -> str | None:
    """Why the merge cannot proceed (``None`` when every needed bias can be declared)."""
    if not plan.refused:
        return None
    return (
        f"merging needs a bias on {', '.join(plan.refused)}, which has none, and {spec.model_type} models have no "
        "config flag that makes transformers build it: the saved model would reload without it (different outputs). "
        "Keep the adapter unmerged, or export it to LoRA (`mi_peft.export.to_lora`; sparse adapters)."
    )


@dataclass
class SwitchedBiases:
    """What :func:`switch_on_biases` changed, so :func:`switch_off_biases` can undo it after an unmerge."""

    flags: list[tuple[Any, str, Any]] = field(default_factory=list)  # (config, flag, previous value)
    modules: list[nn.Module] = field(default_factory=list)  # projections given a zero bias


def switch_on_biases(model: nn.Module, spec: ArchSpec, switches: Iterable[BiasSwitch]) -> SwitchedBiases:
    """Set each switch's config flag and give every projection it turns on (in every layer) a zero bias."""
    done = SwitchedBiases()
    for switch in switches:
        for config in _configs(model):
            done.flags.append((config, switch.flag, getattr(config, switch.flag, None)))
            setattr(config, switch.flag, True)
        for layer in range(spec.n_layers):
            for path in switch.modules:
                module = projection(model, spec, layer, path)
                if module.bias is None:
                    weight = module.weight
                    zeros = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                    module.bias = nn.Parameter(zeros, requires_grad=False)
                    done.modules.append(module)
    return done


def switch_off_biases(done: SwitchedBiases) -> None:
    """Remove the biases and restore the config flags that :func:`switch_on_biases` set (after unmerging)."""
    for module in done.modules:
        module.bias = None
    for config, flag, previous in reversed(done.flags):
        setattr(config, flag, previous)
    done.modules.clear()
    done.flags.clear()


def add_to_bias(vector: torch.Tensor):
    """Merge fn ``(weight, bias) -> (weight, bias + vector)`` (computed in float32; the weight is kept)."""

    def fn(weight: torch.Tensor, bias: torch.Tensor | None):
        if bias is None:
            raise ValueError("this projection has no bias to add a steering vector to; keep the adapter unmerged.")
        return weight, (bias.float() + vector.to(bias.device, torch.float32)).to(bias.dtype)

    return fn
