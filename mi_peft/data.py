"""Contrastive data: pairs of prompts (or completions) with and without a behaviour.

``positive`` holds the behaviour-present side (e.g. harmful prompts, which a chat model refuses),
``negative`` the behaviour-absent side (harmless prompts). Two modes:

- **prompt mode**: ``positive[i]`` and ``negative[i]`` are user prompts;
- **completion mode** (:meth:`ContrastivePairs.from_completions`): one shared ``prompts[i]`` and two
  completions ``positive[i]`` / ``negative[i]`` (e.g. the matching and non-matching A/B answer).

:meth:`ContrastivePairs.load` reads a list of dicts (rows), a dict of lists (columns), a ``.json`` file of
either, ``.jsonl`` (one row per line), ``.csv``/``.tsv`` with a header, a ``datasets.Dataset`` (columns named
by ``positive_key``, ``negative_key``, ``prompt_key``; a cell may be a TRL conversational message list
with one message, so a DPO file loads with ``prompt_key="prompt", positive_key="chosen",
negative_key="rejected"``), or a **directory** holding ``positive.json`` +
``negative.json`` or ``harmful.json`` + ``harmless.json`` (``.jsonl`` too): lists of strings or of rows
read at ``text_key`` (default ``"instruction"``). In a directory, ``split="test"`` reads ``<name>_test.json``
instead, and a ``prompts.json`` beside them selects completion mode. ``recipes/data/refusal`` uses this layout.

This module is also the package's one prompt formatter and padder (locate, steering calibration, the
logit lens and evaluation all call it): :func:`format_prompts` applies the chat template
(``add_generation_prompt=True``) when the tokenizer has one; :func:`encode` adds BOS unless the text
already starts with it; :func:`pad` pads token lists (``pad_token_id``, else ``eos_token_id``, else 0)
and :func:`position_ids` counts positions over real tokens. Batches of :func:`tokenize` and
:meth:`ContrastivePairs.batches` are LEFT-padded, so position ``-1`` is every row's last real token, and carry
``position_ids``; the tokenizer itself is never modified (no ``padding_side`` or ``pad_token`` change).
File reading lives in :mod:`mi_peft.data_files`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .data_files import (
    as_texts,
    columns_of,
    read_directory,
    read_file,
    read_rows,
    read_texts,
    single_turn_texts,
)

__all__ = [
    "ContrastivePairs",
    "check_positive",
    "check_texts",
    "encode",
    "format_prompts",
    "left_padded_batch",
    "pad",
    "pad_id",
    "position_ids",
    "read_rows",
    "read_texts",
    "tokenize",
]

Side = Literal["left", "right"]


@dataclass
class ContrastivePairs:
    """Equal-length lists of behaviour-present (``positive``) and behaviour-absent (``negative``) texts.

    Args:
        positive: prompt mode: user prompts showing the behaviour; completion mode: completions showing it.
        negative: same length as ``positive``; the behaviour absent.
        prompts: completion mode only: the prompt shared by ``positive[i]`` and ``negative[i]``.
        system: optional system message used when formatting with a chat template.

    The constructor refuses empty lists; only :meth:`split` returns an empty part (``test=0``), which
    :meth:`format` and :meth:`batches` refuse.

    Example:
        >>> pairs = ContrastivePairs.load("recipes/data/refusal")
        >>> train, val, test = pairs.split(val=0.2, test=0.2, seed=0)
        >>> for pos, neg in train.batches(tokenizer, batch_size=8):
        ...     logits = model(**pos).logits  # prompt mode: every key is a model input
    """

    positive: list[str]
    negative: list[str]
    prompts: list[str] | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        self.positive, self.negative = as_texts(self.positive, "positive"), as_texts(self.negative, "negative")
        self.prompts = None if self.prompts is None else as_texts(self.prompts, "prompts")
        n_pos, n_neg = len(self.positive), len(self.negative)
        if n_pos == n_neg == 0:
            raise ValueError("no contrastive pairs: `positive` and `negative` are empty; pass at least one text each.")
        if n_pos != n_neg or (self.prompts is not None and len(self.prompts) != n_pos):
            extra = "" if self.prompts is None else f" and `prompts` has {len(self.prompts)}"
            raise ValueError(
                f"`positive` has {n_pos} items but `negative` has {n_neg}{extra}; contrastive pairs need equal "
                "lengths (one prompt per pair in completion mode); trim the longer list."
            )
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"`system` must be a string or None, got {type(self.system).__name__}.")

    @classmethod
    def from_completions(
        cls, prompts: Sequence[str], positive: Sequence[str], negative: Sequence[str], *, system: str | None = None
    ) -> ContrastivePairs:
        """Completion mode: ``prompts[i]`` followed by ``positive[i]`` vs by ``negative[i]``."""
        pairs = cls(list(positive), list(negative), prompts=list(prompts), system=system)
        _require_nonempty(pairs, "from_completions")
        return pairs

    @classmethod
    def load(
        cls,
        source: Any,
        *,
        positive_key: str = "positive",
        negative_key: str = "negative",
        prompt_key: str | None = None,
        text_key: str = "instruction",
        split: str | None = None,
        system: str | None = None,
    ) -> ContrastivePairs:
        """Load pairs from rows, columns, a file, a directory or a ``datasets.Dataset`` (see module docs).

        ``positive_key``/``negative_key``/``prompt_key`` name table columns (``prompt_key`` selects completion
        mode); ``text_key`` and ``split`` apply to directories; ``system`` is kept for chat formatting.
        """
        where, table = type(source).__name__, source
        keys = [positive_key, negative_key] + ([prompt_key] if prompt_key is not None else [])
        if isinstance(source, (str, Path)):
            path = Path(source).expanduser()
            if not path.exists():
                raise ValueError(f"data path {str(path)!r} does not exist.")
            if split is not None and not path.is_dir():
                raise ValueError(f"`split={split!r}` only applies to a directory source, got the file {str(path)!r}.")
            where, table = str(path), read_directory(path, text_key, split) if path.is_dir() else read_file(path)
            if path.is_dir():
                keys = ["positive", "negative"] + (["prompts"] if "prompts" in table else [])
        columns = {k: single_turn_texts(v, k) for k, v in columns_of(table, where, keys).items()}
        prompts = columns[keys[2]] if len(keys) == 3 else None
        pairs = cls(columns[keys[0]], columns[keys[1]], prompts=prompts, system=system)
        _require_nonempty(pairs, where)
        return pairs

    def __len__(self) -> int:
        return len(self.positive)

    def _take(self, idx: Sequence[int]) -> ContrastivePairs:
        """The pairs at ``idx``; may be empty (a ``split`` part of size 0), so it skips the constructor's check."""
        part = object.__new__(ContrastivePairs)
        part.positive = [self.positive[i] for i in idx]
        part.negative = [self.negative[i] for i in idx]
        part.prompts = None if self.prompts is None else [self.prompts[i] for i in idx]
        part.system = self.system
        return part

    def split(
        self, val: float = 0.2, test: float = 0.2, seed: int = 0
    ) -> tuple[ContrastivePairs, ContrastivePairs, ContrastivePairs]:
        """Disjoint (train, val, test) parts covering all pairs, in original order; same seed, same split.

        Part sizes are ``round(n * val)`` and ``round(n * test)``; train keeps the rest and must be non-empty.
        """
        _require_nonempty(self, "split")
        for name, frac in (("val", val), ("test", test)):
            if not 0.0 <= frac < 1.0:
                raise ValueError(f"`{name}` must be a fraction in [0, 1), got {frac!r}.")
        n = len(self)
        n_val, n_test = round(n * val), round(n * test)
        if n_val + n_test >= n:
            raise ValueError(
                f"split(val={val}, test={test}) of {n} pairs leaves no training pairs "
                f"({n_val} val + {n_test} test); lower the fractions or add data."
            )
        order = list(range(n))
        random.Random(seed).shuffle(order)
        parts = (order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test])
        return tuple(self._take(sorted(p)) for p in parts)  # type: ignore[return-value]

    def subset(self, n: int, seed: int = 0) -> ContrastivePairs:
        """``n`` pairs drawn without replacement (deterministic in ``seed``), in their original order."""
        check_positive(n, "n")
        if n > len(self):
            raise ValueError(f"`n` must be at most the number of pairs ({len(self)}), got {n}.")
        return self._take(sorted(random.Random(seed).sample(range(len(self)), n)))

    def data_hash(self) -> str:
        """sha256 (first 16 hex digits) of the texts, prompts and system message; stable across runs."""
        content = {"positive": self.positive, "negative": self.negative, "prompts": self.prompts, "system": self.system}
        return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]

    def format(self, tokenizer: Any, chat: bool | None = None) -> tuple[list[str], list[str]]:
        """Full texts (positive, negative): chat-formatted prompts, with the completion appended in completion mode."""
        _require_nonempty(self, "format")
        if self.prompts is None:
            pos, neg = (
                format_prompts(tokenizer, t, chat=chat, system=self.system) for t in (self.positive, self.negative)
            )
            return pos, neg
        heads = format_prompts(tokenizer, self.prompts, chat=chat, system=self.system)
        pos, neg = ([h + c for h, c in zip(heads, side, strict=True)] for side in (self.positive, self.negative))
        return pos, neg

    def batches(
        self, tokenizer: Any, batch_size: int = 8, chat: bool | None = None, max_length: int | None = None
    ) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """Yield ``(positive_batch, negative_batch)`` of left-padded tensors, in order.

        Each batch has ``input_ids``, ``attention_mask`` and ``position_ids`` (counted over real tokens,
        so left padding does not shift positions; pass them to the model). In completion mode each also
        has ``completion_mask`` (1 on completion tokens). Prompt and completion are tokenized separately
        and concatenated, so the completion boundary is exact.
        """
        _require_nonempty(self, "batches")
        check_positive(batch_size, "batch_size")
        check_positive(max_length, "max_length", optional=True)
        heads = None if self.prompts is None else format_prompts(tokenizer, self.prompts, chat=chat, system=self.system)
        sides = self.format(tokenizer, chat=chat) if heads is None else (self.positive, self.negative)
        for start in range(0, len(self), batch_size):
            part = slice(start, start + batch_size)
            pos, neg = (
                _encode_batch(tokenizer, None if heads is None else heads[part], s[part], max_length) for s in sides
            )
            yield pos, neg


