"""SAE latent steering and clamping as a PEFT adapter (``"sae_steering"``, parameters prefixed ``sae_``).

The adapter wraps the one decoder layer the SAE reads and edits its output ``x``:

- ``op="add"``: ``x + sum_i alpha_i * d_i`` (``d_i`` latent ``i``'s decoder row), feature steering;
- ``op="clamp"``: ``x + sum_i (value_i - a_i(x)) * d_i`` with ``a_i(x)`` the latent's activation, i.e.
  encode, set the latent to ``value_i``, add back the decoded difference. This is the SAE's own
  ``decode(f') + (x - decode(f))`` (reconstruction plus error term) restricted to the edited latents,
  so latents that are not edited leave the forward unchanged.

Only the rows of the chosen latents are stored (decoder rows, and for ``clamp`` encoder rows, biases
and JumpReLU thresholds), so the folder is small and loads without sae-lens. Clamping needs latents that
are encoded one by one (sae-lens ``standard`` and ``jumprelu`` SAEs; BatchTopK SAEs save as
``jumprelu``); a TopK SAE's latent depends on the others' ranks, so only ``add`` is offered for it.

Example:
    >>> cfg = SAESteeringConfig.from_sae(site, [1203, 77], op="add", alpha=4.0)
    >>> steered = get_peft_model(model, cfg)
    >>> steered.save_pretrained("runs/sae-steer")  # PeftModel.from_pretrained(base, ...) after `import mi_peft`
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TaskType
from torch import nn

from ..arch import ArchSpec, spec_for
from ..fingerprint import stamp_or_check_fingerprint
from ..tuners._derived import set_peft_type_and_check_targets
from ..tuners._registry import register_method

OPS: tuple[str, ...] = ("add", "clamp")
CLAMP_ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu")
ROW_NAMES: tuple[str, ...] = ("decoder", "encoder", "encoder_bias", "threshold", "input_bias")


@dataclass
class SAESteeringConfig(PeftConfig):
    """Which SAE latents to steer or clamp at one layer; build it with :meth:`from_sae`.

    Args:
        op (`str`): ``"add"`` (add ``alpha_i`` times each decoder row) or ``"clamp"`` (set each latent to ``value_i``).
        layer (`int`): decoder layer whose output the SAE reads (``hook_resid_post``).
        latents (`list[int]`): SAE latent indices. alpha, value (`list[float]`): one per latent.
        d_sae, hook_name, sae_architecture: provenance of the SAE (checked, saved in ``adapter_config.json``).
        model_type, base_model_fingerprint: the base model (filled in on creation; another model refuses).
        ignore_fingerprint (`bool`): load onto a model with another fingerprint anyway (not saved).
        target_modules: derived from ``layer``; setting it raises.
    """

    op: str = field(default="add", metadata={"help": "'add' or 'clamp'."})
    layer: int | None = field(default=None, metadata={"help": "Decoder layer whose output is edited."})
    latents: list[int] | None = field(default=None, metadata={"help": "SAE latent indices."})
    alpha: list[float] | None = field(default=None, metadata={"help": "op='add': decoder-row multiples, per latent."})
    value: list[float] | None = field(default=None, metadata={"help": "op='clamp': target activations, per latent."})
    d_sae: int | None = field(default=None, metadata={"help": "Number of SAE latents."})
    hook_name: str | None = field(default=None, metadata={"help": "The SAE's sae-lens hook point."})
    sae_architecture: str | None = field(default=None, metadata={"help": "sae-lens architecture of the SAE."})
    model_type: str | None = field(default=None, metadata={"help": "Base model_type (filled in on creation)."})
    base_model_fingerprint: str | None = field(default=None, metadata={"help": "Base model fingerprint."})
    ignore_fingerprint: bool = field(default=False, metadata={"help": "Apply to another base model anyway."})
    target_modules: Union[list[str], str] | None = field(default=None, metadata={"help": "Derived from `layer`."})
    task_type: Union[str, TaskType] | None = field(default="CAUSAL_LM", metadata={"help": "Task type."})

    def __post_init__(self) -> None:
        super().__post_init__()
        set_peft_type_and_check_targets(
            self,
            "sae_steering",
            derived_from="`layer` when the adapter is created",
            instead="Build the config with `SAESteeringConfig.from_sae(site, latents, ...)`.",
        )
        if not hasattr(self, "rows"):
            self.rows: dict[str, torch.Tensor] | None = None
        if self.op not in OPS:
            raise ValueError(f"`op` must be one of {OPS}, got {self.op!r}.")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"`layer` must be a non-negative int (the SAE's decoder layer), got {self.layer!r}.")
        self.latents = _latent_list(self.latents, self.d_sae)
        needed, other = ("alpha", "value") if self.op == "add" else ("value", "alpha")
        if getattr(self, other) is not None:
            raise ValueError(f"`{other}` is not used by op={self.op!r}; pass `{needed}` instead.")
        setattr(self, needed, _per_latent(getattr(self, needed), self.latents, needed))

    def to_dict(self) -> dict[str, Any]:
        """Saved fields; ``ignore_fingerprint`` is a load-time switch and is not saved."""
        out = super().to_dict()
        out.pop("ignore_fingerprint", None)
        return out

    @property
    def coefficients(self) -> list[float]:
        """``alpha`` for ``add``, ``value`` for ``clamp``."""
        return list(self.alpha if self.op == "add" else self.value)  # type: ignore[arg-type]

    @classmethod
    def from_sae(
        cls,
        site: Any,
        latents: int | Sequence[int],
        *,
        op: str = "add",
        alpha: float | Sequence[float] | Mapping[int, float] | None = None,
        value: float | Sequence[float] | Mapping[int, float] | None = None,
        **kwargs: Any,
    ) -> SAESteeringConfig:
        """A config carrying the chosen latents' rows of ``site``'s SAE (a :class:`~mi_peft.sae.SAESite`).

        ``alpha``/``value`` take one number for every latent, a list in ``latents`` order or ``{latent: number}``.
        """
        chosen = site.check_latents(latents)
        if op == "add" and alpha is None:
            alpha = 1.0
        config = cls(
            op=op,
            layer=site.layer,
            latents=chosen,
            alpha=None if alpha is None else _spread(alpha, chosen, "alpha"),
            value=None if value is None else _spread(value, chosen, "value"),
            d_sae=site.d_sae,
            hook_name=site.hook_name,
            sae_architecture=site.sae.cfg.architecture(),
            **kwargs,
        )
        config.rows = sae_rows(site, chosen, op)
        return config


def _latent_list(latents: Any, d_sae: int | None) -> list[int]:
    if latents is None or isinstance(latents, (str, bytes)) or not list(latents):
        raise ValueError("`latents` must be a non-empty list of SAE latent indices.")
    out = []
    for latent in latents:
        if isinstance(latent, bool) or not isinstance(latent, int) or latent < 0:
            raise ValueError(f"`latents` must hold non-negative ints, got {latent!r}.")
        if d_sae is not None and latent >= d_sae:
            raise ValueError(f"latent index {latent} is out of range: this SAE has latents 0..{d_sae - 1}.")
        out.append(latent)
    if len(set(out)) != len(out):
        raise ValueError(f"latent indices repeat in {out}; pass each latent once.")
    return out


def _per_latent(values: Any, latents: list[int], name: str) -> list[float]:
    if values is None:
        raise ValueError(f"`{name}` is needed: one number per latent (see `SAESteeringConfig.from_sae`).")
    values = list(values)
    if len(values) != len(latents):
        raise ValueError(f"`{name}` has {len(values)} entries for {len(latents)} latents; give one per latent.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"`{name}` entries must be finite numbers, got {v!r}.")
    return [float(v) for v in values]


def _spread(values: Any, latents: list[int], name: str) -> list[float]:
    if isinstance(values, Mapping):
        missing = [latent for latent in latents if latent not in values]
        if missing:
            raise ValueError(f"`{name}` has no entry for latents {missing}.")
        return [values[latent] for latent in latents]
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [float(values)] * len(latents)
    return list(values)


@torch.no_grad()
def sae_rows(site: Any, latents: list[int], op: str) -> dict[str, torch.Tensor]:
    """The rows of ``site.sae`` that the adapter needs, float32 on CPU; checked against the SAE's own encode."""
    sae, idx = site.sae, torch.tensor(latents, device=site.sae.W_dec.device)
    units = torch.zeros(len(latents), site.d_sae, device=idx.device, dtype=sae.W_dec.dtype)
    units[torch.arange(len(latents), device=idx.device), idx] = 1.0
    decoder = (sae.decode(units) - sae.decode(torch.zeros_like(units))).float()
    if torch.allclose(decoder, sae.W_dec[idx].float(), rtol=1e-4, atol=1e-6):
        decoder = sae.W_dec[idx].float()  # exact rows when the decoder is plain linear
    rows = {"decoder": decoder.cpu()}
    if op != "clamp":
        return rows
    arch = sae.cfg.architecture()
    if arch not in CLAMP_ARCHITECTURES:
        raise ValueError(
            f"op='clamp' needs latents that are encoded one by one ({', '.join(CLAMP_ARCHITECTURES)} SAEs); "
            f"this is a {arch!r} SAE, whose latents depend on each other. Use op='add', or "
            "mi_peft.sae.intervene(...) with the whole SAE."
        )
    zeros = torch.zeros(len(latents))
    rows["encoder"] = sae.W_enc[:, idx].T.float().cpu()
    rows["encoder_bias"] = sae.b_enc[idx].float().cpu()
    rows["threshold"] = sae.threshold[idx].float().cpu() if arch == "jumprelu" else zeros
    rows["input_bias"] = (sae.b_dec * float(sae.cfg.apply_b_dec_to_input)).float().cpu()
    _check_encoder(site, idx, rows)
    return rows


