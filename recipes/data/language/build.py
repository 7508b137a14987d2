"""Build the French-vs-English contrast set and "reply in French" SFT rows from MGSM (google-research/url-nlp).

Run from the repository root::

    .venv/bin/python recipes/data/language/build.py [--source PATH/TO/shared/data]

MGSM rows are line-aligned across languages (row ``i`` is the same GSM8K problem), so ``positive[i]`` (French) and
``negative[i]`` (English) are exact translations: the pair differs in language only. Rows 0-199 are training
data, rows 200-249 the held-out test split. ``classes.json`` (rows 0-99 in four languages) is for LAPE-style
language-specific neuron localisation. The "reply in French" SFT rows come from ``distill.py`` (the model's own
French replies to generic instructions), not from MGSM: short answer sentences taught a template, not the language.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN, N_ROWS, N_CLASS = 200, 250, 100
CLASS_LANGUAGES = ("en", "fr", "de", "es")


def default_source() -> Path:
    """``$MI_PEFT_SHARED_DATA``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("MI_PEFT_SHARED_DATA")
    return Path(env) if env else HERE.parents[3] / "shared" / "data"


def read_mgsm(source: Path, lang: str) -> list[tuple[str, str]]:
    """``(question, answer)`` rows of ``multilingual/mgsm/mgsm_<lang>.tsv`` (tab-separated, no quoting)."""
    path = source / "multilingual" / "mgsm" / f"mgsm_{lang}.tsv"
    if not path.is_file():
        raise ValueError(
            f"{path} not found; pass --source pointing at a folder holding multilingual/mgsm/ copied from "
            "google-research/url-nlp @ 452a21ad3dae5668c06ceeac21ff073e1e40f9be : mgsm/."
        )
    with path.open(newline="", encoding="utf-8") as f:
        rows = [tuple(r) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    bad = next((i for i, r in enumerate(rows) if len(r) != 2 or not r[0].strip()), None)
    if bad is not None or len(rows) != N_ROWS:
        raise ValueError(f"{path}: expected {N_ROWS} rows of 'question<TAB>answer'; row {bad} or the count is off.")
    return [(q.strip(), a.strip()) for q, a in rows]


def build(source: Path) -> dict[str, object]:
    """JSON outputs keyed by file stem."""
    mgsm = {lang: read_mgsm(source, lang) for lang in CLASS_LANGUAGES}
    en, fr = mgsm["en"], mgsm["fr"]
    if [a for _, a in en] != [a for _, a in fr]:
        raise ValueError("mgsm_en.tsv and mgsm_fr.tsv answers differ; the files are not line-aligned.")
    questions = {lang: [q for q, _ in rows] for lang, rows in mgsm.items()}
    outputs: dict[str, object] = {
        "positive": questions["fr"][:N_TRAIN],
        "negative": questions["en"][:N_TRAIN],
        "positive_test": questions["fr"][N_TRAIN:],
        "negative_test": questions["en"][N_TRAIN:],
        "classes": {lang: questions[lang][:N_CLASS] for lang in CLASS_LANGUAGES},
    }
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=default_source(), help="folder holding multilingual/mgsm/")
    args = parser.parse_args()
    outputs = build(args.source)
    for stem, value in outputs.items():
        (HERE / f"{stem}.json").write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print({stem: len(v) for stem, v in outputs.items()})


if __name__ == "__main__":
    main()
