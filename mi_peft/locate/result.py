"""LocalizationResult: per-component scores plus the metadata needed to trust and reuse them.

Scores are float32 CPU tensors per kind: ``"heads"`` ``[n_layers, n_heads]``, ``"neurons"``
``[n_layers, n_neurons]``, ``"residual"`` ``[n_layers]``, ``"sae"`` ``[n_layers, d_sae]`` (SAE latents, a row
per layer an SAE reads; see :mod:`~mi_peft.locate.sae_kind`). NaN marks an entry a method did not
score (e.g. a skipped layer): it is never selected, ranks last and plots blank. Inf is rejected.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from .._io import load_tensors_folder, save_tensors_folder
from ..arch import ArchSpec, _unwrap, spec_for
from ..components import HEAD_MODES, NEURON_MODES, ComponentSet, check_mode, head_parameters, neuron_parameters
from ..data import check_positive
from ..fingerprint import _ADAPTER_TAGS, check_fingerprint, model_fingerprint
from ._select import _Candidates, _candidates, _greedy_fixed, _greedy_qkvo, _order
from .result_views import compare_results, plot_result, result_frame
from .sae_kind import KIND as SAE_KIND
from .sae_kind import LatentSet, sae_shape, select_latents

KINDS: tuple[str, ...] = ("heads", "neurons", "residual", SAE_KIND)
SELECTABLE: tuple[str, ...] = ("heads", "neurons")
SCORES_FILE, META_FILE = "scores.safetensors", "result.json"
FORMAT_VERSION = 1


def count_parameters(model: nn.Module) -> int:
    """Exact base-model parameter count (tied weights once, adapter weights excluded, 4-bit unpacked)."""
    total = 0
    for name, param in _unwrap(model).named_parameters():
        if not any(tag in name for tag in _ADAPTER_TAGS):
            shape = getattr(getattr(param, "quant_state", None), "shape", None)
            total += torch.Size(shape).numel() if shape is not None else param.numel()
    return total


def _shape(spec: ArchSpec, kind: str, value: Any = None) -> tuple[Any, ...]:
    if kind == SAE_KIND:
        return sae_shape(spec.n_layers, value)
    return {"heads": (spec.n_layers, spec.n_heads), "neurons": (spec.n_layers, spec.n_neurons)}.get(
        kind, (spec.n_layers,)
    )


@dataclass(eq=False)
class LocalizationResult:
    """Scores of heads, neurons, residual layers or SAE latents, and how they were obtained.

    Args:
        scores (`dict[str, Tensor]`): any subset of ``"heads"``, ``"neurons"``, ``"residual"``, ``"sae"``.
        spec (`ArchSpec`): bound spec of the scored model (saved with the result, rebuilt exactly).
        method (`str`): localization method. metric (`str | None`): behaviour metric scored.
        model_fingerprint, data_hash (`str | None`): identity of the model and the contrastive data.
        n_model_parameters (`int | None`): total model parameters, for ``select(param_budget=<fraction>)``.
        extra (`dict`): JSON-able method details (positions, number of pairs, ...).

    Example:
        >>> result = LocalizationResult.from_model(model, {"heads": head_scores}, method="attribution_patching")
        >>> components = result.select(param_budget=0.001, mode="out")
    """

    scores: dict[str, torch.Tensor]
    spec: ArchSpec
    method: str
    metric: str | None = None
    model_fingerprint: str | None = None
    data_hash: str | None = None
    n_model_parameters: int | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    version: str = __version__
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, ArchSpec) or self.spec.n_layers <= 0:
            raise ValueError("`spec` must be a bound ArchSpec; pass `spec_for(model)`.")
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"`method` must be a non-empty string, got {self.method!r}.")
        unknown = sorted(set(self.scores) - set(KINDS))
        if not self.scores or unknown:
            raise ValueError(f"`scores` needs kinds among {KINDS}; got {sorted(self.scores)}.")
        self.scores = {kind: self._checked(kind, self.scores[kind]) for kind in KINDS if kind in self.scores}
        n = self.n_model_parameters
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"`n_model_parameters` must be a positive int or None, got {n!r}.")
        try:
            json.dumps(self.extra)
        except TypeError as err:
            raise ValueError(f"`extra` must be JSON-serialisable: {err}") from err

    def _checked(self, kind: str, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"scores[{kind!r}] must be a torch.Tensor, got {type(value).__name__}.")
        if tuple(value.shape) != _shape(self.spec, kind, value):
            raise ValueError(
                f"scores[{kind!r}] has shape {tuple(value.shape)}; this {self.spec.model_type} model needs "
                f"{_shape(self.spec, kind, value)}."
            )
        value = value.detach().to("cpu", torch.float32).contiguous()
        if torch.isinf(value).any():
            raise ValueError(f"scores[{kind!r}] contains infinite values; use NaN to mark unscored entries.")
        if torch.isnan(value).all():
            raise ValueError(f"scores[{kind!r}] is all NaN (nothing scored); leave the kind out instead.")
        return value

    @classmethod
    def from_model(
        cls, model: nn.Module, scores: Mapping[str, torch.Tensor], method: str, **kwargs
    ) -> LocalizationResult:
        """Build a result for ``model``, filling ``spec``, ``model_fingerprint`` and ``n_model_parameters``."""
        return cls(
            scores=dict(scores),
            spec=spec_for(model),
            method=method,
            model_fingerprint=model_fingerprint(model),
            n_model_parameters=count_parameters(model),
            **kwargs,
        )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={list(v.shape)}" for k, v in self.scores.items())
        return f"LocalizationResult(method={self.method!r}, metric={self.metric!r}, {self.spec.model_type}: {shapes})"

    @property
    def kinds(self) -> list[str]:
        return list(self.scores)

    # ---- selection -----------------------------------------------------------------------

    def select(
        self,
        top_k: int | Mapping[str, int] | None = None,
        param_budget: float | int | None = None,
        threshold: float | Mapping[str, float] | None = None,
        random: int | None = None,
        kinds: Sequence[str] = ("heads", "neurons"),
        mode: str | None = None,
        head_mode: str = "out",
        neuron_mode: str = "out",
        layers: Sequence[int] | None = None,
    ) -> ComponentSet | LatentSet:
        """Select heads/neurons by ``|score|`` with exactly one of ``top_k``, ``param_budget``, ``threshold``.

        ``kinds=("sae",)`` selects SAE latents instead (``top_k`` or ``threshold``, optionally ``random``)
        and returns a :class:`~mi_peft.locate.LatentSet` for :class:`~mi_peft.sae.SAESteeringConfig`.

        Several kinds are ranked together by ``|score|`` divided by their kind's largest ``|score|``
        (kinds on different scales compete fairly); ties go heads first, then by layer and index.
        Kinds in ``kinds`` that this result has no scores for are skipped.

        Args:
            top_k: the ``k`` best across ``kinds``, or per kind ``{"heads": 5, "neurons": 50}``
                (capped at the number of scored components).
            param_budget: a float in (0, 1) is a fraction of ``n_model_parameters`` (rounded down), a
                whole number >= 1 a parameter count. Greedy in rank order, skipping components that would
                overflow: ``ComponentSet.num_parameters(head_mode, neuron_mode)`` is <= the budget and no
                unselected component would still fit (``qkvo`` k/v rows counted once per layer and kv head).
            threshold: ``|score| >= threshold`` (a float, or one per kind).
            random: seed of a control set: select by the criterion, then draw uniformly at random
                (``torch.Generator().manual_seed(random)``) as many heads and neurons among the scored
                ones. Same parameter count, except in ``qkvo`` mode where k/v sharing depends on the draw.
            mode: shorthand for ``head_mode`` and/or ``neuron_mode`` wherever valid (``"out"``/``"scale"``
                both, ``"qkvo"``/``"bias"`` heads, ``"in_out"`` neurons); overrides them.
            head_mode, neuron_mode: sparse adapter modes used for parameter counting.
            layers: only components of these layers compete, and a ``random`` control draws from the same
                layers (PEFT's ``layers_to_transform``); ``None`` = every layer.
        """
        given = [
            n for n, v in (("top_k", top_k), ("param_budget", param_budget), ("threshold", threshold)) if v is not None
        ]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of `top_k`, `param_budget`, `threshold`; got {given or 'none'}.")
        if random is not None and (isinstance(random, bool) or not isinstance(random, int)):
            raise ValueError(f"`random` is a seed and must be an int, got {random!r}.")
        asked = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if SAE_KIND in asked:
            if asked != (SAE_KIND,):
                raise ValueError(f"SAE latents are selected on their own: pass kinds=('sae',), got {kinds!r}.")
            if layers is not None:
                raise ValueError("`layers` restricts heads and neurons; SAE latents live at one site, so drop it.")
            return select_latents(self, top_k, param_budget, threshold, random)
        head_mode, neuron_mode = _resolve_modes(mode, head_mode, neuron_mode)
        kinds = self._selectable(kinds)
        scores = {k: self._within_layers(self.scores[k], layers) for k in kinds}
        cand = _candidates([scores[k] for k in kinds])
        taken = self._taken(cand, kinds, top_k, param_budget, threshold, head_mode, neuron_mode)
        if not taken.any():
            raise ValueError(f"`{given[0]}` selects nothing here; pass a larger `top_k` or a lower `threshold`.")
        chosen = {kind: cand.flat[taken & (cand.kind == i)] for i, kind in enumerate(kinds)}
        if random is not None:
            gen = torch.Generator().manual_seed(random)
            for kind, flat in chosen.items():
                pool = (~torch.isnan(scores[kind].flatten())).nonzero().squeeze(1)
                chosen[kind] = pool[torch.randperm(pool.numel(), generator=gen)[: flat.numel()]]
        return self._component_set(chosen)

    def _taken(
        self,
        cand: _Candidates,
        kinds: tuple[str, ...],
        top_k: int | Mapping[str, int] | None,
        param_budget: float | int | None,
        threshold: float | Mapping[str, float] | None,
        head_mode: str,
        neuron_mode: str,
    ) -> torch.Tensor:
        """Mask over the ranked candidates ``cand``: those the one given criterion keeps."""
        if isinstance(top_k, Mapping):
            limits = _per_kind(top_k, kinds, "top_k", 1)
            taken = torch.zeros_like(cand.kind, dtype=torch.bool)
            for i, kind in enumerate(kinds):
                mine = cand.kind == i
                taken |= mine & (mine.cumsum(0) <= limits[kind])
            return taken
        if top_k is not None:
            check_positive(top_k, "top_k")
            return torch.arange(cand.kind.numel()) < top_k
        if threshold is not None:
            limits = _per_kind(threshold, kinds, "threshold", 0)
            return cand.raw >= torch.tensor([float(limits[k]) for k in kinds])[cand.kind]
        budget = self._budget(param_budget)
        costs = [
            head_parameters(self.spec, head_mode) if k == "heads" else neuron_parameters(self.spec, neuron_mode)
            for k in kinds
        ]
        if head_mode == "qkvo" and "heads" in kinds:
            taken = _greedy_qkvo(cand, costs, budget, self.spec, kinds.index("heads"))
        else:
            taken = _greedy_fixed(torch.tensor(costs)[cand.kind], budget)
        if not taken.any():
            raise ValueError(
                f"param_budget={param_budget!r} ({budget} parameters) selects nothing: the cheapest component "
                f"costs {min(costs)} parameters (head_mode={head_mode!r}, neuron_mode={neuron_mode!r}); "
                "pass a larger budget."
            )
        return taken

    def _within_layers(self, scores: torch.Tensor, layers: Sequence[int] | None) -> torch.Tensor:
        """``scores`` with every layer outside ``layers`` set to NaN (unscored), so ranking, budget and the
        random pool all skip it."""
        if layers is None:
            return scores
        keep = torch.zeros(scores.shape[0], dtype=torch.bool)
        keep[self.spec.layers_or_all(layers)] = True
        return scores.masked_fill(~keep[:, None], float("nan"))

    def _selectable(self, kinds: Sequence[str]) -> list[str]:
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if any(k not in SELECTABLE for k in kinds):
            raise ValueError(
                f"`kinds` takes {SELECTABLE} (or ('sae',) alone), got {list(kinds)} (residual layers are not "
                "adapter components; use `result.top('residual', k)`)."
            )
        present = [k for k in SELECTABLE if k in kinds and k in self.scores]
        if not present:
            raise ValueError(f"this result has no scores for kinds {list(kinds)}; it has {self.kinds}.")
        return present

    def _budget(self, value: float | int) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"`param_budget` must be a fraction in (0, 1) or a count >= 1, got {value!r}.")
        if value < 1:
            if self.n_model_parameters is None:
                raise ValueError(
                    "a fractional `param_budget` needs `n_model_parameters` on the result (build it with "
                    "`LocalizationResult.from_model`), or pass an absolute parameter count."
                )
            return int(value * self.n_model_parameters)
        if float(value) != int(value):
            raise ValueError(f"`param_budget` >= 1 is a parameter count and must be whole, got {value!r}.")
        return int(value)

    def _component_set(self, chosen: Mapping[str, torch.Tensor]) -> ComponentSet:
        groups: dict[str, dict[int, list[int]]] = {"heads": {}, "neurons": {}}
        for kind, flat in chosen.items():
            layers, index = flat // self.scores[kind].shape[1], flat % self.scores[kind].shape[1]
            for layer in layers.unique().tolist():
                groups[kind][layer] = index[layers == layer].tolist()
        return ComponentSet(heads=groups["heads"], neurons=groups["neurons"], spec=self.spec)

    def top(self, kind: str, k: int = 10, sign: str = "abs") -> list[tuple[tuple[int, ...], float]]:
        """The ``k`` best entries of ``kind``: ``((layer, index), score)``, ``((layer,), score)`` for residual.

        ``sign``: ``"abs"`` ranks by ``|score|`` (what ``select`` uses); ``"positive"`` takes the highest
        scores, ``"negative"`` the lowest (e.g. latents that fire more on the positive or the negative side).
        """
        check_positive(k, "k")
        if kind not in self.scores:
            raise ValueError(f"this result has no {kind!r} scores; it has {self.kinds}.")
        flat = self.scores[kind].flatten()
        width = 1 if kind == "residual" else self.scores[kind].shape[1]
        picked = _order(flat, sign)[:k].tolist()
        return [(((i,) if kind == "residual" else (i // width, i % width)), float(flat[i])) for i in picked]

    # ---- persistence ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write ``scores.safetensors`` + ``result.json`` into folder ``path`` atomically (temp folder, then rename)."""
        meta = {"format": "mi_peft.LocalizationResult", "format_version": FORMAT_VERSION, "kinds": self.kinds}
        meta.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("scores", "spec")}
        )
        meta["spec"] = dataclasses.asdict(self.spec)
        save_tensors_folder(path, SCORES_FILE, self.scores, META_FILE, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | None = None, ignore_fingerprint: bool = False
    ) -> LocalizationResult:
        """Read a saved result; with ``model``, a different base model raises ``FingerprintMismatchError``."""
        folder = Path(path)
        scores, meta = load_tensors_folder(folder, SCORES_FILE, META_FILE, "LocalizationResult", FORMAT_VERSION)
        spec = ArchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.pop("spec").items()})
        fields = {f.name for f in dataclasses.fields(cls)}
        result = cls(scores=scores, spec=spec, **{k: v for k, v in meta.items() if k in fields})
        if model is not None:
            check_fingerprint(result.model_fingerprint, model, f"LocalizationResult {folder}", ignore_fingerprint)
            mine = spec_for(model)
            if any(_shape(mine, k) != _shape(spec, k) for k in result.kinds):
                raise ValueError(f"LocalizationResult {folder} was scored on a differently sized model than this one.")
        return result

    # ---- inspection (see result_views) -----------------------------------------------------

    def to_frame(self) -> Any:
        """Rows ``kind, layer, index, score, rank`` as a pandas DataFrame, or a list of dicts without pandas.

        ``rank`` is 0 for each kind's highest ``|score|`` and None when unscored; ``index`` is None
        for residual rows. Rows are sorted by kind, then rank. pandas is optional.
        """
        return result_frame(self)

    def plot(self, path: str | os.PathLike, top_n: int = 30) -> list[Path]:
        """Write PNGs into folder ``path``: head heatmap, top-``top_n`` neurons and SAE latents by ``|score|``, residual curve."""
        return plot_result(self, path, top_n)

    def compare(self, other: LocalizationResult, k: int = 10) -> dict[str, dict[str, float]]:
        """Agreement with ``other`` per common kind: ``{kind: {spearman, spearman_signed, overlap, overlap_fraction, k}}``.

        ``spearman`` correlates the ``|score|`` ranks (what ``select`` uses), ``spearman_signed`` the
        signed scores; ties get their average rank and entries NaN in either result are left out
        (NaN when fewer than two remain or one side is constant). ``overlap`` is the size of the
        intersection of both top-``k`` sets by ``|score|``.
        """
        if not isinstance(other, LocalizationResult):
            raise TypeError(f"`compare` takes a LocalizationResult, got {type(other).__name__}.")
        return compare_results(self, other, k)


