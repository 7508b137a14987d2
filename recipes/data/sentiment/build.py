"""Build the sentiment contrast set (repeng-style persona pairs) from vgel/repeng's prompt lists.

Run from the repository root::

    .venv/bin/python recipes/data/sentiment/build.py [--source PATH/TO/shared/data]
    .venv/bin/python recipes/data/sentiment/build.py --generate [--threads 1]   # needs the embedded model

Each pair is one user prompt in two versions that differ only in the persona adjective: "Act as if you're
extremely happy. Continue this text: <prefix>" (positive) vs "... extremely sad. ..." (negative), with the prefix
an assistant-output opening from ``persona/all_truncated_outputs.json``. Train and test use disjoint prefixes.
``neutral_prompts.json`` holds persona-free requests (for KL-to-base and fluency checks), ``neutral_test.json`` the
test prefixes as persona-free "Continue this text: <prefix>" prompts, and ``lexicon.json`` the positive-emotion
stems of the substring cheerfulness classifier (``is_cheerful``). Deterministic (seed 0).

``--generate`` (a separate step: it reads only the committed ``positive.json`` and ``*_test.json`` files and loads
the embedded SmolLM2-135M-Instruct) writes ``sft_train.jsonl``, context-distillation rows: the persona-free prompt
``"Continue this text: <prefix>"`` -> the model's own greedy reply to the HAPPY persona prompt of the same prefix.
It also prints the base model's cheerful-reply rates on the neutral, happy-persona and sad-persona test prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from collections.abc import Sequence
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
NEUTRAL_TEMPLATE = "Continue this text: {prefix}"
_INST = re.compile(r"^\[INST\](.*?)\[/INST\]", re.DOTALL)
_PERSONA_PROMPT = re.compile(r"^Act as if you're extremely (\w+)\. Continue this text: (.+)$", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<!\d)[.!?][\"')\]]*(?=\s|$)|\n")
# Positive-emotion stems of the cheerfulness classifier: a reply is cheerful if its lowercased text CONTAINS any of
# them (plain substring match, so "joy" also hits "enjoy", "love" also "lovely"). Ambiguous stems are left out
# ("fun" hits "function", "grin" "grinding", "wonder" "I wonder", "elat" "related"); full words are used where a
# stem would be ambiguous. Known limit: no negation handling ("not happy", "unhappy" count as cheerful).
LEXICON: tuple[str, ...] = (
    "happy",
    "happi",
    "joy",
    "delight",
    "cheer",
    "glad",
    "smil",
    "laugh",
    "love",
    "excit",
    "thrill",
    "wonderful",
    "amazing",
    "fantastic",
    "awesome",
    "great",
    "beautiful",
    "bright",
    "sunshine",
    "celebrat",
    "grateful",
    "bliss",
    "ecstatic",
    "elated",
    "marvel",
    "brilliant",
    "excellent",
    "yay",
    "hooray",
    "woohoo",
)
# --generate settings
SFT_MAX_NEW_TOKENS = 40
RATE_MAX_NEW_TOKENS = 32
BATCH_SIZE = 16


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
        "neutral_test": [NEUTRAL_TEMPLATE.format(prefix=p) for p in test],
        "lexicon": list(LEXICON),
    }


# ---------------------------------------------------------------- --generate step (needs the embedded model)


def is_cheerful(text: str, lexicon: Sequence[str] = LEXICON) -> bool:
    """Whether ``text`` (lowercased) contains any stem of ``lexicon``."""
    low = text.lower()
    return any(stem in low for stem in lexicon)


def cheerful_rate(replies: Sequence[str], lexicon: Sequence[str] = LEXICON) -> float:
    """Fraction of ``replies`` that ``is_cheerful``."""
    return sum(is_cheerful(r, lexicon) for r in replies) / len(replies) if replies else 0.0


def split_persona_prompt(prompt: str) -> tuple[str, str]:
    """``(adjective, prefix)`` of a ``TEMPLATE`` prompt, or a ValueError."""
    match = _PERSONA_PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"not a persona prompt of the form {TEMPLATE!r}: {prompt!r}")
    return match.group(1), match.group(2)


def cut_at_sentence_end(text: str) -> str:
    """``text`` up to its last sentence end (``.``/``!``/``?`` not after a digit, or a line break), else all of it."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    cut = text[: ends[-1]] if ends else text
    return cut.strip() or text.strip()


def is_repetitive(text: str) -> bool:
    """A reply that repeats a sentence or a word three times in a row ("so very very very") teaches looping."""
    sentences = [s.strip().lower() for s in _SENTENCE_END.split(text) if s.strip()]
    if len(sentences) != len(set(sentences)):
        return True
    words = text.lower().split()
    return any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2))


def _clean(reply: str) -> str:
    # U+FFFD marks a character whose bytes were split by the token limit (e.g. half an emoji)
    return reply.replace("\ufffd", "").strip()


def _read_here(stem: str) -> list[str]:
    return json.loads((HERE / f"{stem}.json").read_text(encoding="utf-8"))


def _turn(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def generate_files(batch_size: int = BATCH_SIZE) -> dict[str, object]:
    """Write ``sft_train.jsonl`` from the model's happy-persona replies; return counts and base cheerful rates."""
    import torch

    from mi_peft.evaluate.generation import generate
    from mi_peft.models import load_model

    happy = _read_here("positive")
    train_prefixes = [split_persona_prompt(p)[1] for p in happy]
    test_prefixes = {split_persona_prompt(p)[1] for p in _read_here("positive_test")}
    leaked = sorted(test_prefixes & set(train_prefixes))
    if leaked:
        raise ValueError(f"training prefixes {leaked[:3]!r} are also test prefixes; rebuild the split first.")
    torch.manual_seed(SEED)
    model, tokenizer = load_model()

    replies = generate(model, tokenizer, happy, max_new_tokens=SFT_MAX_NEW_TOKENS, batch_size=batch_size)
    completions = [cut_at_sentence_end(_clean(r)) for r in replies]
    rows = [
        {"prompt": _turn("user", NEUTRAL_TEMPLATE.format(prefix=prefix)), "completion": _turn("assistant", reply)}
        for prefix, reply in zip(train_prefixes, completions, strict=True)
        if reply and not is_repetitive(reply)
    ]
    with (HERE / "sft_train.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    rates: dict[str, float] = {}
    for stem in ("neutral_test", "positive_test", "negative_test"):
        test_replies = generate(
            model, tokenizer, _read_here(stem), max_new_tokens=RATE_MAX_NEW_TOKENS, batch_size=batch_size
        )
        rates[stem] = cheerful_rate([_clean(r) for r in test_replies])
    return {
        "sft_rows": len(rows),
        "sft_dropped_empty_or_repetitive": len(happy) - len(rows),
        "sft_cheerful_rate": cheerful_rate([c for c in completions if c]),
        "cheerful_rate": rates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=default_source(), help="folder holding persona/")
    parser.add_argument(
        "--generate", action="store_true", help="instead: write sft_train.jsonl with the model, print cheerful rates"
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="prompts per generate call (--generate)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (--generate)")
    args = parser.parse_args()
    if args.generate:
        import torch

        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be a positive integer, got {args.threads}.")
            torch.set_num_threads(args.threads)
        start = time.perf_counter()
        stats = generate_files(args.batch_size)
        print(json.dumps({**stats, "seconds": round(time.perf_counter() - start, 1)}))
        return
    for stem, values in build(args.source).items():
        (HERE / f"{stem}.json").write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{stem}.json: {len(values)}")


if __name__ == "__main__":
    main()
