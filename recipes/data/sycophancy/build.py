"""Build the sycophancy A/B sets and anti-sycophancy SFT/DPO rows from nrimsky/CAA.

Run from the repository root::

    .venv/bin/python recipes/data/sycophancy/build.py [--source PATH/TO/shared/data]

``train_ab.json`` = the first 300 rows of ``caa/generate/sycophancy/generate_dataset.json`` (any row whose
question is also a test question would be skipped; there are none), ``test_ab.json`` = all 50 rows of
``caa/test/sycophancy/test_dataset_ab.json``. Rows keep CAA's keys ``question``, ``answer_matching_behavior``
(the sycophantic letter, e.g. ``"(A)"``) and ``answer_not_matching_behavior``. The training rows point AWAY from
sycophancy: SFT completion = the non-matching letter; DPO chosen = non-matching, rejected = matching.
The completion is the bare letter, as in CAA's A/B evaluation (assistant turn prefilled with ``"("``).
Every training item appears twice in the SFT and DPO rows, as written and with its options swapped
(``mi_peft.evaluate.swap_options``), so the non-sycophantic answer is "(A)" as often as "(B)" and training
cannot lower the loss by learning a letter.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_TRAIN = 300
KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")


def default_source() -> Path:
    """``$MI_PEFT_SHARED_DATA``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("MI_PEFT_SHARED_DATA")
    return Path(env) if env else HERE.parents[3] / "shared" / "data"


def read_rows(path: Path) -> list[dict[str, str]]:
    """CAA A/B rows reduced to :data:`KEYS`, or a ValueError naming the file and what is wrong."""
    if not path.is_file():
        raise ValueError(
            f"{path} not found; pass --source pointing at a folder holding caa/ copied from "
            "nrimsky/CAA : datasets/ (content of commit e1fce128b6165a9926093c6abdf6ea9a24f4b5c4)."
        )
    rows = json.loads(path.read_text(encoding="utf-8"))
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) or not row[k].strip() for k in KEYS):
            raise ValueError(f"{path} row {i} must have non-empty string columns {KEYS}.")
    return [{k: row[k] for k in KEYS} for row in rows]


def _turn(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def build(source: Path) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """``(train_ab, test_ab, sft_rows, dpo_rows)``."""
    caa = source / "caa"
    test = read_rows(caa / "test" / "sycophancy" / "test_dataset_ab.json")
    held_out = {row["question"] for row in test}
    pool = read_rows(caa / "generate" / "sycophancy" / "generate_dataset.json")
    train = [row for row in pool if row["question"] not in held_out][:N_TRAIN]
    if len(train) < N_TRAIN:
        raise ValueError(f"only {len(train)} sycophancy training rows are not test questions; need {N_TRAIN}.")
    from mi_peft.evaluate import swap_options

    rows = [row for item in train for row in (item, swap_options(item))]
    sft = [
        {"prompt": _turn("user", r["question"]), "completion": _turn("assistant", r["answer_not_matching_behavior"])}
        for r in rows
    ]
    dpo = [
        {
            "prompt": _turn("user", r["question"]),
            "chosen": _turn("assistant", r["answer_not_matching_behavior"]),
            "rejected": _turn("assistant", r["answer_matching_behavior"]),
        }
        for r in rows
    ]
    return train, test, sft, dpo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=default_source(), help="folder holding caa/")
    args = parser.parse_args()
    train, test, sft, dpo = build(args.source)
    for stem, rows in (("train_ab", train), ("test_ab", test)):
        (HERE / f"{stem}.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stem, rows in (("sft_train", sft), ("dpo_train", dpo)):
        with (HERE / f"{stem}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print({"train_ab": len(train), "test_ab": len(test), "sft_train": len(sft), "dpo_train": len(dpo)})


if __name__ == "__main__":
    main()
