"""Attention-score screening: rank heads by how much the scored positions attend to given target tokens.

One forward pass per batch with ``output_attentions=True`` returns every layer's attention pattern
``[batch, n_heads, query, key]``. A head's score is the attention weight that the scored query
position(s) put on the prompt positions holding a target token, averaged over prompts (positive
minus negative for contrastive pairs). It is a cheap screen for "which heads read token X": no metric
and no backward pass, and it says nothing about what a head does with what it reads.

Only transformers' eager attention materialises the weights (SDPA and flash kernels return none), so
the model is switched to ``"eager"`` for the pass and switched back afterwards, even on error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..arch import _unwrap, spec_for
from .magnitude import (
    Batch,
    MethodOutput,
    Positions,
    _bar,
    eval_mode,
    keep_one,
    model_device,
    position_index,
    run_model,
    to_device,
)

POSITIONS: tuple[str, ...] = ("last", "all")


def target_sequences(tokenizer: Any, target_tokens: str | Sequence[str]) -> list[list[int]]:
    """Token ids of each target string, encoded without special tokens (so they match inside a prompt)."""
    targets = [target_tokens] if isinstance(target_tokens, str) else target_tokens
    if not isinstance(targets, Sequence) or not targets:
        raise ValueError(
            f"`target_tokens` is empty ({target_tokens!r}); pass the strings whose positions the heads should "
            "attend to, e.g. target_tokens=[' Paris']."
        )
    sequences = []
    for target in targets:
        if not isinstance(target, str) or not target:
            raise ValueError(f"`target_tokens` entries must be non-empty strings, got {target!r}.")
        ids = [int(i) for i in tokenizer(target, add_special_tokens=False)["input_ids"]]
        if not ids:
            raise ValueError(f"target {target!r} encodes to no tokens; pass a string the tokenizer can encode.")
        sequences.append(ids)
    return sequences


def target_mask(input_ids: Tensor, attention_mask: Tensor, sequences: Sequence[Sequence[int]]) -> Tensor:
    """``[batch, seq]`` bool: True on every real token covered by an occurrence of a target id sequence."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)  # padding never matches
    seq_len = ids.shape[1]
    hit = torch.zeros_like(ids, dtype=torch.bool)
    for target in sequences:  # a handful of targets; each occurrence test is one batched comparison
        m = len(target)
        if m > seq_len:
            continue
        windows = ids.unfold(1, m, 1)  # [batch, seq - m + 1, m]
        starts = (windows == torch.tensor(target, device=ids.device)).all(-1)
        for offset in range(m):  # mark each token of a matched span
            hit[:, offset : offset + seq_len - m + 1] |= starts
    return hit


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch ``model`` to eager attention for the block (weights are only returned there), then restore it."""
    base = _unwrap(model)
    previous = getattr(base.config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    _set_attn(base, "eager")
    try:
        yield
    finally:
        _set_attn(base, previous)


def _set_attn(base: nn.Module, implementation: str | None) -> None:
    setter = getattr(base, "set_attn_implementation", None)  # transformers' documented switch
    if callable(setter):
        setter(implementation)
    else:
        base.config._attn_implementation = implementation


def _attention_mass(model: nn.Module, batch: Batch, targets: Tensor, positions: Positions) -> Tensor:
    """Per prompt, layer and head: attention from the scored positions to the target positions ``[B, L, H]``."""
    mask = batch["attention_mask"]
    idx = position_index(positions, mask)  # [B, k]
    weight = torch.gather(mask, 1, idx).float()  # 0 on padding picked by "all" or explicit indices
    with torch.no_grad():
        out = run_model(model, batch, output_attentions=True, **keep_one(model))
    patterns = getattr(out, "attentions", None)
    if not patterns or any(p is None for p in patterns):
        raise ValueError(
            f"{type(_unwrap(model)).__name__} returned no attention weights with output_attentions=True; "
            "load it with attn_implementation='eager' to use method='attention'."
        )
    column = targets.float()[:, None, :, None]  # [B, 1, key, 1]
    mass = torch.stack([(p.float() @ column)[..., 0] for p in patterns], 1)  # [B, L, H, query]
    b, n_layers, n_heads, _ = mass.shape
    picked = mass.gather(3, idx[:, None, None, :].expand(b, n_layers, n_heads, -1))  # [B, L, H, k]
    return (picked * weight[:, None, None, :]).sum(-1) / weight.sum(-1).clamp_min(1)[:, None, None]


def attention(
    model: nn.Module,
    tokenizer: Any,
    positive: Sequence[Batch],
    negative: Sequence[Batch] | None = None,
    *,
    target_tokens: str | Sequence[str],
    positions: Positions = "last",
    progress: bool = False,
) -> MethodOutput:
    """Score every head by the attention it pays from ``positions`` to the target tokens' positions.

    Score = mean over ``positive`` prompts of the attention weight on target positions (summed over
    them, averaged over the scored positions; in ``[0, 1]``), minus the same mean over ``negative``
    prompts when given. Prompts without a target token contribute 0.
    """
    sequences = target_sequences(tokenizer, target_tokens)
    texts = [target_tokens] if isinstance(target_tokens, str) else list(target_tokens)
    sides = (
        {"positive": list(positive)} if negative is None else {"positive": list(positive), "negative": list(negative)}
    )
    masks = {
        name: [target_mask(b["input_ids"], b["attention_mask"], sequences) for b in bs] for name, bs in sides.items()
    }
    with_target = {name: int(sum(int(m.any(-1).sum()) for m in ms)) for name, ms in masks.items()}
    if not any(with_target.values()):
        raise ValueError(
            f"target tokens {texts} (token ids {sequences}) occur in none of the "
            "prompts; they must occur in the prompt text. With BPE tokenizers a word after a space is its own "
            f"token: pass {' ' + texts[0].lstrip()!r} (leading space) for {texts[0].lstrip()!r} in running text."
        )
    spec = spec_for(model)
    device = model_device(model)
    means = {}
    total = sum(len(bs) for bs in sides.values())
    with eval_mode(model), eager_attention(model), _bar(total, progress, "attention") as bar:
        for name, batches in sides.items():
            acc, n = torch.zeros(spec.n_layers, spec.n_heads, dtype=torch.float64), 0
            for batch, mask in zip(batches, masks[name], strict=True):
                mass = _attention_mass(model, to_device(batch, device), mask.to(device), positions)
                acc += mass.double().sum(0).cpu()
                n += mass.shape[0]
                bar.update(1)
            means[name] = acc / max(n, 1)
    score = means["positive"] - means["negative"] if negative is not None else means["positive"]
    extra: dict[str, Any] = {
        "target_tokens": texts,
        "target_ids": sequences,
        "prompts_with_target": with_target,
    }
    if negative is not None:
        extra["attention"] = {name: mean.float().tolist() for name, mean in means.items()}
    return {"heads": score.float()}, extra
