"""``locate()``: score every head, neuron and residual layer of a model (or every SAE latent) from contrastive pairs.

Example:
    >>> from mi_peft import load_model
    >>> from mi_peft.data import ContrastivePairs
    >>> from mi_peft.locate import locate
    >>> model, tokenizer = load_model()
    >>> pairs = ContrastivePairs.load("recipes/data/refusal").subset(32)
    >>> result = locate(model, tokenizer, pairs, method="attribution_patching", metric="refusal")
    >>> result.top("heads", k=5)
    >>> readers = locate(model, tokenizer, ["The capital of France is"], method="attention", target_tokens=[" France"])
    >>> latents = locate(model, tokenizer, pairs, method="attribution_patching", sae=site)  # scores["sae"]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..arch import spec_for
from ..data import ContrastivePairs, check_texts, format_prompts, tokenize
from ..metrics import Metric, get_metric, metric_name
from . import attention, causal, gradient, magnitude, weight_gradient
from .magnitude import KINDS, check_positions
from .result import LocalizationResult
from .sae_kind import KIND as SAE_KIND

# name -> (function, needs a metric, allowed string positions)
METHODS: dict[str, tuple[Callable[..., magnitude.MethodOutput], bool, tuple[str, ...]]] = {
    "mean_diff": (magnitude.mean_diff, False, ("last", "all", "mean")),
    "activation_stats": (magnitude.activation_stats, False, ("last", "all", "mean")),
    "lape": (magnitude.lape_pairs, False, ("last", "all")),
    "grad_x_act": (gradient.grad_x_act, True, ("last", "all")),
    "attribution_patching": (gradient.attribution_patching, True, ("last", "all")),
    "weight_gradient": (weight_gradient.weight_gradient, True, ("all", "last")),
    "activation_patching": (causal.activation_patching, True, ("last", "all")),
    "ablation": (causal.ablation, True, ("last", "all")),
    "probe": (causal.probe, False, ("last", "all", "mean")),
}
# Methods that score heads by where they attend (no metric, no contrast needed): name -> allowed string positions.
# Kept apart from METHODS because they take prompts or pairs plus ``target_tokens`` rather than a contrast alone.
TARGET_METHODS: dict[str, tuple[str, ...]] = {"attention": attention.POSITIONS}
# Methods that score fewer kinds than KINDS (``components=None`` means all the kinds a method scores).
SCORED_KINDS: dict[str, tuple[str, ...]] = {"weight_gradient": weight_gradient.KINDS, "attention": ("heads",)}
# ``positions=None`` means "last" except here: a weight's gradient sums over every token that uses it.
DEFAULT_POSITIONS: dict[str, str] = {"weight_gradient": "all"}
DEFAULT_METRIC = "refusal"
_COMMON = {"model", "batches", "class_batches", "metric", "components", "positions", "progress", "sites"}


def locate(
    model: nn.Module,
    tokenizer: Any,
    pairs: ContrastivePairs | Mapping[str, Sequence[str]] | Sequence[str],
    method: str = "attribution_patching",
    components: str | Sequence[str] | None = None,
    metric: str | Metric | None = None,
    positions: str | Sequence[int] | None = None,
    batch_size: int = 8,
    chat: bool | None = None,
    progress: bool = True,
    sae: Any = None,
    **method_kwargs: Any,
) -> LocalizationResult:
    """Score components with ``method`` and return a :class:`LocalizationResult`.

    Args:
        model: a supported causal LM (or a PEFT-wrapped one); left in the mode and with the
            ``requires_grad`` flags it came with.
        tokenizer: its tokenizer (chat template used when present, unless ``chat=False``).
        pairs: :class:`ContrastivePairs` (positive = behaviour present). ``method="lape"`` also takes
            ``{class_name: [prompts]}`` with two or more classes; ``method="attention"`` also takes a list of prompts.
        method: one of :data:`METHODS` or :data:`TARGET_METHODS` (see the README table for what each score means).
        components: any of ``"heads"``, ``"neurons"``, ``"residual"``; ``None`` = every kind the method scores
            (all three; heads only for ``"attention"``; heads and neurons for ``"weight_gradient"``; ``"sae"`` when ``sae`` is given). ``"sae"`` scores the
            latents of ``sae`` (``mean_diff``, ``activation_stats`` or ``attribution_patching``) on its own.
        metric: metric name or callable ``(logits, batch) -> [batch]`` for gradient and causal methods;
            ``None`` means ``"refusal"`` for them. Magnitude methods and ``probe`` use none.
        positions: ``"last"`` (last real token), ``"all"``, ``"mean"`` (magnitude/probe only) or token
            indices (negative counts from the end, e.g. ``[-3, -2, -1]``); ``None``: ``"all"`` for
            ``weight_gradient`` (every token that trains the weights), ``"last"`` for the others.
        batch_size: pairs per forward pass.
        chat: use the chat template (``None``: when the tokenizer has one).
        progress: show a tqdm progress bar.
        sae: for ``components="sae"``: an :class:`~mi_peft.sae.SAESite` (``mi_peft.sae.load_sae``/``train_sae``),
            a sae-lens SAE, or a list of them at distinct layers; scores ``[n_layers, d_sae]`` go to ``scores["sae"]``.
        **method_kwargs: method options, e.g. ``max_batch``, ``neuron_sample``, ``seed`` (causal),
            ``mode`` (ablation), ``stat`` (activation_stats), ``min_prob`` (lape), ``test_size``,
            ``steps`` (probe), ``target_tokens`` (attention: strings whose prompt positions the heads are scored
            on attending to). Unknown options raise a ValueError listing the valid ones.
    """
    scored_kinds(method)  # an unknown method fails here
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if positions is None:
        positions = DEFAULT_POSITIONS.get(method, "last")
    fn, kinds, bound = _route(model, method, components, sae)
    if fn is None:
        return _locate_attention(
            model, tokenizer, pairs, components, metric, positions, batch_size, chat, progress, method_kwargs
        )
    _, needs_metric, allowed = METHODS[method]
    positions = check_positions(positions, allowed)
    options = {n for n in inspect.signature(fn).parameters if n not in _COMMON}
    unknown = sorted(set(method_kwargs) - options)
    if unknown:
        raise ValueError(f"method {method!r} got unknown options {unknown}; valid options: {sorted(options)}.")
    spec_for(model)  # unsupported architectures fail here, before any work
    kwargs: dict[str, Any] = dict(positions=positions, progress=progress, **bound, **method_kwargs)
    metric_label = None
    if needs_metric:
        metric_fn = get_metric(DEFAULT_METRIC if metric is None else metric, tokenizer)
        kwargs["metric"] = metric_fn
        metric_label = metric_name(metric_fn)
    elif metric is not None:
        warnings.warn(f"method {method!r} uses no metric; `metric={metric!r}` is ignored.", stacklevel=2)
    extra: dict[str, Any] = {"positions": positions, "batch_size": batch_size, "components": list(kinds)}
    extra["options"] = {k: v for k, v in method_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}
    if isinstance(pairs, Mapping):
        if method != "lape":
            raise ValueError(f"a dict of classes is only accepted by method='lape'; {method!r} needs ContrastivePairs.")
        class_batches = _class_batches(tokenizer, pairs, batch_size, chat)
        scores, method_extra = magnitude.lape(model, class_batches, **kwargs)
        data_hash = _hash_classes(pairs)
        extra["n_prompts"] = {name: len(prompts) for name, prompts in pairs.items()}
    else:
        if not isinstance(pairs, ContrastivePairs):
            raise ValueError(
                f"`pairs` must be ContrastivePairs (see ContrastivePairs.load), got {type(pairs).__name__}; "
                "a plain list of prompts is accepted by method='attention' only."
            )
        if len(pairs) == 0:
            raise ValueError("`pairs` is empty; locate needs at least one contrastive pair.")
        batches = list(pairs.batches(tokenizer, batch_size=batch_size, chat=chat))
        scores, method_extra = fn(model, batches, **kwargs)
        data_hash = pairs.data_hash()
        extra["n_pairs"] = len(pairs)
    extra.update(method_extra)
    return LocalizationResult.from_model(model, scores, method, metric=metric_label, data_hash=data_hash, extra=extra)


def scored_kinds(method: str) -> tuple[str, ...]:
    """The component kinds ``method`` scores (SAE latents aside): what ``components=None`` means, and the
    limit recipe validation checks ``locate.components`` against before a model loads."""
    if method not in METHODS and method not in TARGET_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted([*METHODS, *TARGET_METHODS])}.")
    return SCORED_KINDS.get(method, KINDS)


def _route(
    model: nn.Module, method: str, components: str | Sequence[str] | None, sae: Any
) -> tuple[Callable[..., magnitude.MethodOutput] | None, tuple[str, ...], dict[str, Any]]:
    """The scoring function, the kinds it scores and its bound arguments (``fn`` None: the attention path).

    SAE latents are scored by :data:`mi_peft.sae.latents.SAE_METHODS`, the one implementation of latent
    scores; the other kinds by :data:`METHODS`.
    """
    asked = (components,) if isinstance(components, str) else None if components is None else tuple(components)
    if sae is None and (asked is None or SAE_KIND not in asked):
        if method in TARGET_METHODS:
            return None, (), {}
        kinds = _check_components(scored_kinds(method) if asked is None else asked)
        return METHODS[method][0], kinds, {"components": kinds}
    if asked not in (None, (SAE_KIND,)):
        raise ValueError(
            f"SAE latents are scored on their own: pass components=('sae',) with `sae=`, got {components!r} "
            "(score heads, neurons or residual layers in a separate locate call)."
        )
    if sae is None:
        raise ValueError(
            "components=('sae',) needs `sae=`: an SAESite from `mi_peft.sae.load_sae(folder, model)` or "
            "`mi_peft.sae.train_sae(...)` (or a list of them, one per layer)."
        )
    from ..sae.latents import SAE_METHODS, resolve_sites

    if method not in SAE_METHODS:
        raise ValueError(f"method {method!r} does not score SAE latents; the 'sae' kind takes {sorted(SAE_METHODS)}.")
    return SAE_METHODS[method], (SAE_KIND,), {"sites": resolve_sites(model, sae)}


def _locate_attention(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    components: str | Sequence[str] | None,
    metric: Any,
    positions: Any,
    batch_size: int,
    chat: bool | None,
    progress: bool,
    options: dict[str, Any],
) -> LocalizationResult:
    """``method="attention"``: prompts (or pairs, positive minus negative) and ``target_tokens`` -> head scores."""
    if components is not None and _check_components(components) != SCORED_KINDS["attention"]:
        raise ValueError(
            f"method='attention' scores attention heads only; pass components=('heads',), got {components!r}."
        )
    positions = check_positions(positions, TARGET_METHODS["attention"])
    unknown = sorted(set(options) - {"target_tokens"})
    if unknown:
        raise ValueError(f"method 'attention' got unknown options {unknown}; valid options: ['target_tokens'].")
    if "target_tokens" not in options:
        raise ValueError("method='attention' needs `target_tokens=[...]`: the strings whose prompt positions to score.")
    if metric is not None:
        warnings.warn(f"method 'attention' uses no metric; `metric={metric!r}` is ignored.", stacklevel=3)
    spec_for(model)
    extra: dict[str, Any] = {"positions": positions, "batch_size": batch_size, "components": ["heads"]}
    if isinstance(data, ContrastivePairs):
        if len(data) == 0:
            raise ValueError("`pairs` is empty; locate needs at least one contrastive pair.")
        batches = list(data.batches(tokenizer, batch_size=batch_size, chat=chat))
        positive, negative = [p for p, _ in batches], [n for _, n in batches]
        data_hash, extra["n_pairs"] = data.data_hash(), len(data)
    else:
        if isinstance(data, Mapping):
            raise ValueError("a dict of classes is only accepted by method='lape'; 'attention' takes prompts or pairs.")
        prompts = check_texts([data] if isinstance(data, str) else data, "prompts")
        texts = format_prompts(tokenizer, prompts, chat=chat)
        positive = [tokenize(tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        negative, data_hash, extra["n_prompts"] = None, _hash_classes({"prompts": prompts}), len(prompts)
    scores, method_extra = attention.attention(
        model,
        tokenizer,
        positive,
        negative,
        target_tokens=options["target_tokens"],
        positions=positions,
        progress=progress,
    )
    extra.update(method_extra)
    return LocalizationResult.from_model(model, scores, "attention", data_hash=data_hash, extra=extra)


def _check_components(components: str | Sequence[str]) -> tuple[str, ...]:
    kinds = (components,) if isinstance(components, str) else tuple(components)
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"`components` must be a non-empty, duplicate-free selection of {KINDS}, got {components!r}"
            + (f" (unknown: {bad})." if bad else ".")
            + " SAE latents: components=('sae',) with `sae=`."
        )
    return kinds


def _class_batches(
    tokenizer: Any, classes: Mapping[str, Sequence[str]], batch_size: int, chat: bool | None
) -> dict[str, list[dict]]:
    if len(classes) < 2:
        raise ValueError(f"lape needs at least two classes, got {list(classes)}.")
    out = {}
    for name, prompts in classes.items():
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(f"class {name!r} must be a non-empty list of prompts, got {prompts!r:.80}.")
        texts = format_prompts(tokenizer, prompts, chat=chat)
        out[str(name)] = [tokenize(tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return out


def _hash_classes(classes: Mapping[str, Sequence[str]]) -> str:
    content = {str(k): list(v) for k, v in classes.items()}
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]
