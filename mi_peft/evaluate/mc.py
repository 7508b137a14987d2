"""Binary multiple choice by log-likelihood: does the model find the correct answer more likely than the wrong one?

An item is a question with one correct and one incorrect answer (TruthfulQA's best answer vs best incorrect
answer, Lin et al. 2022). The question goes through the chat template as the user turn (plain text without
one) and each answer is scored as the assistant's reply by its **total** log-likelihood
(:func:`~mi_peft.evaluate.general.continuation_logprobs`); the item is right when the correct answer scores
strictly higher. This is TruthfulQA's MC1 rule with two options, as ITI (Li et al. 2023) scores it: no
generation and no judge model, so it is cheap enough to score every variant of a recipe run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..stats import wilson_interval
from ._batching import check_positive, check_texts, prompt_texts
from .general import continuation_logprobs

MC_KEYS = ("question", "correct", "incorrect")


@dataclass
class MCResult:
    """``accuracy`` = ``correct / n``; ``margins``: per item, log-likelihood of the correct answer minus the
    incorrect one's (nats; > 0 is right)."""

    accuracy: float
    correct: int
    n: int
    margins: list[float]

    @property
    def mean_margin(self) -> float:
        return sum(self.margins) / self.n

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Wilson interval of ``accuracy``."""
        return wilson_interval(self.correct, self.n, confidence)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mc_accuracy(
    model: nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    correct: Sequence[str],
    incorrect: Sequence[str],
    batch_size: int = 8,
    chat: bool | None = None,
    system: str | None = None,
) -> MCResult:
    """Share of questions whose ``correct`` answer has a higher total log-likelihood than the ``incorrect`` one.

    Args:
        model: causal LM or ``PeftModel`` (steering and trained adapters alike).
        questions, correct, incorrect: one entry each per item (see :func:`mc_items` for rows).
        batch_size: sequences per forward pass.
        chat: ``None`` applies the chat template when the tokenizer has one; ``False`` scores plain text.
        system: optional system message.

    Example:
        >>> mc_accuracy(model, tok, ["Is the Earth flat?"], ["No, it is round."], ["Yes."]).accuracy
    """
    check_positive(batch_size, "batch_size")
    questions = check_texts(questions, "questions")
    correct, incorrect = check_texts(correct, "correct"), check_texts(incorrect, "incorrect")
    if not len(questions) == len(correct) == len(incorrect):
        raise ValueError(
            f"{len(questions)} questions, {len(correct)} correct and {len(incorrect)} incorrect answers; "
            "pass one of each per item."
        )
    contexts = prompt_texts(tokenizer, questions, chat, system)
    totals, _ = continuation_logprobs(model, tokenizer, contexts * 2, [*correct, *incorrect], batch_size, desc="mc")
    n = len(questions)
    margins = [totals[i] - totals[n + i] for i in range(n)]
    right = sum(m > 0 for m in margins)
    return MCResult(accuracy=right / n, correct=right, n=n, margins=margins)


def mc_items(rows: Sequence[Mapping[str, Any]], where: str = "items") -> tuple[list[str], list[str], list[str]]:
    """``(questions, correct, incorrect)`` from rows with the keys :data:`MC_KEYS`, or a ValueError naming
    the first row and key that is missing or not a non-empty string."""
    if isinstance(rows, (str, Mapping)) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"{where}: need a non-empty list of rows with keys {list(MC_KEYS)}.")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: row {i} must be an object with keys {list(MC_KEYS)}, got {row!r:.80}.")
        for key in MC_KEYS:
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                problem = "is missing" if key not in row else f"is {value!r:.40}, not a non-empty string"
                raise ValueError(
                    f"{where}: row {i} key {key!r} {problem}; every multiple-choice row needs {list(MC_KEYS)}."
                )
    return tuple([str(row[key]) for row in rows] for key in MC_KEYS)  # type: ignore[return-value]
