"""Contrastive data: pairs of prompts (or completions) with and without a behaviour.

``positive`` holds the behaviour-present side (e.g. harmful prompts, which a chat model refuses),
``negative`` the behaviour-absent side (harmless prompts). Two modes:

- **prompt mode**: ``positive[i]`` and ``negative[i]`` are user prompts;
- **completion mode** (:meth:`ContrastivePairs.from_completions`): one shared ``prompts[i]`` and two
  completions ``positive[i]`` / ``negative[i]`` (e.g. the matching and non-matching A/B answer).

:meth:`ContrastivePairs.load` reads a list of dicts (rows), a dict of lists (columns), a ``.json`` file of
either, ``.jsonl`` (one row per line), ``.csv``/``.tsv`` with a header, a ``datasets.Dataset`` (columns named
by ``positive_key``, ``negative_key``, ``prompt_key``), or a **directory** holding ``positive.json`` +
``negative.json`` or ``harmful.json`` + ``harmless.json`` (``.jsonl`` too): lists of strings or of rows
read at ``text_key`` (default ``"instruction"``). In a directory, ``split="test"`` reads ``<name>_test.json``
instead, and a ``prompts.json`` beside them selects completion mode. ``recipes/data/refusal`` uses this layout.

Prompts get the tokenizer's chat template (``add_generation_prompt=True``) when it has one. Batches are
LEFT-padded here (``pad_token_id``, else ``eos_token_id``, else 0), so position ``-1`` is every row's last
real token; the tokenizer itself is never modified (no ``padding_side`` or ``pad_token`` change).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

DIRECTORY_LAYOUTS: tuple[tuple[str, str], ...] = (("positive", "negative"), ("harmful", "harmless"))
_SUFFIXES = (".json", ".jsonl")


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
        self.positive, self.negative = _as_texts(self.positive, "positive"), _as_texts(self.negative, "negative")
        self.prompts = None if self.prompts is None else _as_texts(self.prompts, "prompts")
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
            where, table = str(path), _read_directory(path, text_key, split) if path.is_dir() else _read_file(path)
            if path.is_dir():
                keys = ["positive", "negative"] + (["prompts"] if "prompts" in table else [])
        columns = {k: _as_texts(v, k) for k, v in _columns(table, where, keys).items()}
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
        _check_positive(n, "n")
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
        _check_positive(batch_size, "batch_size")
        _check_positive(max_length, "max_length", optional=True)
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
    prompts = _as_texts(prompts, "prompts")
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

    Special tokens (e.g. BOS) are added unless the text already starts with the BOS string (as a
    chat-formatted text usually does). Texts longer than ``max_length`` keep their LAST ``max_length``
    tokens, since metrics read the end.
    """
    texts = _as_texts(texts, "texts")
    if not texts:
        raise ValueError("`texts` is empty; nothing to tokenize.")
    _check_positive(max_length, "max_length", optional=True)
    return _encode_batch(tokenizer, None, texts, max_length)


