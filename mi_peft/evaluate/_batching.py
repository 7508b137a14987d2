"""Tokenization, padding and batched forward passes shared by the evaluation metrics.

Padding is done here from token lists, so the caller's tokenizer is never modified (its
``padding_side`` and ``pad_token`` stay as they were, even if a metric raises). Generation pads on
the LEFT (every row's last real token sits at position ``-1``, which ``generate`` needs); teacher-forced
metrics pad on the RIGHT, so a causal model computes every real token exactly as without padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..data import format_prompts

Side = Literal["left", "right"]


def check_texts(values: Any, name: str) -> list[str]:
    """``values`` as a non-empty list of strings, or a ValueError naming the bad entry."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"`{name}` must be a list of strings, got {type(values).__name__}.")
    values = list(values)
    if not values:
        raise ValueError(f"`{name}` is empty; pass at least one string.")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"`{name}[{i}]` must be a string, got {type(v).__name__}: {v!r}.")
    return values


def check_positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def uses_chat(tokenizer: Any, chat: bool | None) -> bool:
    """Whether prompts get the chat template: ``chat``, or (when None) whether the tokenizer has one."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else bool(chat)


def prompt_texts(tokenizer: Any, prompts: Sequence[str], chat: bool | None, system: str | None) -> list[str]:
    """User prompts wrapped in the chat template (generation prompt added), as ``mi_peft.data`` does."""
    return format_prompts(tokenizer, check_texts(prompts, "prompts"), chat=chat, system=system)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text``; special tokens (BOS) are added unless the text already starts with BOS.

    A chat-formatted text carries its own BOS when the template writes one, so adding another would
    double it; plain text gets the tokenizer's usual special tokens. Same rule as ``mi_peft.data``.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def pad_id(tokenizer: Any) -> int:
    """The id written into padding slots (masked out, so any id works): pad, else EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def pad(seqs: Sequence[Sequence[int]], pad_token_id: int, side: Side) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[batch, max_len]`` with padding on ``side``."""
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"text {lengths.index(0)} of the batch encodes to no tokens; pass non-empty texts.")
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        input_ids[row, cols] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


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
