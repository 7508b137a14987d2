"""Build the sentiment contrast set (repeng-style persona pairs) from vgel/repeng's prompt lists.

Run from the repository root::

    .venv/bin/python recipes/data/sentiment/build.py [--source PATH/TO/shared/data]

Each pair is one user prompt in two versions that differ only in the persona adjective: "Act as if you're
extremely happy. Continue this text: <prefix>" (positive) vs "... extremely sad. ..." (negative), with the prefix
an assistant-output opening from ``persona/all_truncated_outputs.json``. Train and test use disjoint prefixes.
``neutral_prompts.json`` holds persona-free requests (for KL-to-base and fluency checks). Deterministic (seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0
N_TRAIN, N_TEST = 200, 50
N_NEUTRAL_CODE, N_NEUTRAL_FACTS = 30, 20
# (positive, negative) persona adjectives; pairs rotate over the prompts so each appears equally often.
PERSONAS: tuple[tuple[str, str], ...] = (
    ("happy", "sad"),
    ("joyful", "miserable"),
    ("cheerful", "gloomy"),
    ("delighted", "upset"),
)
TEMPLATE = "Act as if you're extremely {adjective}. Continue this text: {prefix}"
FACT_TEMPLATE = "Explain briefly why this is true: {fact}"
_INST = re.compile(r"^\[INST\](.*?)\[/INST\]", re.DOTALL)


def default_source() -> Path:
    """``$MI_PEFT_SHARED_DATA``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("MI_PEFT_SHARED_DATA")
    return Path(env) if env else HERE.parents[3] / "shared" / "data"


def read_list(path: Path) -> list[str]:
    """A JSON list of strings, or a ValueError naming the file and where to get it."""
    if not path.is_file():
        raise ValueError(
            f"{path} not found; pass --source pointing at a folder holding persona/ copied from "
            "vgel/repeng @ 0ba7196d81f7c5de28b1159c9d1732440afd97ce : notebooks/data/."
        )
    values = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{path} must hold a JSON list of strings.")
    return values


def persona_pairs(prefixes: list[str], offset: int = 0) -> tuple[list[str], list[str]]:
    """Positive and negative prompts for ``prefixes``; pair ``i`` uses persona ``(i + offset) % len(PERSONAS)``."""
    pos, neg = [], []
    for i, prefix in enumerate(prefixes):
        happy, sad = PERSONAS[(i + offset) % len(PERSONAS)]
        pos.append(TEMPLATE.format(adjective=happy, prefix=prefix))
        neg.append(TEMPLATE.format(adjective=sad, prefix=prefix))
    return pos, neg


def neutral_prompts(code_questions: list[str], facts: list[str], rng: random.Random) -> list[str]:
    """Persona-free requests: coding questions (the ``[INST]`` part of repeng's list) and fact explanations."""
    questions = list(dict.fromkeys(m.group(1).strip() for q in code_questions if (m := _INST.match(q))))
    facts = list(dict.fromkeys(f.strip() for f in facts if f.strip()))
    picked = rng.sample(questions, N_NEUTRAL_CODE) + [
        FACT_TEMPLATE.format(fact=f) for f in rng.sample(facts, N_NEUTRAL_FACTS)
    ]
    return picked


def build(source: Path) -> dict[str, list[str]]:
    """All output lists, keyed by file stem."""
    persona = source / "persona"
    prefixes = list(dict.fromkeys(p.strip() for p in read_list(persona / "all_truncated_outputs.json") if p.strip()))
    if len(prefixes) < N_TRAIN + N_TEST:
        raise ValueError(f"need {N_TRAIN + N_TEST} distinct non-empty prefixes, found {len(prefixes)}.")
    rng = random.Random(SEED)
    rng.shuffle(prefixes)
    train, test = prefixes[:N_TRAIN], prefixes[N_TRAIN : N_TRAIN + N_TEST]
    pos, neg = persona_pairs(train)
    pos_test, neg_test = persona_pairs(test)
    neutral = neutral_prompts(read_list(persona / "code_questions.json"), read_list(persona / "true_facts.json"), rng)
    return {
        "positive": pos,
        "negative": neg,
        "positive_test": pos_test,
        "negative_test": neg_test,
        "neutral_prompts": neutral,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=default_source(), help="folder holding persona/")
    args = parser.parse_args()
    for stem, values in build(args.source).items():
        (HERE / f"{stem}.json").write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{stem}.json: {len(values)}")


if __name__ == "__main__":
    main()
