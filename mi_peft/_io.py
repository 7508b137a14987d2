"""Atomic folder writes: a save either completes or leaves the previous folder (or none)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_folder_atomically(path: str | os.PathLike, write: Callable[[Path], None], own_files: set[str]) -> None:
    """Run ``write(tmp)`` on a fresh folder beside ``path``, then rename it to ``path``.

    An existing ``path`` is replaced only if it holds nothing but ``own_files`` (a save never
    deletes unrelated data); it is put back if the final rename fails.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; pass a folder path.")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in own_files)
        if foreign:
            raise ValueError(
                f"{target} holds other files ({foreign[:5]}); refusing to overwrite it. Pick another folder."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / target.name).exists() and not target.exists():
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
