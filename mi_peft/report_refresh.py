"""Re-derive a finished run's verdicts and rewrite its report with this version's report code.

Training a recipe's variants takes hours on a CPU; the statistics and the wording of a report do not
need any of it. ``refresh_report(out)`` reads ``results.json`` and the saved ``localization/`` of a
finished ``mi-peft run``, recomputes the verdicts (located vs random vs matched LoRA, with their
intervals) from the pooled per-variant counts, and rewrites ``report.md``, the plots and
``results.json``. Every measured number stays as it was measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ._io import write_text_atomically
from .aggregate import verdicts
from .locate import LocalizationResult
from .report import results_json, write_report


def _load_results(out: Path) -> dict[str, Any]:
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass the --out folder of a finished `mi-peft run` (it holds results.json)."
        )
    results = json.loads(path.read_text())
    missing = {"recipe", "variants", "steering", "validation", "localization", "losses", "timings"} - set(results)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: it was not written by `mi-peft run`; nothing was changed.")
    return results


def refresh_report(out: str | os.PathLike) -> Path:
    """Recompute ``verdicts`` in ``out/results.json`` and rewrite ``out/report.md`` and plots; return the report path.

    The score plots are drawn from ``out/localization`` where the run's folder still has it; a copy of the
    report without it (e.g. under ``docs/results``) keeps the score plots it has.

    Raises:
        FileNotFoundError: ``out`` holds no ``results.json``.
        ValueError: ``results.json`` is not a ``mi-peft run`` results file (nothing is written then).
    """
    out = Path(out)
    results = _load_results(out)
    saved = out / "localization"
    localization = LocalizationResult.load(saved) if saved.is_dir() else None
    results["verdicts"] = verdicts(results["variants"])
    text = results_json(results)  # before any file is written: a failure leaves the folder as it was
    report = write_report(out, results, localization)
    write_text_atomically(out / "results.json", text)
    return report
