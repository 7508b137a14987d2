"""Side effects of an adapter on neutral inputs: KL divergence to the base model, and perplexity.

A behaviour edit should move the target behaviour and little else; these two numbers measure the
"little else" on prompts and text unrelated to the behaviour. Both are token-weighted means over all
non-padding positions (a long prompt counts more than a short one), computed in float32 from
right-padded batches, so padding never changes a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ._batching import batches, check_positive, check_texts, encode, forward_logits, pad, pad_id, prompt_texts


def _base_run(model: nn.Module, base_model: nn.Module | None) -> tuple[nn.Module, Callable[[], AbstractContextManager]]:
    """The model that gives base logits and a factory of the context to run it in."""
    if base_model is not None:
        return base_model, nullcontext
    disable = getattr(model, "disable_adapter", None)
    if not callable(disable):
        raise ValueError(
            f"`base_model=None` means the same PEFT model with its adapters disabled, but {type(model).__name__} "
            "has no `disable_adapter()`; pass `base_model=` the unmodified model to compare against."
        )
    return model, disable


def kl_to_base(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    base_model: nn.Module | None = None,
    batch_size: int = 8,
    chat: bool | None = None,
    system: str | None = None,
) -> float:
    """Mean ``KL(base || model)`` of the next-token distributions over every non-padding prompt position.

    Args:
        model: the edited model (``PeftModel``, steered or merged model).
        tokenizer: shared tokenizer.
        prompts: neutral user prompts, chat-formatted as in :func:`generate`.
        base_model: the reference model; ``None`` runs ``model`` again inside
            ``with model.disable_adapter():`` (no second copy in memory), which needs a PEFT model.
        batch_size: prompts per forward pass.
        chat, system: chat formatting, as in :func:`generate`.

    Example:
        >>> kl_to_base(peft_model, tok, alpaca_prompts)          # adapter on vs off, in nats per token
    """
    check_positive(batch_size, "batch_size")
    reference, context = _base_run(model, base_model)
    seqs = [encode(tokenizer, t) for t in prompt_texts(tokenizer, prompts, chat, system)]
    total, count = 0.0, 0
    slices = list(batches(len(seqs), batch_size))
    for sl in tqdm(slices, desc="kl_to_base", leave=False, disable=len(slices) < 2):
        input_ids, attention_mask = pad(seqs[sl], pad_id(tokenizer), side="right")
        logits = forward_logits(model, input_ids, attention_mask)
        with context():
            base_logits = forward_logits(reference, input_ids, attention_mask)
        if base_logits.shape != logits.shape:
            raise ValueError(
                f"base model logits {tuple(base_logits.shape)} differ from the model's {tuple(logits.shape)}; "
                "pass a base model with the same vocabulary."
            )
        logp = logits.log_softmax(-1)
        base_logp = base_logits.to(logp.device).log_softmax(-1)
        kl = F.kl_div(logp, base_logp, log_target=True, reduction="none").sum(-1)  # [batch, pos]
        mask = attention_mask.to(kl.device).bool()
        total += float(kl[mask].double().sum())
        count += int(mask.sum())
    return total / count


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
) -> float:
    """Token-level perplexity of ``texts``: ``exp`` of the mean next-token NLL over all predicted tokens.

    Texts are plain (no chat template); every token after a text's first is predicted from the ones
    before it. ``max_length`` keeps each text's first ``max_length`` tokens.

    Example:
        >>> perplexity(peft_model, tok, wiki_paragraphs), perplexity(base, tok, wiki_paragraphs)
    """
    check_positive(batch_size, "batch_size")
    if max_length is not None:
        check_positive(max_length, "max_length")
    seqs = [encode(tokenizer, t)[:max_length] for t in check_texts(texts, "texts")]
    if all(len(s) < 2 for s in seqs):
        raise ValueError("every text encodes to fewer than 2 tokens, so no token can be predicted; pass longer texts.")
    total, count = 0.0, 0
    slices = list(batches(len(seqs), batch_size))
    for sl in tqdm(slices, desc="perplexity", leave=False, disable=len(slices) < 2):
        input_ids, attention_mask = pad(seqs[sl], pad_id(tokenizer), side="right")
        logits = forward_logits(model, input_ids, attention_mask)
        targets = input_ids[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # [batch, pos - 1]
        mask = attention_mask[:, 1:].to(nll.device).bool()
        total += float(nll[mask].double().sum())
        count += int(mask.sum())
    return math.exp(total / count)
