"""Reading contrastive data and prompt lists from rows, columns, files, directories and datasets.

The file layouts are described in :mod:`mi_peft.data`; every reader returns plain Python rows or
columns, and every bad input raises a ``ValueError`` naming the file, row or column and the fix.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DIRECTORY_LAYOUTS: tuple[tuple[str, str], ...] = (("positive", "negative"), ("harmful", "harmless"))
_SUFFIXES = (".json", ".jsonl")


def as_texts(values: Any, name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"`{name}` must be a list of strings, got {type(values).__name__}.")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"`{name}`[{i}] must be a string, got {type(v).__name__} ({v!r}).")
    return list(values)


def single_turn_texts(values: Any, name: str) -> list[str]:
    """Strings as they are; a TRL conversational cell (a list of ``{"role", "content"}`` messages) as its one
    message's content.

    A preference or SFT row in TRL's conversational format (``prompt=[{"role": "user", ...}]``,
    ``chosen=[{"role": "assistant", ...}]``) then loads like its plain-text twin. A cell with several
    messages would lose all but one of them, so it raises instead.
    """
    if isinstance(values, str) or not isinstance(values, Sequence):
        return as_texts(values, name)
    texts = []
    for i, value in enumerate(values):
        if isinstance(value, list) and all(isinstance(m, Mapping) and "content" in m for m in value):
            if len(value) != 1:
                roles = [m.get("role") for m in value]
                raise ValueError(
                    f"`{name}`[{i}] holds {len(value)} messages {roles}; contrastive pairs take one user turn per "
                    "prompt and one assistant turn per completion. Keep single-turn rows, or pass a shared "
                    "system prompt with `system=` instead of a system message."
                )
            value = value[0]["content"]
        texts.append(value)
    return as_texts(texts, name)


def _is_dataset(source: Any) -> bool:
    if "datasets" not in sys.modules:  # a Dataset object implies the module is loaded; avoid the import cost
        return False
    import datasets

    if isinstance(source, datasets.DatasetDict):
        raise ValueError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. `dataset['train']`.")
    return isinstance(source, datasets.Dataset)


def columns_of(source: Any, where: str, keys: Sequence[str]) -> dict[str, list[Any]]:
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
        source = {k: [row.get(k) for row in source] for k in keys if k in present}  # a gap fails in as_texts
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


def read_file(path: Path) -> Any:
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
    rows = read_file(path)
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
    return as_texts([row[text_key] if isinstance(row, Mapping) else row for row in rows], str(path))


def read_directory(folder: Path, text_key: str, split: str | None) -> dict[str, list[str]]:
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
