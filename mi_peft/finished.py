"""Finished variants of a recipe run, kept on disk so that a stopped run continues where it stopped.

The full evidence run trains dozens of variants for hours on a CPU. Each trained and scored variant
writes its report row to ``<out>/finished/<variant folder>/row.json``; ``mi-peft run --resume`` reads
those rows back instead of training again. A row counts only when it was written under the same
recipe settings and mi-peft version (its key); a row from other settings is trained again, never
mixed into the report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import __version__
from ._io import write_folder_atomically
from .recipe import Recipe

_RUN_WIDE = ("seeds", "param_budgets")  # how many variants run, not how any one of them is trained


def settings_key(recipe: Recipe) -> str:
    """A hash of every recipe setting that changes how one variant is trained or scored."""
    settings = recipe.to_dict()
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in _RUN_WIDE}
    text = json.dumps({"recipe": settings, "mi_peft": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FinishedRows:
    """Read and write the rows of finished variants under ``out/finished`` (reads only with ``resume``)."""

    def __init__(self, out: Path, recipe: Recipe, resume: bool):
        self.folder, self.key, self.resume = Path(out) / "finished", settings_key(recipe), resume

    def get(self, name: str) -> tuple[dict[str, Any], list[float]] | None:
        """The row and loss curve saved for variant folder ``name``, or None (not resuming, absent, stale)."""
        path = self.folder / name / "row.json"
        if not self.resume or not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("key") != self.key:
            return None
        return saved["row"], saved["losses"]

    def put(self, name: str, row: dict[str, Any], losses: list[float]) -> None:
        """Save one finished variant's row (atomically: a killed run leaves the old row or none)."""
        payload = json.dumps({"key": self.key, "row": row, "losses": list(losses)}, default=str)
        write_folder_atomically(self.folder / name, lambda tmp: (tmp / "row.json").write_text(payload))
