"""Configuration of the zero-training steering adapter."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from peft.config import PeftConfig
from peft.utils import TaskType

from .._derived import set_peft_type_and_check_targets
from .condition import CalibrationReport, SteeringCondition, calibrate_condition, check_condition_fields, unit_vector
from .heads import check_head_vectors, top_head_fields

Op = Literal["add", "ablate", "clamp"]
PositionMode = Literal["all", "prompt", "generated"]
OPS: tuple[str, ...] = ("add", "ablate", "clamp")
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated")


@dataclass
class SteeringConfig(PeftConfig):
    """Configuration of a :class:`SteeringModel`: add, project out or clamp a direction; scale or steer heads/neurons.

    Build it with :meth:`from_directions`, which also stores the direction vectors; they are saved
    as ``steer_direction`` buffers in ``adapter_model.safetensors``, so the adapter folder is
    self-contained. A scale-only adapter is ``SteeringConfig(head_scales=..., neuron_scales=...)``.
    Head steering (ITI) is ``SteeringConfig(head_directions=..., head_stds=..., alpha=...)`` or
    :meth:`from_head_probes`; its directions are saved as ``steer_head_direction`` buffers.

    Args:
        op (`str`, *optional*, defaults to `None`): ``"add"`` adds ``alpha * r`` (``r`` the unit direction) to
            the residual stream after each of ``layers``; ``"ablate"`` projects ``r`` out of every write to the
            residual stream (embeddings, every attention and MLP output) so the stream never carries it;
            ``"clamp"`` sets the projection on ``r`` after each of ``layers`` to ``value``; ``None`` applies
            only ``head_scales``/``neuron_scales``.
        layers (`list[int]`, *optional*): decoder layers whose output is steered (``add``/``clamp``); for
            ``ablate`` the single layer whose direction is projected out everywhere.
        alpha (`float` or `dict[int, float]`, defaults to `1.0`): strength of ``add`` in residual-stream
            units: the added vector is ``alpha`` times the *unit* direction, per layer if a dict. For head
            steering, the strength in units of each head's ``head_stds``.
        value (`float`, *optional*): target projection of ``clamp``.
        positions (`str`, defaults to `"all"`): ``"all"`` tokens, only the ``"prompt"`` tokens, or only the
            ``"generated"`` tokens (positions after the prompt given to ``generate``).
        head_scales (`dict[int, dict[int, float]]`, *optional*): ``{layer: {head: factor}}``; multiplies a
            head's output (0 ablates it, >1 amplifies it).
        neuron_scales (`dict[int, dict[int, float]]`, *optional*): ``{layer: {neuron: factor}}``.
        head_directions (`dict[int, dict[int, Tensor]]`, *optional*): ``{layer: {head: vector [head_dim]}}``;
            head steering (Inference-Time Intervention, Li et al. 2023) adds ``alpha * head_stds[layer][head]
            * vector / ||vector||`` to that head's output, the input columns ``head * head_dim:(head + 1) *
            head_dim`` of the attention output projection (after any ``head_scales`` of the same adapter).
            Stored as unit vectors; saved in ``adapter_model.safetensors``, not in ``adapter_config.json``.
        head_stds (`dict[int, dict[int, float]]`, *optional*): ``{layer: {head: sigma}}``, one per steered head:
            the standard deviation of that head's activations projected on its direction (see
            :func:`~mi_peft.tuners.steering.head_directions`). Its keys name the steered heads in the saved config.
        condition (`dict`, *optional*): conditional steering (``layer``, ``threshold``, ``comparator``,
            ``measure``; see :class:`SteeringCondition`); the condition direction is saved as a buffer.
        model_type (`str`, *optional*): ``config.model_type`` of the base model (filled in on creation).
        base_model_fingerprint (`str`, *optional*): fingerprint of the base model (filled in on creation);
            loading onto another model raises ``FingerprintMismatchError``.
        ignore_fingerprint (`bool`, defaults to `False`): load onto a model with another fingerprint anyway.
        target_modules (`list[str]`, *optional*): derived from the fields above on creation (decoder layers
            and, for ``ablate``, the input embeddings). Setting it raises; only the value a saved
            ``adapter_config.json`` carries is accepted, and it is derived again on creation.
    """

    op: str | None = field(default=None, metadata={"help": "'add', 'ablate', 'clamp' or None (scales only)."})
    layers: list[int] | None = field(
        default=None, metadata={"help": "Steered decoder layers (add/clamp) or the one source layer (ablate)."}
    )
    alpha: Union[float, dict[int, float]] = field(
        default=1.0, metadata={"help": "Strength of `add`: the added vector is alpha times the unit direction."}
    )
    value: float | None = field(default=None, metadata={"help": "Target projection for `clamp`."})
    positions: str = field(default="all", metadata={"help": "'all', 'prompt' or 'generated' tokens."})
    head_scales: dict[int, dict[int, float]] | None = field(
        default=None, metadata={"help": "{layer: {head: factor}}; 0 ablates, >1 amplifies."}
    )
    neuron_scales: dict[int, dict[int, float]] | None = field(
        default=None, metadata={"help": "{layer: {neuron: factor}}; 0 ablates, >1 amplifies."}
    )
    head_directions: dict[int, dict[int, Any]] | None = field(
        default=None, metadata={"help": "{layer: {head: vector [head_dim]}}: head steering directions (ITI)."}
    )
    head_stds: dict[int, dict[int, float]] | None = field(
        default=None, metadata={"help": "{layer: {head: sigma}}: std of each steered head along its direction."}
    )
    condition: dict[str, Any] | None = field(
        default=None, metadata={"help": "Conditional steering: layer, threshold, comparator, measure."}
    )
    model_type: str | None = field(default=None, metadata={"help": "Base model_type (filled in on creation)."})
    base_model_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the base model (filled in on creation)."}
    )
    ignore_fingerprint: bool = field(
        default=False, metadata={"help": "Apply the adapter to a model with a different fingerprint anyway."}
    )
    target_modules: Union[list[str], str] | None = field(
        default=None, metadata={"help": "Derived on creation: wrapped decoder layers and embeddings."}
    )
    task_type: Union[str, TaskType] | None = field(default="CAUSAL_LM", metadata={"help": "Task type."})

    def __post_init__(self) -> None:
        super().__post_init__()
        set_peft_type_and_check_targets(
            self,
            "steering",
            derived_from="`layers`, `op`, the scales and the condition when the adapter is created",
            instead="Choose the steered decoder layers with `layers=` (or `SteeringConfig.from_directions`) "
            "and heads/neurons with `head_scales=`/`neuron_scales=`.",
        )
        if not hasattr(self, "vectors"):
            self.vectors: dict[int, torch.Tensor] | None = None
            self.condition_vector: torch.Tensor | None = None
        if self.op is not None and self.op not in OPS:
            raise ValueError(f"`op` must be one of {OPS} or None (scales only), got {self.op!r}.")
        if self.positions not in POSITIONS:
            raise ValueError(f"`positions` must be one of {POSITIONS}, got {self.positions!r}.")
        self.layers = _layer_list(self.layers)
        self.alpha = _alpha(self.alpha)
        self.head_scales = _scale_map(self.head_scales, "head_scales")
        self.neuron_scales = _scale_map(self.neuron_scales, "neuron_scales")
        self.head_stds = _scale_map(self.head_stds, "head_stds", positive=True)
        self.head_directions = check_head_vectors(self.head_directions, self.head_stds)
        if self.condition is not None:
            self.condition = check_condition_fields(self.condition)
        self._check_combination()

    def _check_combination(self) -> None:
        has_scales = bool(self.head_scales or self.neuron_scales or self.head_stds)
        if self.op is None and not has_scales:
            raise ValueError(
                "the adapter does nothing: set `op` (use `SteeringConfig.from_directions`), scales or head "
                "directions (`SteeringConfig.from_head_probes`)."
            )
        if self.op in ("add", "clamp") and not self.layers:
            raise ValueError(f"`op={self.op!r}` needs `layers`: the decoder layers whose output is steered.")
        if self.op == "ablate" and (not self.layers or len(self.layers) != 1):
            raise ValueError(
                f"`op='ablate'` projects ONE direction out at every layer; pass `layers=[l]` to name the layer "
                f"whose direction is used, got layers={self.layers!r}."
            )
        if self.op == "clamp" and (not isinstance(self.value, (int, float)) or not math.isfinite(self.value)):
            raise ValueError(f"`op='clamp'` needs a finite `value` (the target projection), got {self.value!r}.")
        if isinstance(self.alpha, dict):
            missing = sorted((set(self.layers or []) if self.op == "add" else set()) | set(self.head_layers))
            missing = [layer for layer in missing if layer not in self.alpha]
            if missing:
                raise ValueError(f"`alpha` has no value for layers {missing}; give one per steered layer.")
        if self.condition is not None and (self.op not in ("add", "clamp") or has_scales):
            raise ValueError(
                "conditional steering applies to `op='add'` or `'clamp'` without head/neuron scales or head "
                f"directions; got op={self.op!r}, scales or head directions={'yes' if has_scales else 'no'}. "
                "Put those in a separate adapter."
            )

    def to_dict(self) -> dict[str, Any]:
        """Saved fields; ``ignore_fingerprint`` is a load-time switch and is not saved, so that
        ``PeftModel.from_pretrained(base, dir, ignore_fingerprint=True)`` reaches the config."""
        out = super().to_dict()
        out.pop("ignore_fingerprint", None)
        out.pop("head_directions", None)  # tensors: saved as `steer_head_direction` buffers; head_stds names the heads
        return out

    def alpha_for(self, layer: int) -> float:
        """Strength of ``add`` and of head steering at ``layer``."""
        return float(self.alpha[layer]) if isinstance(self.alpha, dict) else float(self.alpha)

    @property
    def head_layers(self) -> list[int]:
        """Layers with head steering (``head_stds`` names the steered heads)."""
        return sorted(self.head_stds or {})

    @property
    def steered_layers(self) -> list[int]:
        """Layers whose output ``add``/``clamp`` changes (empty for ``ablate`` and scale-only adapters)."""
        return list(self.layers or []) if self.op in ("add", "clamp") else []

    @classmethod
    def from_directions(
        cls,
        directions: Any,
        *,
        layers: Sequence[int] | None = None,
        alpha: float | Mapping[int, float] = 1.0,
        op: Op = "add",
        positions: PositionMode = "all",
        value: float | None = None,
        head_scales: Mapping[int, Mapping[int, float]] | None = None,
        neuron_scales: Mapping[int, Mapping[int, float]] | None = None,
        condition: SteeringCondition | None = None,
        **kwargs: Any,
    ) -> SteeringConfig:
        """A steering config carrying unit directions.

        Args:
            directions: a ``Directions`` (uses ``.vectors``; its fingerprint and model type are kept), a
                ``{layer: Tensor}`` dict, or one ``Tensor`` used for every layer in ``layers``.
            layers: layers to steer (default: every layer of ``directions``); for ``op="ablate"`` the one
                layer whose direction is projected out everywhere.
            alpha: ``add`` strength; the added vector is ``alpha * direction / ||direction||``. To add
                ``k`` times the raw diff-in-means vector, pass ``alpha={l: k * directions.norms[l]}``.
            op, positions, value, head_scales, neuron_scales: see :class:`SteeringConfig`.
            condition: a :class:`SteeringCondition` (e.g. from :meth:`calibrate_condition`).
            kwargs: other :class:`SteeringConfig` fields.

        Example:
            >>> cfg = SteeringConfig.from_directions(dirs, layers=range(8, 20), alpha=4.0)
            >>> model = get_peft_model(base, cfg)
        """
        if op not in OPS:
            raise ValueError(f"`op` must be one of {OPS}, got {op!r}.")
        vectors = _vector_map(directions, layers)
        chosen = sorted(vectors) if layers is None else sorted({int(layer) for layer in layers})
        if op == "ablate" and len(chosen) != 1:
            raise ValueError(
                f"`op='ablate'` uses one direction; pass `layers=[l]` to pick it from layers {sorted(vectors)}."
            )
        missing = [layer for layer in chosen if layer not in vectors]
        if missing:
            raise ValueError(f"`directions` has no vector for layers {missing}; it has layers {sorted(vectors)}.")
        units = {layer: unit_vector(vectors[layer], f"direction for layer {layer}") for layer in chosen}
        if len({u.numel() for u in units.values()}) > 1:
            raise ValueError("directions have different lengths; all must be [d_model] of the same model.")
        for key in ("base_model_fingerprint", "model_type"):
            source = getattr(directions, "model_fingerprint" if key == "base_model_fingerprint" else key, None)
            if source is not None and key not in kwargs:
                kwargs[key] = source
        config = cls(
            op=op,
            layers=chosen,
            alpha=dict(alpha) if isinstance(alpha, Mapping) else alpha,
            value=value,
            positions=positions,
            head_scales=head_scales,
            neuron_scales=neuron_scales,
            condition=None if condition is None else condition.to_dict(),
            **kwargs,
        )
        config.vectors = units
        config.condition_vector = None if condition is None else condition.direction
        if (
            config.condition_vector is not None
            and config.condition_vector.numel() != next(iter(units.values())).numel()
        ):
            raise ValueError("the condition direction and the steering directions have different lengths.")
        return config

    @classmethod
    def from_head_probes(
        cls,
        result: Any,
        directions: Any,
        *,
        top_k: int,
        alpha: float | Mapping[int, float],
        head_stds: Mapping[int, Mapping[int, float]] | None = None,
        positions: PositionMode = "all",
        **kwargs: Any,
    ) -> SteeringConfig:
        """Head steering (ITI) of the ``top_k`` best heads of a locate result, along their directions.

        Args:
            result: a ``LocalizationResult`` with ``"heads"`` scores, normally from ``locate(..., method="probe")``
                (held-out probe accuracy per head); the ``top_k`` highest are steered (``result.top("heads")``).
            directions: a :class:`~mi_peft.tuners.steering.HeadDirections` (from
                :func:`~mi_peft.tuners.steering.head_directions`: mass-mean directions and their ``sigma``), or a
                ``{layer: {head: vector}}`` dict together with ``head_stds``.
            top_k: number of heads to steer.
            alpha: strength in units of each head's ``sigma`` (per layer if a dict); ITI used 15 on LLaMA-7B.
            head_stds: ``{layer: {head: sigma}}``; overrides the stds of ``directions``.
            positions, kwargs: other :class:`SteeringConfig` fields.

        Example:
            >>> result = locate(model, tok, pairs, method="probe", components="heads")
            >>> cfg = SteeringConfig.from_head_probes(result, head_directions(model, tok, pairs), top_k=16, alpha=15.0)
        """
        chosen, sigma, provenance = top_head_fields(result, directions, top_k, head_stds)
        for key, value in provenance.items():
            kwargs.setdefault(key, value)
        return cls(
            head_directions=chosen,
            head_stds=sigma,
            alpha=dict(alpha) if isinstance(alpha, Mapping) else alpha,
            positions=positions,
            **kwargs,
        )

    @staticmethod
    def calibrate_condition(
        model: Any,
        tokenizer: Any,
        positive: Sequence[str],
        negative: Sequence[str],
        *,
        layers: Sequence[int] | None = None,
        directions: Any = None,
        measure: str = "cosine",
        batch_size: int = 8,
    ) -> tuple[SteeringCondition, CalibrationReport]:
        """Pick the condition layer and threshold separating ``positive`` from ``negative`` prompts.

        Returns ``(condition, report)``; pass the condition to :meth:`from_directions`. See
        :func:`~mi_peft.tuners.steering.condition.calibrate_condition` for the arguments.
        """
        return calibrate_condition(
            model,
            tokenizer,
            positive,
            negative,
            directions=directions,
            layers=layers,
            measure=measure,
            batch_size=batch_size,
        )


def _vector_map(directions: Any, layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    vectors = getattr(directions, "vectors", directions)
    if isinstance(vectors, torch.Tensor):
        if layers is None:
            raise ValueError("a single direction tensor needs `layers=` to say where it applies.")
        return {int(layer): vectors for layer in layers}
    if not isinstance(vectors, Mapping) or not vectors:
        raise ValueError(
            f"`directions` must be a Directions, a non-empty {{layer: Tensor}} dict or a Tensor, got {type(directions)}."
        )
    return {int(layer): v for layer, v in vectors.items()}


def _layer_list(layers: Any) -> list[int] | None:
    if layers is None:
        return None
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"`layers` must hold non-negative ints, got {layer!r}.")
        out.append(layer)
    if not out:
        raise ValueError("`layers` is empty; pass at least one layer.")
    return sorted(set(out))


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}.")
    return float(value)


def _alpha(alpha: Any) -> float | dict[int, float]:
    if isinstance(alpha, Mapping):
        return {int(layer): _finite(a, f"`alpha[{layer}]`") for layer, a in alpha.items()}
    return _finite(alpha, "`alpha`")


def _scale_map(scales: Any, name: str, positive: bool = False) -> dict[int, dict[int, float]] | None:
    """``{layer: {index: factor}}`` with int keys (JSON turns them into strings) and finite factors (> 0 if
    ``positive``)."""
    if not scales:
        return None
    if not isinstance(scales, Mapping):
        raise ValueError(f"`{name}` must be a {{layer: {{index: value}}}} dict, got {type(scales).__name__}.")
    out: dict[int, dict[int, float]] = {}
    for layer, factors in scales.items():
        if not isinstance(factors, Mapping) or not factors:
            raise ValueError(f"`{name}[{layer}]` must be a non-empty {{index: factor}} dict, got {factors!r}.")
        values = {int(i): _finite(f, f"`{name}[{layer}][{i}]`") for i, f in factors.items()}
        bad = {i: v for i, v in values.items() if positive and v <= 0}
        if bad:
            raise ValueError(f"`{name}[{layer}]` values must be > 0, got {bad}.")
        out[int(layer)] = values
    return out
