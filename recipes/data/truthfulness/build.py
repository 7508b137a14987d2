"""Build the truthfulness recipe's data from TruthfulQA's binary multiple-choice columns.

Run from the repository root::

    .venv/bin/python recipes/data/truthfulness/build.py

Reads ``examples/data/truthfulqa/truthfulqa_binary.csv`` (all 790 TruthfulQA questions with their best
answer and best incorrect answer; Apache-2.0), shuffles the questions with ``random.Random(0)`` and cuts
them into disjoint parts, so no question is both seen in training or localization and scored:

- ``test_mc.json``: the first 250 questions: 200 held-out test items, then 50 validation items (the
  steering alphas are picked on these; ``Evaluator`` reads the first ``n_test`` rows as test);
- ``pairs.json``: the next 160 questions, for locating heads and steering directions (completion mode:
  question + correct answer vs question + incorrect answer);
- ``sft_train.jsonl``: the remaining 380 questions, question -> best answer, in TRL conversational format.

Rows of the ``.json`` files keep ``question``, ``correct`` (best answer), ``incorrect`` (best incorrect
answer), ``type`` and ``category``.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[2] / "examples" / "data" / "truthfulqa" / "truthfulqa_binary.csv"
SEED = 0
N_MC = 250  # 200 test + 50 validation
N_PAIRS = 160
N_QUESTIONS = 790


def read_questions(path: Path = SOURCE) -> list[dict[str, str]]:
    """TruthfulQA rows as ``{question, correct, incorrect, type, category}``, in file order."""
    if not path.is_file():
        raise ValueError(f"{path} not found; it ships with the repository (examples/data/truthfulqa).")
    with path.open(encoding="utf-8", newline="") as f:
        rows = [
            {
                "question": r["Question"].strip(),
                "correct": r["Best Answer"].strip(),
                "incorrect": r["Best Incorrect Answer"].strip(),
                "type": r["Type"],
                "category": r["Category"],
            }
            for r in csv.DictReader(f)
        ]
    if len(rows) != N_QUESTIONS or len({r["question"] for r in rows}) != N_QUESTIONS:
        raise ValueError(f"{path} must hold {N_QUESTIONS} distinct questions, got {len(rows)}.")
    if any(not (r["correct"] and r["incorrect"]) or r["correct"] == r["incorrect"] for r in rows):
        raise ValueError(f"{path}: every question needs two different, non-empty answers.")
    return rows


def build(path: Path = SOURCE) -> dict[str, list[dict]]:
    """``{"test_mc": rows, "pairs": rows, "sft_train": TRL rows}`` (deterministic)."""
    rows = read_questions(path)
    random.Random(SEED).shuffle(rows)
    mc, pairs, train = rows[:N_MC], rows[N_MC : N_MC + N_PAIRS], rows[N_MC + N_PAIRS :]
    sft = [
        {
            "prompt": [{"role": "user", "content": r["question"]}],
            "completion": [{"role": "assistant", "content": r["correct"]}],
        }
        for r in train
    ]
    return {"test_mc": mc, "pairs": pairs, "sft_train": sft}


def write(parts: dict[str, list[dict]], folder: Path = HERE) -> None:
    for stem in ("test_mc", "pairs"):
        text = json.dumps(parts[stem], indent=1, ensure_ascii=False) + "\n"
        (folder / f"{stem}.json").write_text(text, encoding="utf-8")
    with (folder / "sft_train.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in parts["sft_train"])


def main() -> None:
    parts = build()
    write(parts)
    print({name: len(rows) for name, rows in parts.items()})


if __name__ == "__main__":
    main()
