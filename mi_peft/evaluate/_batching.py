"""Batched forward passes shared by the evaluation metrics, on the package's one encoder and padder.

``encode``, ``pad`` and ``pad_id`` are those of :mod:`mi_peft.data` (re-exported here): padding is done
from token lists, so the caller's tokenizer is never modified (its ``padding_side`` and ``pad_token``
stay as they were, even if a metric raises). Generation pads on the LEFT (every row's last real token
sits at position ``-1``, which ``generate`` needs); teacher-forced metrics pad on the RIGHT, so a causal
model computes every real token exactly as without padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Side, check_positive, check_texts, encode, format_prompts, pad, pad_id

__all__ = [
    "Side",
    "batches",
    "check_positive",
    "check_texts",
    "device_of",
    "encode",
    "forward_logits",
    "pad",
    "pad_id",
    "prompt_texts",
    "uses_chat",
]


def uses_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Whether prompts get the chat template: ``chat``, or (when None) whether the tokenizer has one."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else bool(chat)


def prompt_texts(tokenizer: Any, prompts: Sequence[str], chat: bool | None, system: str | None) -> list[str]:
    """User prompts wrapped in the chat template (generation prompt added), as ``mi_peft.data`` does."""
    return format_prompts(tokenizer, check_texts(prompts, "prompts"), chat=chat, system=system)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def device_of(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the model's first parameter (the embedding for HF models)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError(f"{type(model).__name__} has no parameters; pass a loaded causal LM.") from None


@torch.no_grad()
def forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Float32 next-token logits ``[batch, pos, vocab]`` for a right-padded batch."""
    device = device_of(model)
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return out.logits.float()
