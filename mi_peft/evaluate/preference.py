"""Preference margins: how much more likely a model finds the chosen reply than the rejected one.

DPO optimises exactly this quantity (relative to a reference model), so the margin on held-out
preference pairs is the direct check that preference training generalises: a falling DPO loss
with a flat held-out margin means the adapter memorised the training pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .general import continuation_logprobs


@dataclass
class PreferenceMargin:
    """Per-pair log-probabilities (nats, summed over reply tokens) and their mean difference."""

    chosen: list[float]
    rejected: list[float]

    @property
    def margins(self) -> list[float]:
        return [c - r for c, r in zip(self.chosen, self.rejected, strict=True)]

    @property
    def mean(self) -> float:
        return sum(self.margins) / len(self.margins)

    @property
    def win_rate(self) -> float:
        """Share of pairs where the chosen reply is the more likely one."""
        return sum(m > 0 for m in self.margins) / len(self.margins)


def _split(tokenizer: Any, prompt: Any, reply: Any) -> tuple[str, str]:
    """Context and continuation text as TRL's DPOTrainer renders them (chat template, or EOS appended)."""
    if isinstance(prompt, str) and isinstance(reply, str):
        eos = tokenizer.eos_token or ""
        return prompt, reply if reply.endswith(eos) else reply + eos
    if not (isinstance(prompt, list) and isinstance(reply, list)):
        raise ValueError("a preference row holds strings or message lists in `prompt`, `chosen` and `rejected`.")
    context = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    whole = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not whole.startswith(context):
        raise ValueError("the chat template renders the prompt differently on its own; cannot split the reply off.")
    return context, whole[len(context) :]


def preference_margin(
    model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], batch_size: int = 8
) -> PreferenceMargin:
    """Log-probability of ``chosen`` and of ``rejected`` given ``prompt`` for each row."""
    if not rows:
        raise ValueError("no preference rows given; pass rows with `prompt`, `chosen` and `rejected`.")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rows[0]]
    if missing:
        raise ValueError(f"preference rows need `prompt`, `chosen` and `rejected`; the first row lacks {missing}.")
    scores = {}
    for key in ("chosen", "rejected"):
        contexts, continuations = zip(*(_split(tokenizer, row["prompt"], row[key]) for row in rows), strict=True)
        scores[key], _ = continuation_logprobs(
            model, tokenizer, list(contexts), list(continuations), batch_size=batch_size, desc=f"{key} log-prob"
        )
    return PreferenceMargin(chosen=scores["chosen"], rejected=scores["rejected"])
