"""Behaviour metrics: functions of the logits that localization methods differentiate or patch.

A :data:`Metric` maps ``(logits [batch, pos, vocab], batch)`` to one score per example ``[batch]``;
``batch`` is the dict yielded by :meth:`mi_peft.data.ContrastivePairs.batches` (left-padded, so
position ``-1`` is every row's last real token). Every metric built here carries a name
(:func:`metric_name`) that results record. Last-position metrics (all but :func:`completion_logprob`)
also accept logits computed with ``model(..., logits_to_keep=1)``, which skips the unembedding elsewhere.

Token sets are scored with ``logsumexp`` of the logits: ``logsumexp(logits[pos]) - logsumexp(logits[neg])``
equals ``log P(any positive token) - log P(any negative token)`` (the softmax normaliser cancels), so a
set behaves like one event and likely tokens dominate rare ones. Each string contributes the first
token of its encoding (without special tokens); its leading-space variant (``"Sure"`` <-> ``" Sure"``)
is added too when that variant is a single token, i.e. a whole word rather than a generic fragment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Metric = Callable[[Tensor, Mapping[str, Tensor]], Tensor]

# Refusal openers ("I cannot", "Sorry", "As an AI", "Unfortunately", "I apologize") vs compliance openers.
# On the embedded SmolLM2-135M-Instruct, 64 held-out harmful vs 64 harmless prompts give mean
# refusal_metric -1.90 vs -3.05 (harmful above harmless in 72% of cross pairs).
REFUSAL_TOKENS: tuple[str, ...] = ("I", "Sorry", "As", "Unfortunately", "cannot", "apologize")
COMPLIANCE_TOKENS: tuple[str, ...] = ("Sure", "Certainly", "Absolutely", "Here", "The", "To", "In", "A", "One", "1")

METRICS: tuple[str, ...] = ("refusal", "logit_diff", "logprob", "choice")


def _named(fn: Metric, name: str) -> Metric:
    fn.metric_name = name  # type: ignore[attr-defined]
    return fn


def metric_name(metric: Metric) -> str:
    """The recorded name of a metric: its ``metric_name``, else its function or class name."""
    name = getattr(metric, "metric_name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(metric, "__name__", None) or type(metric).__name__
    return "custom" if name == "<lambda>" else name


def token_ids(tokenizer: Any, tokens: Sequence[str], name: str = "tokens") -> list[int]:
    """Deduplicated first-token ids of ``tokens`` plus single-token leading-space variants (see module docs)."""
    if isinstance(tokens, str) or not isinstance(tokens, Sequence) or len(tokens) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of strings, got {tokens!r}.")
    ids: list[int] = []
    for tok in tokens:
        if not isinstance(tok, str):
            raise ValueError(f"`{name}` must hold strings, got {type(tok).__name__} ({tok!r}).")
        main = tokenizer.encode(tok, add_special_tokens=False)
        if not main:
            raise ValueError(f"token string {tok!r} in `{name}` encodes to no tokens; remove it or use a real word.")
        ids.append(int(main[0]))
        variant = tok[1:] if tok.startswith(" ") else " " + tok
        alt = tokenizer.encode(variant, add_special_tokens=False) if variant else []
        if len(alt) == 1:
            ids.append(int(alt[0]))
    return sorted(set(ids))


def _last(logits: Tensor) -> Tensor:
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be [batch, pos, vocab], got shape {tuple(logits.shape)}.")
    return logits[:, -1, :].float()


def _check_vocab(logits: Tensor, ids: Sequence[int]) -> None:
    if max(ids) >= logits.shape[-1]:
        raise ValueError(
            f"token id {max(ids)} is outside the logits' vocabulary of {logits.shape[-1]}; "
            "the tokenizer does not match the model."
        )


def logit_diff(tokenizer: Any, positive_tokens: Sequence[str], negative_tokens: Sequence[str]) -> Metric:
    """``logsumexp`` of the last-position logits over ``positive_tokens`` minus over ``negative_tokens``.

    Example:
        >>> metric = logit_diff(tokenizer, ["Yes"], ["No"])
        >>> metric(model(**batch).logits, batch)   # [batch]; higher = more "Yes"
    """
    pos = token_ids(tokenizer, positive_tokens, "positive_tokens")
    neg = token_ids(tokenizer, negative_tokens, "negative_tokens")
    shared = sorted(set(pos) & set(neg))
    if shared:
        raise ValueError(
            f"token ids {shared} ({[tokenizer.decode([i]) for i in shared]}) are in both `positive_tokens` and "
            "`negative_tokens`; the sets must be disjoint."
        )
    pos_t, neg_t = torch.tensor(pos), torch.tensor(neg)

    def metric(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        last = _last(logits)
        _check_vocab(logits, pos + neg)
        return last[:, pos_t.to(last.device)].logsumexp(-1) - last[:, neg_t.to(last.device)].logsumexp(-1)

    return _named(metric, f"logit_diff({'|'.join(positive_tokens)} vs {'|'.join(negative_tokens)})")


def refusal_metric(tokenizer: Any) -> Metric:
    """:func:`logit_diff` of :data:`REFUSAL_TOKENS` vs :data:`COMPLIANCE_TOKENS`; higher = more refusal."""
    return _named(logit_diff(tokenizer, REFUSAL_TOKENS, COMPLIANCE_TOKENS), "refusal")


def completion_logprob() -> Metric:
    """Sum of ``log p(token)`` over the completion tokens (``batch["completion_mask"]``), per example."""

    def metric(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        if "completion_mask" not in batch or "input_ids" not in batch:
            raise ValueError(
                "completion_logprob needs batch['input_ids'] and batch['completion_mask']; build the pairs with "
                "ContrastivePairs.from_completions (or load with `prompt_key=`)."
            )
        ids, mask = batch["input_ids"].to(logits.device), batch["completion_mask"].to(logits.device)
        if ids.shape != logits.shape[:2]:
            raise ValueError(f"input_ids {tuple(ids.shape)} do not match logits {tuple(logits.shape[:2])}.")
        pred = logits[:, :-1].float()  # position t predicts token t + 1
        target = ids[:, 1:]
        token_lp = pred.gather(-1, target[..., None]).squeeze(-1) - pred.logsumexp(-1)
        return (token_lp * mask[:, 1:].to(token_lp.dtype)).sum(-1)

    return _named(metric, "logprob")


def choice_prob(tokenizer: Any, choices: Sequence[str] = ("A", "B"), target: int = 0) -> Metric:
    """Probability of ``choices[target]`` among the choices at the last position (renormalised over them)."""
    if isinstance(choices, str) or len(choices) < 2:
        raise ValueError(f"`choices` must list at least two answer strings, got {choices!r}.")
    if not isinstance(target, int) or not 0 <= target < len(choices):
        raise ValueError(f"`target` must be an index in [0, {len(choices) - 1}] into {list(choices)}, got {target!r}.")
    sets = [token_ids(tokenizer, [c], f"choices[{i}]") for i, c in enumerate(choices)]
    flat = [i for s in sets for i in s]
    if len(flat) != len(set(flat)):
        raise ValueError(f"choices {list(choices)} share first tokens {[tokenizer.decode([i]) for i in flat]}.")
    owner = torch.tensor([k for k, s in enumerate(sets) for _ in s])
    flat_t = torch.tensor(flat)

    def metric(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        last = _last(logits)
        _check_vocab(logits, flat)
        picked = last[:, flat_t.to(last.device)]  # [batch, n_ids]
        per_choice = torch.stack([picked[:, owner.to(last.device) == k].logsumexp(-1) for k in range(len(sets))], -1)
        return per_choice.softmax(-1)[:, target]

    return _named(metric, f"choice({choices[target]} of {'|'.join(choices)})")


def get_metric(metric: str | Metric | None, tokenizer: Any, **kwargs: Any) -> Metric:
    """Resolve a metric name (``"refusal"`` when None) or pass a callable through.

    Names and their keyword arguments: ``"refusal"`` (none), ``"logit_diff"`` (``positive_tokens``,
    ``negative_tokens``), ``"logprob"`` (none; completion mode), ``"choice"`` (``choices``, ``target``).
    """
    if callable(metric):
        if kwargs:
            raise ValueError(f"metric arguments {sorted(kwargs)} only apply to metric names, not to a callable.")
        return metric
    if metric is None:
        metric = "refusal"
    if not isinstance(metric, str):
        raise ValueError(
            f"`metric` must be a name in {list(METRICS)}, a callable or None, got {type(metric).__name__}."
        )
    factories: dict[str, tuple[Callable[..., Metric], tuple[str, ...]]] = {
        "refusal": (lambda: refusal_metric(tokenizer), ()),
        "logit_diff": (lambda **kw: logit_diff(tokenizer, **kw), ("positive_tokens", "negative_tokens")),
        "logprob": (completion_logprob, ()),
        "choice": (lambda **kw: choice_prob(tokenizer, **kw), ("choices", "target")),
    }
    if metric not in factories:
        raise ValueError(f"unknown metric {metric!r}; valid names: {list(METRICS)} (or pass a callable).")
    factory, allowed = factories[metric]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"metric {metric!r} does not take {unknown}; it takes {list(allowed) or 'no arguments'}.")
    if metric == "logit_diff" and not {"positive_tokens", "negative_tokens"} <= set(kwargs):
        raise ValueError("metric 'logit_diff' needs `positive_tokens=` and `negative_tokens=` (lists of strings).")
    return factory(**kwargs)