def format_prompts(
    tokenizer: Any, prompts: Sequence[str], chat: bool | None = None, system: str | None = None
) -> list[str]:
    """Wrap user prompts in the chat template (``add_generation_prompt=True``), or return plain text.

    ``chat=None`` uses the template when the tokenizer has one; ``chat=True`` requires one; ``chat=False``
    gives plain text (``system``, a blank line, then the prompt, when a system message is set).
    """
    prompts = as_texts(prompts, "prompts")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_template if chat is None else bool(chat)
    if use_chat and not has_template:
        raise ValueError(
            f"`chat=True` but the tokenizer {type(tokenizer).__name__} has no chat template; "
            "pass `chat=False` (plain text) or set `tokenizer.chat_template`."
        )
    if not use_chat:
        return [p if system is None else f"{system}\n\n{p}" for p in prompts]
    prefix = [] if system is None else [{"role": "system", "content": system}]
    return [
        tokenizer.apply_chat_template(
            [*prefix, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` for ``texts``.

    Tokens follow :func:`encode`'s BOS rule; ``position_ids`` come from :func:`position_ids`, so every
    real token gets the position it has without padding. Texts longer than ``max_length`` keep their LAST
    ``max_length`` tokens, since metrics read the end.
    """
    texts = check_texts(texts, "texts")
    check_positive(max_length, "max_length", optional=True)
    return _encode_batch(tokenizer, None, texts, max_length)


def encode(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    """Token ids of ``text``, with the package's one BOS rule.

    Special tokens (BOS) are added unless ``special`` is False or the text already starts with the BOS
    string: a chat-formatted text carries its own BOS when the template writes one, so adding another
    would double it, while plain text gets the tokenizer's usual special tokens.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add = special and not (bos and text.startswith(bos))
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
    """``input_ids`` and ``attention_mask`` ``[batch, max_len]`` with padding on ``side``.

    Padding is built from token lists, so the tokenizer is never modified. LEFT padding puts every row's
    last real token at position ``-1`` (generation, last-token reads; pass :func:`position_ids` too);
    RIGHT padding leaves a causal model's computation of every real token unchanged (teacher forcing).
    """
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}.")
    lengths = [len(s) for s in seqs]
    if not lengths or min(lengths) == 0:
        where = "the batch is empty" if not lengths else f"text {lengths.index(0)} of the batch encodes to no tokens"
        raise ValueError(f"{where}; pass non-empty texts.")
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        input_ids[row, cols] = torch.tensor(list(s), dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens (``0`` on padding): a left-padded row sees the positions it has alone.

    Models with absolute position embeddings (GPT-2) otherwise shift every real token of a left-padded row.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_padded_batch(tokenizer: Any, seqs: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of token lists padded on the left."""
    input_ids, attention_mask = pad(seqs, pad_id(tokenizer), side="left")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}


def _encode_batch(
    tokenizer: Any, heads: Sequence[str] | None, texts: Sequence[str], max_length: int | None
) -> dict[str, Tensor]:
    """Left-padded batch of ``texts`` (prompt mode) or of ``heads[i] + texts[i]`` with a completion mask."""
    seqs = [encode(tokenizer, t, special=heads is None) for t in texts]
    empty = [t for t, ids in zip(texts, seqs, strict=True) if not ids]
    if empty:
        raise ValueError(f"texts {empty[:3]!r} encode to no tokens; pass non-empty texts (and completions).")
    marks = None
    if heads is not None:
        prefix = [encode(tokenizer, h) for h in heads]
        marks = [[0] * len(p) + [1] * len(c) for p, c in zip(prefix, seqs, strict=True)]
        seqs = [p + c for p, c in zip(prefix, seqs, strict=True)]
    if max_length is not None:
        seqs = [ids[-max_length:] for ids in seqs]
        marks = None if marks is None else [m[-max_length:] for m in marks]
    batch = left_padded_batch(tokenizer, seqs)
    if marks is not None:
        batch["completion_mask"] = pad(marks, 0, side="left")[0]
    return batch


def check_texts(values: Any, name: str) -> list[str]:
    """``values`` as a non-empty list of strings, or a ValueError naming the bad entry."""
    values = as_texts(values, name)
    if not values:
        raise ValueError(f"`{name}` is empty; pass at least one string.")
    return values


def check_positive(value: Any, name: str, optional: bool = False) -> Any:
    """``value`` if it is a positive int (or None when ``optional``), else a ValueError naming ``name``."""
    if optional and value is None:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if optional else ''}, got {value!r}.")
    return value


def _require_nonempty(pairs: ContrastivePairs, where: str) -> None:
    if len(pairs) == 0:
        raise ValueError(f"no contrastive pairs ({where}): positive and negative are empty; provide at least one pair.")