def _encode_batch(
    tokenizer: Any, heads: Sequence[str] | None, texts: Sequence[str], max_length: int | None
) -> dict[str, Tensor]:
    """Left-padded batch of ``texts`` (prompt mode) or of ``heads[i] + texts[i]`` with a completion mask."""
    seqs = [_encode(tokenizer, t, special=heads is None) for t in texts]
    empty = [t for t, ids in zip(texts, seqs, strict=True) if not ids]
    if empty:
        raise ValueError(f"texts {empty[:3]!r} encode to no tokens; pass non-empty texts (and completions).")
    marks = None
    if heads is not None:
        prefix = [_encode(tokenizer, h, special=True) for h in heads]
        marks = [[0] * len(p) + [1] * len(c) for p, c in zip(prefix, seqs, strict=True)]
        seqs = [p + c for p, c in zip(prefix, seqs, strict=True)]
    if max_length is not None:
        seqs = [ids[-max_length:] for ids in seqs]
        marks = None if marks is None else [m[-max_length:] for m in marks]
    pad_id = next((v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if isinstance(v, int)), 0)
    attention_mask = _pad_left([[1] * len(s) for s in seqs], 0)
    batch = {
        "input_ids": _pad_left(seqs, pad_id),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
    }
    if marks is not None:
        batch["completion_mask"] = _pad_left(marks, 0)
    return batch


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    """Token ids; special tokens are added unless ``special`` is False or the text starts with the BOS string."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer(text, add_special_tokens=special and not (bos and text.startswith(bos)))["input_ids"])


def _pad_left(rows: list[list[int]], value: int) -> Tensor:
    flipped = [torch.tensor(r[::-1], dtype=torch.long) for r in rows]
    return pad_sequence(flipped, batch_first=True, padding_value=value).flip(-1)


def _check_positive(value: Any, name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer{' or None' if optional else ''}, got {value!r}.")


def _require_nonempty(pairs: ContrastivePairs, where: str) -> None:
    if len(pairs) == 0:
        raise ValueError(f"no contrastive pairs ({where}): positive and negative are empty; provide at least one pair.")


def _as_texts(values: Any, name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"`{name}` must be a list of strings, got {type(values).__name__}.")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"`{name}`[{i}] must be a string, got {type(v).__name__} ({v!r}).")
    return list(values)


def _is_dataset(source: Any) -> bool:
    if "datasets" not in sys.modules:  # a Dataset object implies the module is loaded; avoid the import cost
        return False
    import datasets

    if isinstance(source, datasets.DatasetDict):
        raise ValueError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. `dataset['train']`.")
    return isinstance(source, datasets.Dataset)


def _columns(source: Any, where: str, keys: Sequence[str]) -> dict[str, list[Any]]:
    """The ``keys`` columns of rows (list of dicts), columns (dict of lists) or a ``datasets.Dataset``."""
    if _is_dataset(source):
        present = list(source.column_names)
    elif isinstance(source, Mapping):
        if not all(isinstance(v, Sequence) and not isinstance(v, str) for v in source.values()):
            raise ValueError(f"{where}: a dict source must map column names to lists; got keys {sorted(source)}.")
        present = list(source)
    elif isinstance(source, Sequence) and not isinstance(source, str):
        if not source:
            raise ValueError(f"{where} holds no rows; provide at least one pair.")
        bad = next((i for i, row in enumerate(source) if not isinstance(row, Mapping)), None)
        if bad is not None:
            raise ValueError(f"{where}: row {bad} must be a dict of columns, got {type(source[bad]).__name__}.")
        present = sorted({k for row in source for k in row})
        source = {k: [row.get(k) for row in source] for k in keys if k in present}  # a gap fails in _as_texts
    else:
        raise ValueError(
            f"cannot load contrastive pairs from {type(source).__name__}; pass a list of dicts, a dict of lists, "
            "a path (.json, .jsonl, .csv, .tsv or a directory) or a datasets.Dataset."
        )
    for key in keys:
        if key not in present:
            raise ValueError(
                f"column {key!r} not found in {where}; columns present: {sorted(present)}. "
                "Pass `positive_key=`, `negative_key=` (and `prompt_key=`) naming existing columns."
            )
    return {k: list(source[k]) for k in keys}


def _read_file(path: Path) -> Any:
    """Parsed content of a .json (any JSON), .jsonl (list of rows), .csv/.tsv (list of row dicts) file."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _parse_json(path.read_text(encoding="utf-8"), repr(str(path)))
    if suffix == ".jsonl":
        lines = enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        return [_parse_json(line, f"{str(path)!r} line {n}") for n, line in lines if line.strip()]
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(
        f"unsupported file type {suffix!r} for {str(path)!r}; use .json, .jsonl, .csv, .tsv or a directory."
    )


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}.") from err


def _find(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in _SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def read_rows(path: str | Path) -> list[Any]:
    """Rows of a .json (list), .jsonl, .csv or .tsv file (e.g. A/B items or held-out prompts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist.")
    rows = _read_file(path)
    if not isinstance(rows, list):
        raise ValueError(f"{str(path)!r} must hold a list of strings or of rows, got {type(rows).__name__}.")
    return rows


def read_texts(path: str | Path, text_key: str = "instruction") -> list[str]:
    """Prompts from a file of strings or of rows (read at ``text_key``)."""
    rows = read_rows(path)
    for i, row in enumerate(rows):
        if isinstance(row, Mapping) and text_key not in row:
            raise ValueError(
                f"{str(path)!r} row {i} has no column {text_key!r}; columns present: {sorted(row)}. "
                "Pass `text_key=` naming the text column."
            )
    return _as_texts([row[text_key] if isinstance(row, Mapping) else row for row in rows], str(path))


def _read_directory(folder: Path, text_key: str, split: str | None) -> dict[str, list[str]]:
    """Columns ``positive``, ``negative`` (and ``prompts``) from a directory of per-side files."""
    tag = "" if split is None else f"_{split}"
    for pos_name, neg_name in DIRECTORY_LAYOUTS:
        pos, neg = _find(folder, pos_name + tag), _find(folder, neg_name + tag)
        if pos is None and neg is None:
            continue
        if pos is None or neg is None:
            missing = f"{pos_name if pos is None else neg_name}{tag}.json"
            raise ValueError(f"{str(folder)!r} has {(pos or neg).name} but no {missing}; both sides are needed.")
        table = {"positive": read_texts(pos, text_key), "negative": read_texts(neg, text_key)}
        prompts = _find(folder, "prompts" + tag)
        return table if prompts is None else {**table, "prompts": read_texts(prompts, text_key)}
    expected = " or ".join(f"{p}{tag}.json + {n}{tag}.json" for p, n in DIRECTORY_LAYOUTS)
    present = sorted(p.name for p in folder.iterdir())
    raise ValueError(f"directory {str(folder)!r} holds no {expected} (.jsonl also accepted); files present: {present}.")
