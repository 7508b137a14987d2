"""Steering directions per layer from contrastive pairs: diff-in-means, PCA of differences, linear probes.

A :class:`Directions` holds one unit vector per layer plus its scale (``norms``), so that
``norms[l] * vectors[l]`` is the shift in the residual stream (``hook_resid_post``) that takes
the negative examples to the positive ones along the direction. Directions are values: they add,
subtract, negate and scale like repeng's ``ControlVector``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__, capture
from .._io import load_tensors_folder, save_tensors_folder
from ..arch import spec_for
from ..fingerprint import check_fingerprint, fingerprints_match, model_fingerprint
from .probes import fit_logistic, logistic_accuracy

Method = Literal["mean_diff", "pca", "probe"]
METHODS: tuple[str, ...] = ("mean_diff", "pca", "probe")
VECTORS_FILE, META_FILE = "directions.safetensors", "directions.json"
PROBE_L2 = 1e-2
"""L2 penalty of the probe's logistic regression on rescaled activations (keeps separable data finite)."""
_UNIT_ATOL = 1e-4


@dataclass(eq=False)
class Directions:
    """One unit direction per layer of the residual stream, with its scale.

    Args:
        vectors (`dict[int, Tensor]`): layer -> unit vector ``[d_model]`` (float32, CPU).
        norms (`dict[int, float]`): layer -> scale: the mean projection gap
            ``mean_i (h_pos_i - h_neg_i) · vectors[l]`` (> 0). For ``mean_diff`` this is the norm of
            ``mean(pos) - mean(neg)``. ``norms[l] * vectors[l]`` is the raw vector that arithmetic acts on.
        method (`str`): how the directions were found. model_type (`str`): ``config.model_type``.
        model_fingerprint (`str | None`), extra (`dict`): provenance and method details (JSON-able).

    Arithmetic acts on the raw vectors and renormalises: ``a + b`` and ``a - b`` need the same
    layers, ``2 * d`` doubles ``norms`` and keeps ``vectors``, ``-d`` flips ``vectors``.
    """

    vectors: dict[int, torch.Tensor]
    norms: dict[int, float]
    method: str
    model_type: str
    model_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError("`vectors` must be a non-empty dict {layer: Tensor[d_model]}.")
        if set(self.vectors) != set(self.norms):
            raise ValueError(f"`norms` layers {sorted(self.norms)} must match `vectors` layers {sorted(self.vectors)}.")
        vectors, norms, width = {}, {}, None
        for layer in sorted(self.vectors):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"layer keys must be non-negative ints, got {layer!r}.")
            v = self.vectors[layer]
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or (width is not None and v.numel() != width):
                raise ValueError(
                    f"vectors[{layer}] must be a 1-D tensor [d_model] like the others, got {_describe(v)}."
                )
            width = v.numel()
            v = v.detach().to("cpu", torch.float32).contiguous()
            norm = float(v.norm())
            if not math.isfinite(norm) or norm == 0.0:
                raise ValueError(
                    f"vectors[{layer}] is {'zero' if norm == 0 else 'NaN/inf'}; a direction must be finite and non-zero."
                )
            if abs(norm - 1.0) > _UNIT_ATOL:
                raise ValueError(
                    f"vectors[{layer}] has norm {norm:.6g}, not 1; build from raw vectors with `Directions.from_raw`."
                )
            scale = self.norms[layer]
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"norms[{layer}] must be a finite number > 0, got {scale!r}.")
            vectors[layer], norms[layer] = v, float(scale)
        self.vectors, self.norms = vectors, norms
        try:
            json.dumps(self.extra)
        except TypeError as err:
            raise ValueError(f"`extra` must be JSON-serialisable: {err}") from err

    @classmethod
    def from_raw(cls, raw: Mapping[int, torch.Tensor], method: str, model_type: str, **kwargs: Any) -> Directions:
        """Directions from raw vectors: ``vectors`` are their unit versions and ``norms`` their lengths."""
        vectors, norms = {}, {}
        for layer, v in raw.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"raw[{layer!r}] must be a torch.Tensor, got {type(v).__name__}.")
            v = v.detach().to("cpu", torch.float32)
            norm = float(v.norm())
            if not math.isfinite(norm) or norm == 0.0:
                raise ValueError(
                    f"raw vector for layer {layer} is {'zero' if norm == 0 else 'NaN/inf'}; nothing to normalise."
                )
            vectors[layer], norms[layer] = v / norm, norm
        return cls(vectors=vectors, norms=norms, method=method, model_type=model_type, **kwargs)

    @property
    def layers(self) -> list[int]:
        return list(self.vectors)

    @property
    def d_model(self) -> int:
        return next(iter(self.vectors.values())).numel()

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer not in self.vectors:
            raise KeyError(f"no direction for layer {layer!r}; layers are {self.layers}.")
        return self.vectors[layer]

    def raw(self, layer: int) -> torch.Tensor:
        """``norms[layer] * vectors[layer]``: the shift from negative to positive activations."""
        return self[layer] * self.norms[layer]

    def __repr__(self) -> str:
        return f"Directions(method={self.method!r}, model_type={self.model_type!r}, layers={self.layers}, d_model={self.d_model})"

    # ---- arithmetic (on raw vectors) -----------------------------------------------------

    def _combine(self, other: Any, op: str) -> Directions:
        if not isinstance(other, Directions):
            raise TypeError(f"unsupported operand type(s) for {op}: 'Directions' and '{type(other).__name__}'")
        if self.layers != other.layers or self.d_model != other.d_model or self.model_type != other.model_type:
            raise ValueError(
                f"cannot {op} Directions with layers {self.layers} (d_model {self.d_model}, {self.model_type}) and "
                f"layers {other.layers} (d_model {other.d_model}, {other.model_type}); they must match."
            )
        fps = [fp for fp in (self.model_fingerprint, other.model_fingerprint) if fp is not None]
        if len(fps) == 2 and not fingerprints_match(*fps):  # one model in two dtypes still matches
            raise ValueError(f"cannot {op} Directions from different base models (fingerprints {sorted(fps)}).")
        sign = 1.0 if op == "+" else -1.0
        raw = {layer: self.raw(layer) + sign * other.raw(layer) for layer in self.layers}
        method = self.method if self.method == other.method else f"{self.method}{op}{other.method}"
        return Directions.from_raw(raw, method, self.model_type, model_fingerprint=next(iter(fps), None))

    def _scaled(self, factor: Any, op: str) -> Directions:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            raise TypeError(f"unsupported operand type(s) for {op}: 'Directions' and '{type(factor).__name__}'")
        if op == "/":
            if factor == 0:
                raise ZeroDivisionError("cannot divide Directions by zero.")
            factor = 1.0 / factor
        if factor == 0 or not math.isfinite(factor):
            raise ValueError(
                f"scaling Directions by {factor!r} gives zero or non-finite vectors; use a finite non-zero factor."
            )
        sign = 1.0 if factor > 0 else -1.0
        return Directions(
            vectors={layer: sign * v for layer, v in self.vectors.items()},
            norms={layer: abs(factor) * n for layer, n in self.norms.items()},
            method=self.method,
            model_type=self.model_type,
            model_fingerprint=self.model_fingerprint,
            extra=dict(self.extra),
        )

    def __add__(self, other: Any) -> Directions:
        return self._combine(other, "+")

    def __sub__(self, other: Any) -> Directions:
        return self._combine(other, "-")

    def __mul__(self, factor: Any) -> Directions:
        return self._scaled(factor, "*")

    def __rmul__(self, factor: Any) -> Directions:
        return self._scaled(factor, "*")

    def __truediv__(self, factor: Any) -> Directions:
        return self._scaled(factor, "/")

    def __neg__(self) -> Directions:
        return self._scaled(-1.0, "*")

    # ---- persistence ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write ``directions.safetensors`` (``direction.<layer>``) and ``directions.json`` atomically."""
        meta = {
            "format": "mi_peft.Directions",
            "format_version": 1,
            "method": self.method,
            "model_type": self.model_type,
            "model_fingerprint": self.model_fingerprint,
            "norms": {str(layer): n for layer, n in self.norms.items()},
            "d_model": self.d_model,
            "version": __version__,
            "extra": self.extra,
        }
        tensors = {f"direction.{layer}": v for layer, v in self.vectors.items()}
        save_tensors_folder(path, VECTORS_FILE, tensors, META_FILE, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | None = None, ignore_fingerprint: bool = False
    ) -> Directions:
        """Read saved directions; with ``model``, refuse another base model (``FingerprintMismatchError``)."""
        folder = Path(path)
        tensors, meta = load_tensors_folder(folder, VECTORS_FILE, META_FILE, "Directions", format_version=1)
        vectors = {}
        for key, value in tensors.items():
            match = re.fullmatch(r"direction\.(\d+)", key)
            if match is None:
                raise ValueError(f"unexpected tensor {key!r} in {folder / VECTORS_FILE}; expected 'direction.<layer>'.")
            vectors[int(match.group(1))] = value
        norms = {int(layer): n for layer, n in meta["norms"].items()}
        keys = ("method", "model_type", "model_fingerprint", "extra")
        result = cls(vectors=vectors, norms=norms, **{k: meta[k] for k in keys})
        if model is not None:
            spec = spec_for(model)
            if spec.model_type != result.model_type or spec.d_model != result.d_model:
                raise ValueError(
                    f"Directions {folder} are for a {result.model_type} model with d_model {result.d_model}, not this "
                    f"{spec.model_type} model (d_model {spec.d_model})."
                )
            check_fingerprint(result.model_fingerprint, model, f"Directions {folder}", ignore_fingerprint)
        return result


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def directions(
    model: nn.Module,
    tokenizer: Any,
    pairs: Any,
    method: Method = "mean_diff",
    layers: Iterable[int] | None = None,
    batch_size: int = 8,
    positions: Literal["last", "mean"] = "last",
    chat: bool | None = None,
    progress: bool = True,
) -> Directions:
    """Steering directions of the residual stream (decoder layer outputs) from contrastive pairs.

    Args:
        pairs (`ContrastivePairs`): positive (behaviour present) and negative examples, paired.
        method: ``"mean_diff"`` (mean(pos) - mean(neg)); ``"pca"`` (first principal component of the
            paired differences, uncentred, i.e. of the differences taken with both signs; sign chosen
            so positives project higher); ``"probe"`` (weight of an L2-regularised logistic regression
            per layer on centred activations rescaled by one RMS per layer).
        layers: layers to compute (default all). positions: ``"last"`` token or ``"mean"`` over tokens.
        chat: chat-format the prompts (default: when the tokenizer has a chat template).

    Example:
        >>> dirs = directions(model, tokenizer, pairs, method="mean_diff", layers=[10, 12])
        >>> dirs[10].shape, dirs.norms[10]  # unit vector [d_model], norm of the mean difference
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if positions not in ("last", "mean"):
        raise ValueError(f"`positions` must be 'last' or 'mean' for directions, got {positions!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    spec = spec_for(model)
    chosen = spec.layers_or_all(layers)
    if method == "probe" and len(pairs) < 2:
        raise ValueError(f"the probe needs at least 2 pairs, got {len(pairs)}.")
    pos, neg = capture_pairs(model, tokenizer, pairs, "residual", chosen, batch_size, positions, chat, progress)
    diff = pos - neg  # [n_pairs, n_layers, d_model]
    extra: dict[str, Any] = {"n_pairs": pos.shape[0], "positions": positions, "layers": chosen}
    if hasattr(pairs, "data_hash"):
        extra["data_hash"] = pairs.data_hash()
    if method == "mean_diff":
        raw = diff.mean(0)
    else:
        if method == "pca":
            _, s, vh = torch.linalg.svd(diff.transpose(0, 1).double(), full_matrices=False)
            unit = vh[:, 0].float()
            extra["explained_variance"] = dict(
                zip(map(str, chosen), (s[:, 0] ** 2 / (s**2).sum(-1)).tolist(), strict=True)
            )
        else:
            unit, accuracy = _probe(pos, neg)
            extra["probe_accuracy"] = dict(zip(map(str, chosen), accuracy.tolist(), strict=True))
        unit = unit / unit.norm(dim=-1, keepdim=True)
        gap = (diff.mean(0) * unit).sum(-1, keepdim=True)  # mean projection gap; its sign orients the vector
        raw = gap * unit
    flat = [chosen[i] for i in (raw.norm(dim=-1) == 0).nonzero().squeeze(1).tolist()]
    if flat:
        raise ValueError(
            f"positive and negative activations do not differ along the {method} direction at layers {flat}."
        )
    return Directions.from_raw(
        {layer: raw[i] for i, layer in enumerate(chosen)},
        method=method,
        model_type=spec.model_type,
        model_fingerprint=model_fingerprint(model),
        extra=extra,
    )


def capture_pairs(
    model: nn.Module,
    tokenizer: Any,
    pairs: Any,
    kind: str,
    layers: list[int],
    batch_size: int,
    positions: str,
    chat: bool | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of ``kind`` (``"residual"`` or ``"heads"``) for every pair at ``positions``.

    Returns positive and negative float32 CPU tensors ``[n_pairs, n_layers, ...]``; the model runs in
    eval mode without gradients and gets its training mode back.
    """
    device = next(model.parameters()).device
    out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    was_training = model.training
    model.eval()
    try:
        batches = pairs.batches(tokenizer, batch_size=batch_size, chat=chat)
        total = math.ceil(len(pairs) / batch_size)
        with torch.no_grad():
            for pair in tqdm(batches, total=total, desc=f"{kind} directions", disable=not progress, leave=False):
                for batch, store in zip(pair, out, strict=True):
                    inputs = {
                        k: v.to(device)
                        for k, v in batch.items()
                        if k in ("input_ids", "attention_mask", "position_ids")
                    }
                    mask = inputs["attention_mask"]
                    with capture.record(model, positions=positions, attention_mask=mask, **{kind: layers}) as cache:
                        model(**inputs)
                    store.append(cache.stack(kind).float().cpu())
    finally:
        model.train(was_training)
    pos, neg = torch.cat(out[0]), torch.cat(out[1])
    if pos.shape != neg.shape:
        raise ValueError(
            f"positive and negative batches differ in size ({pos.shape[0]} vs {neg.shape[0]}); pairs must align."
        )
    return pos, neg


def _probe(pos: torch.Tensor, neg: torch.Tensor, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression per layer (:func:`fit_logistic`, batched over layers) on centred activations.

    Each layer is divided by ONE scale (its RMS), not per feature: per-feature standardisation would
    stretch the space and tilt the weight away from the direction the classes differ along.
    Returns the unit-free weight ``[n_layers, d_model]`` (the normal of the decision boundary) and the
    training accuracy per layer.
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])])
    centred = x - x.mean(0)
    z = centred / centred.pow(2).mean(dim=(0, 2), keepdim=True).sqrt().clamp_min(1e-12)
    weight, bias = fit_logistic(z, y, l2=PROBE_L2, steps=steps)
    return weight, logistic_accuracy(z, y, weight, bias)
