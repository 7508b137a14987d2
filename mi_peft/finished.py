"""Finished variants of a recipe run, kept on disk so that a stopped run continues where it stopped.

The full evidence run trains dozens of variants for hours on a CPU. Each trained and scored variant
writes its report row to ``<out>/finished/<variant folder>/row.json``; ``mi-peft run --resume`` reads
those rows back instead of training again. The located selection (``<out>/localization``, minutes of
gradients on a CPU) is read back the same way: ``<out>/finished/localization.key`` records the key it
was saved under. A row counts only when it was written under the same
recipe settings and mi-peft version (its key); a row from other settings is trained again, never
mixed into the report. The key holds the settings that differ from mi-peft's defaults, so a new recipe
field (with a default) keeps finished rows valid; a changed default needs a fresh ``--out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from . import __version__
from ._io import write_folder_atomically, write_text_atomically
from .recipe import Recipe

# Settings that do not change how any one trained variant is trained or scored: how many variants run,
# the steering sweep and the prompting row (their rows are recomputed on every run).
_IGNORED = {"description", "steer", "train.seeds", "train.param_budgets", "evaluate.prompt_baseline"}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _changed(obj: Any, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` (the JSON form of dataclass ``obj``) without ignored fields and fields left at their default."""
    out = {}
    for f in dataclasses.fields(obj):
        name, value = prefix + f.name, values[f.name]
        if name in _IGNORED:
            continue
        if dataclasses.is_dataclass(getattr(obj, f.name)):
            value = _changed(getattr(obj, f.name), value, prefix=f"{name}.")
        elif json.loads(json.dumps(_default(f), default=str)) == value:
            continue
        out[f.name] = value
    return out


def settings_key(recipe: Recipe) -> str:
    """A hash of the recipe settings (those not at their default) that change how a variant is trained or scored."""
    settings = _changed(recipe, recipe.to_dict())
    text = json.dumps({"recipe": settings, "mi_peft": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FinishedRows:
    """Read and write the rows of finished variants under ``out/finished`` (reads only with ``resume``)."""

    def __init__(self, out: Path, recipe: Recipe, resume: bool):
        self.folder, self.key, self.resume = Path(out) / "finished", settings_key(recipe), resume
        self.localization_folder, self.localization_key = Path(out) / "localization", self.folder / "localization.key"

    def get(self, name: str) -> tuple[dict[str, Any], list[float]] | None:
        """The row and loss curve saved for variant folder ``name``, or None (not resuming, absent, stale)."""
        path = self.folder / name / "row.json"
        if not self.resume or not path.is_file():
            return None
        saved = json.loads(path.read_text())
        if saved.get("key") != self.key:
            return None
        return saved["row"], saved["losses"]

    def localization(self) -> Any | None:
        """The run's saved LocalizationResult when resuming and it was saved under the same key, else None."""
        from .locate import LocalizationResult

        key_file, saved = self.localization_key, self.localization_folder
        if not self.resume or not key_file.is_file() or key_file.read_text().strip() != self.key:
            return None
        return LocalizationResult.load(saved) if saved.is_dir() else None

    def put_localization(self, result: Any) -> None:
        """Save ``result`` as the run's ``localization`` folder, then record the key it was saved under."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.localization_key.unlink(missing_ok=True)  # a killed save must not leave a stale key
        result.save(self.localization_folder)
        write_text_atomically(self.localization_key, self.key)

    def put(self, name: str, row: dict[str, Any], losses: list[float]) -> None:
        """Save one finished variant's row (atomically: a killed run leaves the old row or none)."""
        payload = json.dumps({"key": self.key, "row": row, "losses": list(losses)}, default=str)
        write_folder_atomically(self.folder / name, lambda tmp: (tmp / "row.json").write_text(payload))
