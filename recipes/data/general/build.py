"""Build the general-ability evaluation files (PIQA, BLiMP, WikiText-2 excerpt, generic instructions).

Run from the repository root::

    .venv/bin/python recipes/data/general/build.py [--source PATH/TO/shared/data]

Every output is a verbatim cut of an upstream file (whole lines kept byte for byte), except
``generic_instructions.json``, which keeps whole Alpaca rows but selects them: the first ``N_INSTRUCTIONS``
rows of the Alpaca sample whose instruction occurs in no other ``recipes/data`` file (so the generic
instructions are held out from every training and contrast set shipped here). See SOURCE.md.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2].parent / "shared" / "data"
N_PIQA = 500
N_BLIMP_PER_PHENOMENON = 10
WIKITEXT_MIN_BYTES = 100_000
N_INSTRUCTIONS = 200
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def head_lines(path: Path, n: int) -> str:
    with path.open(encoding="utf-8", newline="") as f:
        lines = f.readlines()
    if len(lines) < n:
        raise ValueError(f"{path} has {len(lines)} lines, fewer than the {n} to keep.")
    return "".join(lines[:n])


def wikitext_excerpt(path: Path, min_bytes: int) -> str:
    """The first whole articles of ``path`` that together reach ``min_bytes`` (cut before the next article)."""
    with path.open(encoding="utf-8", newline="") as f:
        lines = f.readlines()
    kept: list[str] = []
    size = 0
    for line in lines:
        if size >= min_bytes and _ARTICLE_HEADING.match(line.rstrip("\n")):
            return "".join(kept)
        kept.append(line)
        size += len(line.encode("utf-8"))
    raise ValueError(f"{path} has no article boundary after {min_bytes} bytes.")


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


RAW_TEACHER_LOGS = "teacher_replies"  # distillation filter input, never trained or scored on


def recipe_strings(data_dir: Path, skip: Path = HERE) -> list[str]:
    """Every string value in the ``recipes/data`` JSON / JSONL files outside ``skip``, normalised.

    Raw teacher logs (``teacher_replies*.jsonl``) are left out: they hold every reply a distillation teacher
    wrote, kept or not, so an English reply the filter drops (one is the quiz question "What is the capital of
    France?") would otherwise take a generic instruction away; the rows built from them are read.
    """
    found: list[str] = []
    for path in sorted(data_dir.rglob("*.json*")):
        if path.resolve().parent == skip or path.name.startswith(RAW_TEACHER_LOGS):
            continue
        text = path.read_text(encoding="utf-8")
        rows = (
            [json.loads(line) for line in text.splitlines() if line.strip()]
            if path.suffix == ".jsonl"
            else [json.loads(text)]
        )
        found.extend(normalise(s) for s in _strings(rows))
    return found


def held_out_instructions(sample: Path, data_dir: Path, n: int) -> list[dict]:
    """The first ``n`` sample rows whose instruction is in (or inside) no other recipe data string."""
    taken = recipe_strings(data_dir)
    exact = set(taken)
    rows = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept, skipped = [], 0
    for row in rows:
        key = normalise(row["instruction"])
        if key in exact or any(key in s for s in taken):
            skipped += 1
            continue
        kept.append(row)
        if len(kept) == n:
            print(f"skipped {skipped} sample rows found in other recipe data")
            return kept
    raise ValueError(f"only {len(kept)} held-out instructions in {sample}; need {n}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the shared/data folder")
    src = parser.parse_args().source
    (HERE / "piqa").mkdir(exist_ok=True)
    (HERE / "piqa" / "valid.jsonl").write_text(head_lines(src / "general/piqa/valid.jsonl", N_PIQA), encoding="utf-8")
    labels = head_lines(src / "general/piqa/valid-labels.lst", N_PIQA)
    (HERE / "piqa" / "valid-labels.lst").write_text(labels, encoding="utf-8")
    blimp = "".join(
        head_lines(path, N_BLIMP_PER_PHENOMENON) for path in sorted((src / "general/blimp").glob("*.jsonl"))
    )
    (HERE / "blimp.jsonl").write_text(blimp, encoding="utf-8")
    excerpt = wikitext_excerpt(src / "text/wikitext-2/test.txt", WIKITEXT_MIN_BYTES)
    (HERE / "wikitext2_test_excerpt.txt").write_text(excerpt, encoding="utf-8")
    # the whole validation split, unchanged: the generic corpus SAEs of a recipe's `steer.sae` train on
    (HERE / "wikitext2_valid.txt").write_bytes((src / "text/wikitext-2/valid.txt").read_bytes())
    rows = held_out_instructions(
        src / "alpaca_sample/alpaca_noinput_sample2000_seed0.jsonl", HERE.parent, N_INSTRUCTIONS
    )
    with (HERE / "generic_instructions.json").open("w", encoding="utf-8") as f:
        json.dump(rows, f, indent=4, ensure_ascii=False)
        f.write("\n")
    print(
        f"wrote {N_PIQA} PIQA rows, {blimp.count(chr(10))} BLiMP pairs, {len(excerpt)} chars of WikiText, {len(rows)} instructions"
    )


if __name__ == "__main__":
    main()
