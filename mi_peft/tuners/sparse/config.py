"""Configuration of the sparse "located components" adapter and the per-module slices it trains."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import torch
from peft.config import PeftConfig

from ...arch import ArchSpec, spec_for
from ...components import HEAD_MODES, NEURON_MODES, ComponentSet, Head, Neuron, check_mode
from .._derived import set_peft_type_and_check_targets
from ..steering.condition import check_condition_fields, unit_vector

ColMode = Literal["delta", "scale", "bias"]
ARCH_KEYS = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "n_neurons")


@dataclass(frozen=True)
class ModuleSlices:
    """What a sparse adapter trains in ONE module (input columns and/or output rows).

    ``cols`` are input features: the selected heads' columns of the attention output projection or
    the selected neurons' columns of the MLP output projection; ``col_mode`` says whether they get a
    weight delta ``[d_out, len(cols)]``, one scale per ``group`` columns, or a bias ``[len(cols)]``
    added to the input. ``rows`` are output features (q/k/v rows of heads, gate/up rows of
    neurons) that get a delta ``[len(rows), d_in]``.
    """

    layer: int
    path: str
    cols: tuple[int, ...] = ()
    col_mode: ColMode | None = None
    group: int = 1
    rows: tuple[int, ...] = ()


def arch_record(spec: ArchSpec) -> dict[str, Any]:
    """The architecture facts an adapter needs to be rebuilt without its base model."""
    return {"model_type": spec.model_type, **{k: getattr(spec, k) for k in ARCH_KEYS}}


def spec_from_arch(arch: Mapping[str, Any]) -> ArchSpec:
    """Rebuild the :class:`ArchSpec` recorded in an adapter config (``SparseConfig.arch``)."""
    missing = [k for k in ("model_type", *ARCH_KEYS) if k not in arch]
    if missing:
        raise ValueError(f"adapter config `arch` lacks {missing}; re-save the adapter with this version of mi-peft.")
    config = SimpleNamespace(
        model_type=arch["model_type"],
        num_hidden_layers=arch["n_layers"],
        num_attention_heads=arch["n_heads"],
        num_key_value_heads=arch["n_kv_heads"],
        head_dim=arch["head_dim"],
        hidden_size=arch["d_model"],
        intermediate_size=arch["n_neurons"],
    )
    return spec_for(config)


def _normalise(mapping: Mapping[Any, Iterable[Any]] | None, name: str) -> dict[int, list[int]]:
    """Int keys (JSON turns them into strings), sorted unique int indices, no negative values."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"`{name}` must be a dict {{layer: [index, ...]}}, got {type(mapping).__name__}.")
    out: dict[int, list[int]] = {}
    for layer, indices in mapping.items():
        try:
            key = int(layer)
            idx = sorted({int(i) for i in ([indices] if isinstance(indices, int) else indices)})
        except (TypeError, ValueError) as err:
            raise ValueError(f"`{name}` must map layer -> list of ints, got {layer!r}: {indices!r}.") from err
        bad = [i for i in [key, *idx] if i < 0]
        if bad:
            raise ValueError(f"`{name}` has negative index {bad[0]} (layer {key}); indices start at 0.")
        if idx:
            out[key] = idx
    return dict(sorted(out.items()))


