"""Component addresses and sets of them, with exact parameter counts per adapter mode.

A head is addressed as ``Head(layer, head)``, a neuron as ``Neuron(layer, index)``, a residual
stream as ``Residual(layer)``. A :class:`ComponentSet` is what localization selects and what a
sparse adapter trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from .arch import ArchSpec

HeadMode = Literal["out", "qkvo", "bias", "scale"]
NeuronMode = Literal["out", "in_out", "scale"]
HEAD_MODES: tuple[str, ...] = ("out", "qkvo", "bias", "scale")
NEURON_MODES: tuple[str, ...] = ("out", "in_out", "scale")


class Head(NamedTuple):
    layer: int
    head: int


class Neuron(NamedTuple):
    layer: int
    index: int


class Residual(NamedTuple):
    layer: int


def check_mode(head_mode: str | None = None, neuron_mode: str | None = None) -> None:
    if head_mode is not None and head_mode not in HEAD_MODES:
        raise ValueError(f"`head_mode` must be one of {HEAD_MODES}, got {head_mode!r}.")
    if neuron_mode is not None and neuron_mode not in NEURON_MODES:
        raise ValueError(f"`neuron_mode` must be one of {NEURON_MODES}, got {neuron_mode!r}.")


def head_parameters(spec: ArchSpec, mode: str) -> int:
    """Trainable parameters of ONE head in ``mode`` (``qkvo`` counts its k/v head in full)."""
    check_mode(head_mode=mode)
    out = spec.d_model * spec.head_dim
    return {"out": out, "qkvo": 4 * out, "bias": spec.head_dim, "scale": 1}[mode]


def neuron_parameters(spec: ArchSpec, mode: str) -> int:
    """Trainable parameters of ONE neuron in ``mode``."""
    check_mode(neuron_mode=mode)
    n_in = 2 if spec.mlp_in_layout == "concat" else len(spec.mlp_in)
    return {"out": spec.d_model, "in_out": spec.d_model * (1 + n_in), "scale": 1}[mode]


def _normalise(mapping: Mapping[int, Iterable[int]] | None) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, indices in (mapping or {}).items():
        idx = sorted({int(i) for i in indices})
        if idx:
            out[int(layer)] = idx
    return dict(sorted(out.items()))


@dataclass
class ComponentSet:
    """Selected heads and neurons, as ``{layer: [indices]}`` (sorted, de-duplicated).

    ``spec`` (optional) is the architecture the set refers to; sets made by
    ``LocalizationResult.select`` carry it, so ``num_parameters`` needs no argument.

    Example:
        >>> cs = ComponentSet(heads={3: [0, 2]}, neurons={5: [17]}, spec=spec_for(model))
        >>> cs.num_parameters(head_mode="out", neuron_mode="out")
    """

    heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    spec: ArchSpec | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.heads = _normalise(self.heads)
        self.neurons = _normalise(self.neurons)

    @classmethod
    def from_components(cls, components: Iterable[Head | Neuron], spec: ArchSpec | None = None) -> ComponentSet:
        heads: dict[int, list[int]] = {}
        neurons: dict[int, list[int]] = {}
        for comp in components:
            target = heads if isinstance(comp, Head) else neurons
            target.setdefault(comp[0], []).append(comp[1])
        return cls(heads=heads, neurons=neurons, spec=spec)

    def __iter__(self):
        for layer, idx in self.heads.items():
            yield from (Head(layer, i) for i in idx)
        for layer, idx in self.neurons.items():
            yield from (Neuron(layer, i) for i in idx)

    def __len__(self) -> int:
        return self.n_heads + self.n_neurons

    @property
    def n_heads(self) -> int:
        return sum(len(v) for v in self.heads.values())

    @property
    def n_neurons(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def _spec(self, spec: ArchSpec | None) -> ArchSpec:
        spec = spec or self.spec
        if spec is None:
            raise ValueError("this ComponentSet has no architecture attached; pass `spec=spec_for(model)`.")
        return spec

    def validate(self, spec: ArchSpec | None = None) -> None:
        """Raise ``ValueError`` naming the allowed range if any address is outside the model."""
        spec = self._spec(spec)
        for layer, idx in self.heads.items():
            spec.check_layer(layer)
            for i in idx:
                spec.check_head(i)
        for layer, idx in self.neurons.items():
            spec.check_layer(layer)
            for i in idx:
                spec.check_neuron(i)

    def num_parameters(self, head_mode: str = "out", neuron_mode: str = "out", spec: ArchSpec | None = None) -> int:
        """Exact trainable parameter count of a sparse adapter over this set.

        In ``qkvo`` mode, query heads of one grouped-query group share their key/value rows,
        which are counted once per (layer, kv head).
        """
        spec = self._spec(spec)
        self.validate(spec)
        total = self.n_neurons * neuron_parameters(spec, neuron_mode)
        if head_mode != "qkvo":
            return total + self.n_heads * head_parameters(spec, head_mode)
        per = spec.d_model * spec.head_dim
        for idx in self.heads.values():
            kv_heads = {h // spec.group_size for h in idx}
            total += len(idx) * 2 * per + len(kv_heads) * 2 * per
        return total

    def to_dict(self) -> dict[str, dict[str, list[int]]]:
        return {
            "heads": {str(k): v for k, v in self.heads.items()},
            "neurons": {str(k): v for k, v in self.neurons.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Iterable[int]]]) -> ComponentSet:
        return cls(heads=dict(data.get("heads", {})), neurons=dict(data.get("neurons", {})))
