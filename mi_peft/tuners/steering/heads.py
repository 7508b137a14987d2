"""Head steering directions (Inference-Time Intervention, Li et al. 2023) from contrastive pairs.

:func:`head_directions` captures every head's output (``hook_z``, the input of the attention output
projection) on positive and negative prompts and returns, per head, the mass-mean direction
(mean positive minus mean negative activation, as a unit vector) and ``sigma``: the standard deviation
of all the activations (both sides) projected on that direction. Head steering adds
``alpha * sigma * direction`` to the head's output; pick the heads with the ``probe`` locate method and
build the adapter with :meth:`SteeringConfig.from_head_probes` (its checks live here, in
:func:`top_head_fields` and :func:`check_head_vectors`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ...arch import spec_for
from ...fingerprint import fingerprints_match, model_fingerprint
from ...locate.directions import capture_pairs
from .condition import unit_vector


@dataclass(eq=False)
class HeadDirections:
    """Per head: a unit direction ``[head_dim]``, the std ``sigma`` of activations along it, and its scale.

    Args:
        vectors (`dict[int, dict[int, Tensor]]`): ``{layer: {head: unit vector [head_dim]}}`` (float32, CPU).
        stds (`dict[int, dict[int, float]]`): ``{layer: {head: sigma}}``: std (population, over the positive
            and negative examples together) of the head's activation projected on its direction.
        norms (`dict[int, dict[int, float]]`): ``{layer: {head: ||mean(pos) - mean(neg)||}}``.
        model_type (`str`), model_fingerprint (`str | None`), extra (`dict`): provenance.
    """

    vectors: dict[int, dict[int, torch.Tensor]]
    stds: dict[int, dict[int, float]]
    norms: dict[int, dict[int, float]]
    model_type: str
    model_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        n = sum(len(heads) for heads in self.vectors.values())
        return f"HeadDirections({n} heads in layers {sorted(self.vectors)}, model_type={self.model_type!r})"


@torch.no_grad()
def head_directions(
    model: nn.Module,
    tokenizer: Any,
    pairs: Any,
    *,
    layers: Iterable[int] | None = None,
    positions: Literal["last", "mean"] = "last",
    batch_size: int = 8,
    chat: bool | None = None,
    progress: bool = True,
) -> HeadDirections:
    """Mass-mean direction and activation std of every head in ``layers`` (default: all layers).

    Args:
        model: the base model. tokenizer: its tokenizer.
        pairs (`ContrastivePairs`): positive (behaviour present) and negative examples, paired.
        layers: layers whose heads are measured. positions: ``"last"`` real token or ``"mean"`` over tokens.
        batch_size: pairs per forward pass. chat: chat-format the prompts (default: when the tokenizer has a
            chat template).

    A head whose positive and negative means are equal has no direction and is left out (listed in
    ``extra["flat_heads"]``).

    Example:
        >>> result = locate(model, tok, pairs, method="probe", components="heads")
        >>> dirs = head_directions(model, tok, pairs)
        >>> cfg = SteeringConfig.from_head_probes(result, dirs, top_k=16, alpha=15.0)
    """
    if positions not in ("last", "mean"):
        raise ValueError(f"`positions` must be 'last' or 'mean' for head directions, got {positions!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    spec = spec_for(model)
    chosen = spec.layers_or_all(layers)
    pos, neg = capture_pairs(model, tokenizer, pairs, "heads", chosen, batch_size, positions, chat, progress)
    shift = pos.double().mean(0) - neg.double().mean(0)  # [L, H, D]
    norm = shift.norm(dim=-1)
    unit = shift / norm.clamp_min(1e-300)[..., None]
    proj = torch.einsum("nlhd,lhd->nlh", torch.cat([pos, neg]).double(), unit)
    sigma = proj.std(dim=0, unbiased=False)  # population std, as ITI computes it
    vectors: dict[int, dict[int, torch.Tensor]] = {}
    stds: dict[int, dict[int, float]] = {}
    norms: dict[int, dict[int, float]] = {}
    flat = []
    for i, layer in enumerate(chosen):
        for head in range(spec.n_heads):
            if not float(norm[i, head]) > 0 or not float(sigma[i, head]) > 0:
                flat.append([layer, head])
                continue
            vectors.setdefault(layer, {})[head] = unit[i, head].float()
            stds.setdefault(layer, {})[head] = float(sigma[i, head])
            norms.setdefault(layer, {})[head] = float(norm[i, head])
    if not vectors:
        raise ValueError("positive and negative head activations do not differ in any head of the chosen layers.")
    extra: dict[str, Any] = {"n_pairs": pos.shape[0], "positions": positions, "layers": chosen, "flat_heads": flat}
    if hasattr(pairs, "data_hash"):
        extra["data_hash"] = pairs.data_hash()
    return HeadDirections(
        vectors=vectors,
        stds=stds,
        norms=norms,
        model_type=spec.model_type,
        model_fingerprint=model_fingerprint(model),
        extra=extra,
    )


def top_head_fields(
    result: Any, directions: Any, top_k: int, head_stds: Mapping[int, Mapping[int, float]] | None
) -> tuple[dict[int, dict[int, Any]], dict[int, dict[int, float]], dict[str, Any]]:
    """``head_directions``, ``head_stds`` and provenance fields of the ``top_k`` heads of ``result``
    (see :meth:`SteeringConfig.from_head_probes`)."""
    scores = getattr(result, "scores", None)
    if not isinstance(scores, Mapping) or "heads" not in scores:
        kinds = sorted(scores) if isinstance(scores, Mapping) else type(result).__name__
        raise ValueError(f"`result` must be a LocalizationResult with 'heads' scores (method='probe'); got {kinds}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive int, got {top_k!r}.")
    picked = [tuple(index) for index, _ in result.top("heads", top_k)]
    if len(picked) < top_k:
        raise ValueError(f"`top_k={top_k}` but the result scores only {len(picked)} heads (the others are NaN).")
    vectors = getattr(directions, "vectors", directions)
    stds = head_stds if head_stds is not None else getattr(directions, "stds", None)
    if not isinstance(vectors, Mapping) or not all(isinstance(v, Mapping) for v in vectors.values()):
        raise ValueError(
            "`directions` must be a HeadDirections (`mi_peft.tuners.steering.head_directions`) or a "
            f"{{layer: {{head: vector}}}} dict, got {type(directions).__name__} (residual-stream directions "
            "belong in `from_directions`)."
        )
    if stds is None:
        raise ValueError(
            "head steering needs each head's sigma: pass a HeadDirections (it carries `stds`) or `head_stds=`."
        )
    chosen: dict[int, dict[int, Any]] = {}
    sigma: dict[int, dict[int, float]] = {}
    for layer, head in picked:
        vector = (vectors.get(layer) or {}).get(head)
        if vector is None:
            have = {k: sorted(v) for k, v in vectors.items()}
            raise ValueError(f"`directions` has no vector for layer {layer} head {head} (a top head); it has {have}.")
        value = (stds.get(layer) or {}).get(head)
        if value is None:
            raise ValueError(f"no sigma (`head_stds`) for layer {layer} head {head}, one of the top heads.")
        chosen.setdefault(layer, {})[head] = vector
        sigma.setdefault(layer, {})[head] = value
    spec = getattr(result, "spec", None)
    width = torch.as_tensor(next(iter(chosen[picked[0][0]].values()))).numel()
    if spec is not None and width != spec.head_dim:
        raise ValueError(
            f"head directions have {width} entries but the result's {spec.model_type} model has "
            f"head_dim={spec.head_dim}; compute them on the same model."
        )
    fingerprints = [
        fp for fp in (getattr(result, "model_fingerprint", None), getattr(directions, "model_fingerprint", None)) if fp
    ]
    if len(fingerprints) == 2 and not fingerprints_match(*fingerprints):
        raise ValueError("`result` and `directions` were computed on different models (fingerprints differ).")
    provenance: dict[str, Any] = {}
    if fingerprints:
        provenance["base_model_fingerprint"] = fingerprints[0]
    if spec is not None:
        provenance["model_type"] = spec.model_type
    return chosen, sigma, provenance


def check_head_vectors(
    vectors: Any, stds: dict[int, dict[int, float]] | None
) -> dict[int, dict[int, torch.Tensor]] | None:
    """``{layer: {head: unit vector}}`` (float32, CPU); every head needs a ``head_stds`` entry and vice versa."""
    if vectors is None or (isinstance(vectors, Mapping) and not vectors):
        return None
    if not isinstance(vectors, Mapping):
        raise ValueError(f"`head_directions` must be a {{layer: {{head: vector}}}} dict, got {type(vectors).__name__}.")
    out: dict[int, dict[int, torch.Tensor]] = {}
    for layer, heads in vectors.items():
        if not isinstance(heads, Mapping) or not heads:
            raise ValueError(f"`head_directions[{layer}]` must be a non-empty {{head: vector}} dict, got {heads!r}.")
        out[_index(layer, "`head_directions` layer")] = {
            _index(head, f"`head_directions[{layer}]` key"): unit_vector(v, f"`head_directions[{layer}][{head}]`")
            for head, v in heads.items()
        }
    sizes = {v.numel() for heads in out.values() for v in heads.values()}
    if len(sizes) > 1:
        raise ValueError(f"`head_directions` vectors have different lengths {sorted(sizes)}; all must be [head_dim].")
    given = {(layer, head) for layer, heads in out.items() for head in heads}
    sigma = {(layer, head) for layer, heads in (stds or {}).items() for head in heads}
    if given != sigma:
        raise ValueError(
            "head steering adds alpha * sigma * unit(direction) and needs one `head_stds` entry (sigma) per head of "
            f"`head_directions`: heads without sigma {sorted(given - sigma)}, sigma without a direction "
            f"{sorted(sigma - given)}. Compute both with `mi_peft.tuners.steering.head_directions(...)`."
        )
    return out


def _index(value: Any, what: str) -> int:
    """An int index (JSON keys arrive as digit strings); the model checks its range when the adapter is created."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be an int, got {value!r}.")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be an int, got {value!r}.") from None
