"""Atomic folder writes: a save either completes or leaves the previous folder (or none) as it was.

Every folder mi-peft writes (adapters, LoRA exports, localization results, directions, the cached
embedded model) goes through :func:`write_folder_atomically`, so all of them follow one rule.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__


def write_folder_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``path``, then move it to ``path``.

    Overwrite rule: an existing folder at ``path`` is replaced as a whole, but only when every entry
    in it is one that this write also produced (a re-save of the same kind of folder); a folder holding
    anything else is left untouched and a ``ValueError`` names the foreign entries, so a save never
    deletes data it did not write. A file at ``path`` is refused the same way.

    Failure rule: if ``write`` or the final move fails, the previous folder (if any) is back at
    ``path`` exactly as it was and no temporary folder is left behind. Returns the absolute ``path``.
    """
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; pass a folder path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        _check_replaceable(target, {p.name for p in tmp.iterdir()})
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return target


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to the file ``path`` through a temporary file beside it: a killed write leaves the old file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _check_replaceable(target: Path, produced: set[str]) -> None:
    """Refuse to replace a folder that holds entries the new write did not produce."""
    if not target.is_dir():
        return
    foreign = sorted(p.name for p in target.iterdir() if p.name not in produced)
    if foreign:
        raise ValueError(
            f"{target} holds files this save does not write ({foreign[:5]}); refusing to overwrite it. "
            "Pick another folder, or remove those files first."
        )


def _swap_in(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; a previous ``target`` is set aside first and restored if the move fails."""
    if not target.exists():
        os.replace(tmp, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, aside / target.name)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(aside / target.name, target)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def save_tensors_folder(
    path: str | os.PathLike, tensors_file: str, tensors: dict[str, torch.Tensor], meta_file: str, meta: dict
) -> Path:
    """Write ``tensors`` (safetensors) and ``meta`` (JSON) into folder ``path`` with :func:`write_folder_atomically`."""

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / tensors_file), metadata={"format": "pt"})
        (folder / meta_file).write_text(json.dumps(meta, indent=2, sort_keys=True))

    return write_folder_atomically(path, write)


def load_tensors_folder(
    path: str | os.PathLike, tensors_file: str, meta_file: str, kind: str, format_version: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a folder written by :func:`save_tensors_folder` for ``kind``.

    A missing file raises ``FileNotFoundError``; metadata of another kind or of a newer format than
    ``format_version`` raises ``ValueError``.
    """
    folder = Path(path)
    for file in (folder, folder / meta_file, folder / tensors_file):
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist; expected a folder written by `{kind}.save`.")
    meta = json.loads((folder / meta_file).read_text())
    if meta.get("format") != f"mi_peft.{kind}" or meta.get("format_version", 0) > format_version:
        raise ValueError(f"{folder / meta_file} is not a {kind} file that mi-peft {__version__} can read.")
    return load_file(str(folder / tensors_file)), meta
