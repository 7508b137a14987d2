"""Build the French-vs-English contrast set and "reply in French" SFT rows from MGSM (google-research/url-nlp).

Run from the repository root::

    .venv/bin/python recipes/data/language/build.py [--source PATH/TO/shared/data]

MGSM rows are line-aligned across languages (row ``i`` is the same GSM8K problem), so ``positive[i]`` (French) and
``negative[i]`` (English) are exact translations: the pair differs in language only. Rows 0-199 are training
data, rows 200-249 the held-out test split. ``classes.json`` (rows 0-99 in four languages) is for LAPE-style
language-specific neuron localisation. ``sft_train.jsonl`` teaches the behaviour "reply in French to an English
question": prompt = English question, completion = a short French sentence stating the MGSM answer.
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
# Rotated over the rows so the completions are not one fixed string around the number.
FRENCH_ANSWERS: tuple[str, ...] = (
    "La réponse est {answer}.",
    "Le résultat est {answer}.",
    "Après calcul, on obtient {answer}.",
    "La bonne réponse est {answer}.",
)


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


def french_answer(answer: str, index: int) -> str:
    """A French sentence giving the MGSM ``answer`` (thousands commas dropped: ``"2,125"`` -> ``2125``)."""
    number = answer.replace(",", "")
    if not number.lstrip("-").isdigit():
        raise ValueError(f"MGSM answer {answer!r} (row {index}) is not an integer; update french_answer().")
    return FRENCH_ANSWERS[index % len(FRENCH_ANSWERS)].format(answer=number)


def build(source: Path) -> tuple[dict[str, object], list[dict]]:
    """JSON outputs keyed by file stem, and the SFT rows."""
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
    sft = [
        {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": french_answer(answer, i)}],
        }
        for i, (question, answer) in enumerate(en[:N_TRAIN])
    ]
    return outputs, sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=default_source(), help="folder holding multilingual/mgsm/")
    args = parser.parse_args()
    outputs, sft = build(args.source)
    for stem, value in outputs.items():
        (HERE / f"{stem}.json").write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with (HERE / "sft_train.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in sft)
    print({stem: len(v) for stem, v in outputs.items()} | {"sft_train": len(sft)})


if __name__ == "__main__":
    main()