def _resolve_modes(mode: str | None, head_mode: str, neuron_mode: str) -> tuple[str, str]:
    if mode is not None:
        if mode not in HEAD_MODES and mode not in NEURON_MODES:
            raise ValueError(f"`mode` must be one of {sorted({*HEAD_MODES, *NEURON_MODES})}, got {mode!r}.")
        head_mode = mode if mode in HEAD_MODES else head_mode
        neuron_mode = mode if mode in NEURON_MODES else neuron_mode
    check_mode(head_mode, neuron_mode)
    return head_mode, neuron_mode


def _per_kind(value: Any, kinds: list[str], name: str, lowest: int) -> dict[str, Any]:
    """One limit per kind from a scalar or a dict; kinds missing from a dict select nothing."""
    values = dict(value) if isinstance(value, Mapping) else dict.fromkeys(kinds, value)
    numeric = int if lowest == 1 else (int, float)
    for kind, v in values.items():
        if kind not in SELECTABLE or isinstance(v, bool) or not isinstance(v, numeric) or not v >= lowest:
            what = "an integer >= 1" if lowest == 1 else "a number >= 0"
            raise ValueError(f"`{name}` must be {what} (or a dict of them per kind), got {name}[{kind!r}]={v!r}.")
    return {k: values.get(k, 0 if lowest == 1 else float("inf")) for k in kinds}