def encode_rows(x: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Activations ``[..., k]`` of the stored latents (ReLU, zero at or below the JumpReLU threshold)."""
    pre = (x - rows["input_bias"]) @ rows["encoder"].T + rows["encoder_bias"]
    return pre.relu() * (pre > rows["threshold"])


def _check_encoder(site: Any, idx: torch.Tensor, rows: Mapping[str, torch.Tensor]) -> None:
    """Refuse when the stored rows do not reproduce ``sae.encode`` (an architecture this module does not know)."""
    gen = torch.Generator().manual_seed(0)
    sparse = torch.rand(64, site.d_sae, generator=gen) * (torch.rand(64, site.d_sae, generator=gen) < 0.05)
    probe = site.sae.decode(sparse.to(site.sae.W_dec)).float().cpu() + 0.1 * torch.randn(64, site.d_in, generator=gen)
    ours, theirs = encode_rows(probe, rows), site.encode(probe)[:, idx.cpu()].cpu()
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * (1.0 + float(theirs.abs().max()))):
        raise ValueError(
            "this SAE's encoder does not act latent by latent as its architecture name says; op='clamp' cannot "
            "store it compactly. Use op='add' or mi_peft.sae.intervene(...)."
        )


@dataclass(frozen=True)
class _Plan:
    op: str
    coefficients: tuple[float, ...]


class SAESteeringLayer(nn.Module, BaseTunerLayer):
    """A decoder layer whose output is edited along SAE decoder rows (see module docs)."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names = ("sae_plan", *(f"sae_{name}" for name in ROW_NAMES))

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SAESteeringConfig, spec: ArchSpec):
        super().__init__()
        self.base_layer = base_layer
        self.sae_plan: dict[str, _Plan] = {}
        for name in ROW_NAMES:
            setattr(self, f"sae_{name}", BufferDict({}, persistent=True))
        self.sae_checked: set[str] = set()  # adapters whose rows were seen loaded (checked once, not per forward)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, spec)

    def update_layer(self, adapter_name: str, config: SAESteeringConfig, spec: ArchSpec) -> None:
        self.sae_plan[adapter_name] = _Plan(config.op, tuple(config.coefficients))
        self.sae_checked.discard(adapter_name)
        k, d = len(config.latents or []), spec.d_model
        # Zeros until a saved adapter's weights are loaded into them (PeftModel.from_pretrained).
        shapes = {"decoder": (k, d), "encoder": (k, d), "encoder_bias": (k,), "threshold": (k,), "input_bias": (d,)}
        names = ROW_NAMES if config.op == "clamp" else ("decoder",)
        device = next(self.base_layer.parameters()).device
        for name in names:
            value = (config.rows or {}).get(name)
            value = torch.zeros(shapes[name]) if value is None else value.detach().float()
            getattr(self, f"sae_{name}")[adapter_name] = value.to(device)
        self.set_adapter(self.active_adapters)

    def _get_available_adapters(self) -> set[str]:
        return set(self.sae_plan)

    def _rows(self, adapter: str) -> dict[str, torch.Tensor]:
        rows = {n: getattr(self, f"sae_{n}")[adapter] for n in ROW_NAMES if adapter in getattr(self, f"sae_{n}")}
        if adapter in self.sae_checked:
            return rows
        if bool(rows["decoder"].any()):
            self.sae_checked.add(adapter)
        else:
            raise ValueError(
                f"SAE adapter {adapter!r} has no decoder rows: build its config with `SAESteeringConfig.from_sae(...)` "
                "or load a saved adapter with `PeftModel.from_pretrained` (after `import mi_peft`)."
            )
        return rows

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        for adapter in self.active_adapters:
            plan = self.sae_plan.get(adapter)
            if plan is not None:
                hidden = self._edit(plan, self._rows(adapter), hidden)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    @staticmethod
    def _edit(plan: _Plan, rows: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        coef = torch.tensor(plan.coefficients, device=hidden.device, dtype=torch.float32)
        if plan.op == "add":
            return hidden + (coef @ rows["decoder"]).to(hidden.dtype)
        x = hidden.float()
        return (x + (coef - encode_rows(x, rows)) @ rows["decoder"]).to(hidden.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "SAE steering adapters edit the residual stream at run time and have no weight form; keep them unmerged."
        )

    def unmerge(self) -> None:
        """Nothing to undo: SAE steering adapters never merge."""

    def __repr__(self) -> str:
        return "sae_steering." + super().__repr__()


class SAESteeringModel(BaseTuner):
    """Steering or clamping of SAE latents, registered with PEFT as ``"sae_steering"`` (see module docs)."""

    prefix: str = "sae_"
    tuner_layer_cls = SAESteeringLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: SAESteeringConfig, model_config: dict) -> SAESteeringConfig:
        if not isinstance(peft_config, SAESteeringConfig):
            raise TypeError(f"SAESteeringModel needs a SAESteeringConfig, got {type(peft_config).__name__}.")
        cfg, spec = peft_config, spec_for(self.model)
        stamp_or_check_fingerprint(cfg, self.model, "This SAE adapter")
        cfg.model_type = cfg.model_type or spec.model_type
        spec.check_layer(cfg.layer)
        width = None if cfg.rows is None else cfg.rows["decoder"].shape[-1]
        if width is not None and width != spec.d_model:
            raise ValueError(
                f"SAE rows have {width} entries but this model's residual stream has d_model={spec.d_model}; "
                "use an SAE of this model."
            )
        cfg.target_modules = [f"{spec.layers}.{cfg.layer}"]
        return cfg

    def _create_and_replace(
        self,
        peft_config: SAESteeringConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        spec = spec_for(self.model)
        if isinstance(target, SAESteeringLayer):
            target.update_layer(adapter_name, peft_config, spec)
            return
        self._replace_module(parent, target_name, SAESteeringLayer(target, adapter_name, peft_config, spec), target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not isinstance(new_module, SAESteeringLayer):  # unloading: the decoder layer goes back as it was
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)


register_method(name="sae_steering", config_cls=SAESteeringConfig, model_cls=SAESteeringModel, prefix="sae_")