@dataclass
class SparseConfig(PeftConfig):
    """Configuration of a :class:`SparseModel`: train only located heads and neurons.

    Parameters hold only the selected slices of the weights, so the trainable parameter count is
    exactly ``ComponentSet(heads, neurons).num_parameters(head_mode, neuron_mode)``.

    Head modes (``head_mode``):

    * ``"out"``: a delta ``D_h [d_model, d_head]`` on the head's input columns of the attention output
      projection, ``output += z_h @ D_h^T``.
    * ``"qkvo"``: ``"out"`` plus deltas on the head's q/k/v rows. With grouped-query attention the head
      trains its own q rows and the k/v rows of the key/value head it reads; **selecting several query
      heads of one group trains their shared k/v rows ONCE** (one delta per layer and key/value head).
      Those k/v rows then also change the other, unselected query heads of that group.
    * ``"bias"``: a vector ``b_h [d_head]`` added to the head output ``z_h`` before the output projection
      (LoFiT style), i.e. ``output += W_O[:, cols_h] @ b_h``.
    * ``"scale"``: one scalar per head, ``z_h -> (1 + s_h) z_h``. The parameter stores the offset
      ``s_h`` from the identity (initialised to 0), so weight decay pulls toward the identity.

    Neuron modes (``neuron_mode``): ``"out"`` (its column of the MLP output projection), ``"in_out"``
    (also its rows of gate/up or the fused input projection), ``"scale"`` (``(1 + s) * activation``).

    When several adapters are active at once, each adds its change relative to the frozen base
    weights (as LoRA adapters do), so their effects sum.

    Args:
        heads (`dict[int, list[int]]`, defaults to `{}`): ``{layer: [head, ...]}``.
        neurons (`dict[int, list[int]]`, defaults to `{}`): ``{layer: [neuron index, ...]}``.
        head_mode (`str`, defaults to `"out"`): one of ``"out"``, ``"qkvo"``, ``"bias"``, ``"scale"``.
        neuron_mode (`str`, defaults to `"out"`): one of ``"out"``, ``"in_out"``, ``"scale"``.
        init_weights (`bool`, defaults to `True`): start at the identity (all deltas 0). ``False`` draws
            small random deltas (normal, std 0.02); only useful for testing merge/save round trips.
        target_modules (`list[str] | str | None`): derived from ``heads``/``neurons`` and the architecture
            when the adapter is injected (full module names). Setting it raises; only the value a saved
            ``adapter_config.json`` carries is accepted, and it is derived again on injection.
        arch (`dict | None`): architecture facts (``model_type`` and sizes) recorded at injection; loading
            onto a model with other sizes raises. Lets ``to_lora`` work without the base model.
        base_model_fingerprint (`str | None`): ``model_fingerprint`` of the base model, recorded at
            injection (or taken from the localization result); loading onto another base raises
            ``FingerprintMismatchError``.
        ignore_fingerprint (`bool`, defaults to `False`): skip that check. Never saved, so pass it at load
            time: ``PeftModel.from_pretrained(base, path, ignore_fingerprint=True)``.
        modules_to_save (`list[str] | None`): extra modules to train fully and save, as in other PEFT methods.
        condition (`dict | None`): apply the adapter only to sequences that trigger this condition (``layer``,
            ``threshold``, ``comparator``, ``measure`` of a
            :class:`~mi_peft.tuners.steering.SteeringCondition`), read on the base model; other sequences get
            the base model unchanged. Set both condition fields with ``SparseModel.set_condition``.
        condition_direction (`list[float] | None`): the condition's unit direction ``[d_model]``, stored in the
            config JSON (float32 values round-trip exactly).
    """

    heads: dict[int, list[int]] = field(
        default_factory=dict, metadata={"help": "Selected heads as {layer: [head, ...]}."}
    )
    neurons: dict[int, list[int]] = field(
        default_factory=dict, metadata={"help": "Selected MLP neurons as {layer: [index, ...]}."}
    )
    head_mode: str = field(default="out", metadata={"help": "Head adapter mode: 'out', 'qkvo', 'bias' or 'scale'."})
    neuron_mode: str = field(default="out", metadata={"help": "Neuron adapter mode: 'out', 'in_out' or 'scale'."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "Start at the identity (zero deltas). False draws small random deltas, for tests only."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Derived at injection from heads/neurons and the architecture (full module names)."},
    )
    arch: dict | None = field(
        default=None, metadata={"help": "model_type and sizes of the architecture, recorded at injection."}
    )
    base_model_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the base model; loading onto another base model raises."}
    )
    ignore_fingerprint: bool = field(
        default=False, metadata={"help": "Apply the adapter even if the base model fingerprint differs (never saved)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules apart from the sparse layers to train fully and save."}
    )
    condition: dict | None = field(
        default=None, metadata={"help": "Apply only to sequences selected by this condition (layer, threshold, ...)."}
    )
    condition_direction: list[float] | None = field(
        default=None, metadata={"help": "Unit direction [d_model] of `condition`."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        set_peft_type_and_check_targets(
            self,
            "sparse",
            derived_from="`heads`/`neurons` and the architecture when the adapter is injected",
            instead="Select components with `heads=` and `neurons=` (or `SparseConfig.from_localization`), "
            "and add fully trained modules with `modules_to_save=`.",
        )
        check_mode(head_mode=self.head_mode, neuron_mode=self.neuron_mode)
        self.heads = _normalise(self.heads, "heads")
        self.neurons = _normalise(self.neurons, "neurons")
        if not self.heads and not self.neurons:
            raise ValueError(
                "SparseConfig selects nothing: both `heads` and `neurons` are empty. "
                "Pass e.g. `heads={12: [3]}` or `neurons={20: [5, 9]}`, or build it with `SparseConfig.from_localization`."
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        self._check_condition()

    def _check_condition(self) -> None:
        if (self.condition is None) != (self.condition_direction is None):
            raise ValueError(
                "`condition` and `condition_direction` go together; set both with `SparseModel.set_condition(...)` "
                "or neither."
            )
        if self.condition is not None:
            self.condition = check_condition_fields(self.condition)
            unit = unit_vector(self.condition_direction, "condition_direction")  # raises on NaN, zero, not 1-D
            given = torch.as_tensor(self.condition_direction, dtype=torch.float32)
            # a saved unit vector is kept as it is (normalising it again could change its last bits on reload)
            keep = abs(float(given.norm()) - 1.0) < 1e-5
            self.condition_direction = [float(v) for v in (given if keep else unit).tolist()]

    def to_dict(self) -> dict:
        """As PEFT's, minus ``ignore_fingerprint``: a load-time override is never written to disk."""
        out = super().to_dict()
        out.pop("ignore_fingerprint", None)
        return out

    @property
    def components(self) -> ComponentSet:
        return ComponentSet(heads=self.heads, neurons=self.neurons)

    def num_parameters(self, spec: ArchSpec) -> int:
        """Exact trainable parameter count on the architecture ``spec``."""
        return self.components.num_parameters(self.head_mode, self.neuron_mode, spec=spec)

    # ---- construction from localization ----------------------------------------------------

    @classmethod
    def from_components(
        cls,
        components: ComponentSet | Iterable[Head | Neuron],
        head_mode: str = "out",
        neuron_mode: str = "out",
        **kwargs: Any,
    ) -> SparseConfig:
        """A config training ``components`` (a ``ComponentSet`` or an iterable of ``Head``/``Neuron``).

        A set that carries its architecture (``ComponentSet.spec``) is validated now and records it.
        """
        if not isinstance(components, ComponentSet):
            components = ComponentSet.from_components(components)
        if components.spec is not None:
            components.validate()
            kwargs.setdefault("arch", arch_record(components.spec))
        return cls(
            heads=components.heads, neurons=components.neurons, head_mode=head_mode, neuron_mode=neuron_mode, **kwargs
        )

    @classmethod
    def from_localization(
        cls,
        result: Any,
        top_k: int | None = None,
        param_budget: float | int | None = None,
        head_mode: str = "out",
        neuron_mode: str = "out",
        **select_kwargs: Any,
    ) -> SparseConfig:
        """Select components from a ``LocalizationResult`` and train them.

        Calls ``result.select(top_k=..., param_budget=..., **select_kwargs)`` (the modes are passed on
        when ``select`` accepts them, so a parameter budget counts the right mode) and records the
        result's model fingerprint, so the adapter refuses a different base model.

        Example:
            >>> config = SparseConfig.from_localization(result, top_k=20, head_mode="out")
        """
        mode = select_kwargs.pop("mode", None)
        if mode is not None:  # `select`'s shorthand: apply it to the adapter too, not only to the counting
            if mode not in HEAD_MODES and mode not in NEURON_MODES:
                raise ValueError(f"`mode` must be one of {sorted({*HEAD_MODES, *NEURON_MODES})}, got {mode!r}.")
            head_mode = mode if mode in HEAD_MODES else head_mode
            neuron_mode = mode if mode in NEURON_MODES else neuron_mode
        check_mode(head_mode=head_mode, neuron_mode=neuron_mode)
        select = getattr(result, "select", None)
        if not callable(select):
            raise ValueError(f"`result` must be a LocalizationResult (with `.select`), got {type(result).__name__}.")
        kwargs = dict(select_kwargs)
        if top_k is not None:
            kwargs["top_k"] = top_k
        if param_budget is not None:
            kwargs["param_budget"] = param_budget
        params = inspect.signature(select).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for name, value in (("head_mode", head_mode), ("neuron_mode", neuron_mode)):
            if takes_any or name in params:
                kwargs.setdefault(name, value)
        components = select(**kwargs)
        return cls.from_components(
            components, head_mode=head_mode, neuron_mode=neuron_mode, base_model_fingerprint=_fingerprint_of(result)
        )

    # ---- where the adapter lives ---------------------------------------------------------------

    def module_slices(self, spec: ArchSpec) -> dict[str, ModuleSlices]:
        """Full module name -> the slices trained there, for the architecture ``spec``.

        Raises ``ValueError`` naming the allowed range for an out-of-range layer, head or neuron.
        """
        self.components.validate(spec)
        plan: dict[tuple[int, str], dict[str, Any]] = {}

        def entry(layer: int, path: str) -> dict[str, Any]:
            return plan.setdefault((layer, path), {"cols": [], "rows": set()})

        d = spec.head_dim
        head_col_mode = {"out": "delta", "qkvo": "delta", "bias": "bias", "scale": "scale"}[self.head_mode]
        for layer, heads in self.heads.items():
            slot = entry(layer, spec.attn_out)
            slot.update(col_mode=head_col_mode, group=d)
            slot["cols"] = (torch.tensor(heads)[:, None] * d + torch.arange(d)).flatten().tolist()
            if self.head_mode == "qkvo":
                for head in heads:
                    for path, rows in spec.head_qkv_rows(head).items():
                        entry(layer, path)["rows"].update(rows.tolist())
        neuron_col_mode = "scale" if self.neuron_mode == "scale" else "delta"
        for layer, neurons in self.neurons.items():
            slot = entry(layer, spec.mlp_out)
            slot.update(col_mode=neuron_col_mode, group=1, cols=list(neurons))
            if self.neuron_mode == "in_out":
                for neuron in neurons:
                    for path, rows in spec.neuron_in_rows(neuron).items():
                        entry(layer, path)["rows"].update(rows.tolist())
        return {
            f"{spec.layers}.{layer}.{path}": ModuleSlices(
                layer=layer,
                path=path,
                cols=tuple(slot["cols"]),
                col_mode=slot.get("col_mode"),
                group=slot.get("group", 1),
                rows=tuple(sorted(slot["rows"])),
            )
            for (layer, path), slot in sorted(plan.items())
        }


def _fingerprint_of(result: Any) -> str | None:
    """The base-model fingerprint a localization result recorded (attribute or metadata entry)."""
    value = getattr(result, "model_fingerprint", None)
    if value is None:
        metadata = getattr(result, "metadata", None)
        if isinstance(metadata, Mapping):
            value = metadata.get("model_fingerprint", metadata.get("fingerprint"))
    return value
