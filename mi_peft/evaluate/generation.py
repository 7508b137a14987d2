"""Batched greedy generation for behaviour metrics: chat-formatted, left-padded, new text only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._batching import batches, check_positive, device_of, encode, pad, pad_id, prompt_texts


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the model's generation EOS (e.g. ``<|im_end|>``) and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def _decode(tokenizer: Any, new_ids: torch.Tensor, stop: set[int]) -> str:
    """Text of the generated ids up to the first EOS (the padding ``generate`` adds after it is dropped)."""
    ids = new_ids.tolist()
    end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat: bool | None = None,
    system: str | None = None,
) -> list[str]:
    """Greedy replies to ``prompts``, one string per prompt, without the prompt and special tokens.

    Works on any ``transformers`` causal LM or PEFT-wrapped model, also inside ``with
    model.disable_adapter():``. Batches are LEFT-padded (built here from token ids, so
    ``tokenizer.padding_side`` is never touched) and ``generate`` derives position ids from the
    attention mask, so a prompt gets the same reply whatever it is batched with.

    Args:
        model: causal LM or ``PeftModel``, in eval mode.
        tokenizer: its tokenizer.
        prompts: user prompts (not yet chat-formatted).
        max_new_tokens: most tokens generated per prompt; a reply stops earlier at EOS.
        batch_size: prompts per ``generate`` call.
        chat: ``None`` applies the chat template when the tokenizer has one
            (``add_generation_prompt=True``); ``True`` requires one; ``False`` sends plain text.
        system: optional system message (chat mode), else prepended to each prompt.

    Example:
        >>> replies = generate(model, tok, ["How do I pick a lock?"], max_new_tokens=24)
    """
    check_positive(max_new_tokens, "max_new_tokens")
    check_positive(batch_size, "batch_size")
    texts = prompt_texts(tokenizer, prompts, chat, system)
    seqs = [encode(tokenizer, t) for t in texts]
    pad_token_id = pad_id(tokenizer)
    stop = eos_token_ids(model, tokenizer)
    device = device_of(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch: less padding
    ordered = [seqs[i] for i in order]
    replies: list[str] = []
    slices = list(batches(len(seqs), batch_size))
    for sl in tqdm(slices, desc="generate", leave=False, disable=len(slices) < 2):
        input_ids, attention_mask = pad(ordered[sl], pad_token_id, side="left")
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_token_id,
                eos_token_id=stop or None,
            )
        new = out[:, input_ids.shape[1] :].cpu()
        replies.extend(_decode(tokenizer, row, set(stop)) for row in new)
    restored = [""] * len(seqs)
    for position, reply in zip(order, replies, strict=True):
        restored[position] = reply
    return restored
