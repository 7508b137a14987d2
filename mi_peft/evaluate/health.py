"""Generation health: do replies to generic instructions loop, collapse onto one answer, or lose variety?

An over-strong steering vector or an over-trained adapter often shows first as degenerate text (the
same word or phrase until the token limit), the same reply to every prompt, or a shrinking vocabulary,
while behaviour metrics still look fine. Four numbers catch these, on greedy replies to held-out
instructions (``recipes/data/general/generic_instructions.json`` by default).

Replies are split into *units*: runs of letters/digits/underscore (``\\w+``, case-folded) and every other
non-space character on its own (so punctuation and emoji count, and text without spaces is still split).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ._batching import check_positive, check_texts
from .general import general_data_dir
from .generation import generate

_UNIT = re.compile(r"\w+|[^\w\s]")
MAX_NGRAM = 8
MIN_REPEATS = 3
MIN_TAIL_UNITS = 8


def units(text: str) -> list[str]:
    """The units of ``text`` (see the module docstring), case-folded."""
    return _UNIT.findall(text.casefold())


def _periodic_tail(seq: Sequence[str], period: int) -> int:
    """Length of the longest suffix of ``seq`` that repeats with ``period`` (0 if shorter than one period)."""
    if len(seq) < period:
        return 0
    length = period
    while length < len(seq) and seq[-length - 1] == seq[-length - 1 + period]:
        length += 1
    return length


def is_degenerate(
    reply: str,
    max_ngram: int = MAX_NGRAM,
    min_repeats: int = MIN_REPEATS,
    min_tail_units: int = MIN_TAIL_UNITS,
) -> bool:
    """Whether ``reply`` ends in one n-gram (1 <= n <= ``max_ngram`` units) repeated until the end.

    Rule: for some n, the last L units of the reply repeat with period n (unit i equals unit i + n), with
    ``L >= min_repeats * n`` and ``L >= min_tail_units``. A last copy cut short by the token limit still
    counts (``"a b c a b c a b c a b"`` has period 3 over its last 11 units). So ``"the the ... the"`` (8+
    times) and ``"I love you. I love you. I love you."`` are degenerate; a short ``"No, no, no."`` is not.
    """
    for name, value in (("max_ngram", max_ngram), ("min_repeats", min_repeats), ("min_tail_units", min_tail_units)):
        check_positive(value, name)
    seq = units(reply)
    for n in range(1, max_ngram + 1):
        tail = _periodic_tail(seq, n)
        if tail >= min_repeats * n and tail >= min_tail_units:
            return True
    return False


def degenerate_rate(replies: Sequence[str], **rule: int) -> float:
    """Share of replies that :func:`is_degenerate` flags (``rule``: its keyword arguments)."""
    replies = check_texts(replies, "replies")
    return sum(is_degenerate(r, **rule) for r in replies) / len(replies)


def _normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def duplicate_rate(replies: Sequence[str]) -> float:
    """Share of replies identical to at least one other reply after collapsing whitespace (case kept).

    ``["a", "a ", "b"]`` gives 2/3; empty replies count as duplicates of each other.
    """
    keys = [_normalise_whitespace(r) for r in check_texts(replies, "replies")]
    counts = Counter(keys)
    return sum(counts[k] > 1 for k in keys) / len(keys)


def distinct_2(replies: Sequence[str]) -> float:
    """Distinct unit bigrams / all unit bigrams, pooled over every reply (Li et al. 2016's distinct-2).

    Bigrams never span two replies. 0.0 when no reply has two units.
    """
    split = [units(r) for r in check_texts(replies, "replies")]
    bigrams = [pair for seq in split for pair in zip(seq, seq[1:], strict=False)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


OPENING_WORDS = 4
_WORD = re.compile(r"\w+")


def shared_opening_rate(replies: Sequence[str], n_words: int = OPENING_WORDS) -> float:
    """Share of replies whose first ``n_words`` words (``\\w+`` runs, case-folded) open another reply too.

    A trained template shows here before it shows as identical replies: ``"I'm so glad to help! ..."``
    in front of every answer. Punctuation is skipped (``I'm`` is the words ``i m``); a reply shorter than
    ``n_words`` compares all of its words. ``["I'm so glad, yes!", "I'm so GLAD to", "I'm so tired"]``
    gives 2/3.
    """
    check_positive(n_words, "n_words")
    keys = [tuple(_WORD.findall(r.casefold())[:n_words]) for r in check_texts(replies, "replies")]
    counts = Counter(keys)
    return sum(counts[k] > 1 for k in keys) / len(keys)


@dataclass
class GenerationHealth:
    """The health numbers of ``generations`` (one per prompt); see the module docstring."""

    degenerate_rate: float
    duplicate_rate: float
    distinct_2: float
    shared_opening_rate: float
    n: int
    prompts: list[str]
    generations: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_generic_instructions(n: int | None = None, path: str | os.PathLike | None = None) -> list[str]:
    """The first ``n`` held-out Alpaca instructions (CC BY-NC 4.0: non-commercial; see SOURCE.md)."""
    source = Path(path) if path is not None else general_data_dir() / "generic_instructions.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found; pass `path=` a JSON list of instructions.")
    rows = json.loads(source.read_text(encoding="utf-8"))
    texts = [row["instruction"] if isinstance(row, dict) else row for row in rows]
    texts = check_texts(texts, str(source))
    if n is None:
        return texts
    check_positive(n, "n")
    if n > len(texts):
        raise ValueError(f"`n={n}` but {source} has only {len(texts)} instructions; pass at most {len(texts)}.")
    return texts[:n]


def generation_health(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    n_prompts: int = 32,
    batch_size: int = 32,
    chat: bool | None = None,
    system: str | None = None,
) -> GenerationHealth:
    """Greedy replies to ``prompts`` (default: the first ``n_prompts`` generic instructions) and their health.

    Generation is :func:`mi_peft.evaluate.generate` (chat template when the tokenizer has one).

    Example:
        >>> health = generation_health(peft_model, tok)
        >>> health.degenerate_rate, health.duplicate_rate, health.distinct_2
    """
    prompts = load_generic_instructions(n_prompts) if prompts is None else check_texts(prompts, "prompts")
    replies = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, system=system
    )
    return GenerationHealth(
        degenerate_rate=degenerate_rate(replies),
        duplicate_rate=duplicate_rate(replies),
        distinct_2=distinct_2(replies),
        shared_opening_rate=shared_opening_rate(replies),
        n=len(replies),
        prompts=list(prompts),
        generations=replies,
    )
