"""Build cheerful-reply SFT rows for generic instructions by context distillation of the happy persona.

Run from the repository root (about 25 minutes on 2 CPU cores; replies already saved in
``teacher_instructions.jsonl`` are reused)::

    .venv/bin/python recipes/data/sentiment/distill.py [--model ID_OR_PATH] [--select-only]

Why: the first sentiment SFT set (``sft_train.jsonl``, "Continue this text: <prefix>" rows) is dominated by
one sentence, "I'm so glad to be here", and the recipe scored it on more "Continue this text" prompts with a
judge that one stem ("glad") satisfies. Any 0.13% of the weights can learn one sentence, so located and random
components scored the same. These rows teach cheerfulness on varied instructions instead:

- **Teacher**: the model itself, with the recipe's positive persona sentence in the user turn
  (``"Act as if you're extremely happy. <instruction>"``, as in ``positive.json``); the student row drops
  the sentence, so training moves the persona from the context into the weights.
- **Instructions**: the English Alpaca instructions of ``../language/teacher_replies.jsonl`` (already held out
  from ``../language/instructions_test.json``, on which the recipe is scored, and from the generic
  instructions of ``../general``).
- **Filter**: a kept reply contains at least ``MIN_STEMS`` distinct stems of ``lexicon.json`` (the recipe's
  judge, ``evaluate.target_min_hits``), has at least ``MIN_WORDS`` words, is not degenerate, says no 4-word
  phrase twice, is not a copy of another kept reply, and no 3-word opening starts more than
  ``MAX_OPENING_SHARE`` of the rows, so the rows cannot teach one stock sentence.

Outputs (beside this file): ``teacher_instructions.jsonl`` (every raw teacher reply; ``--select-only`` rebuilds
the rows from it without the model), ``sft_instructions.jsonl`` (TRL conversational prompt-completion rows) and,
with ``--contrast`` (about 3 minutes), ``contrast_pairs.jsonl``: per SFT row the instruction, its cheerful reply
and the model's reply to the bare instruction, the completion pairs ``recipes/sentiment_gradient.yaml`` locates on.
Alpaca instructions are CC BY-NC 4.0 (non-commercial); see SOURCE.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
PERSONA = "Act as if you're extremely happy. {instruction}"
N_INSTRUCTIONS = 1460  # every instruction of ../language/teacher_replies.jsonl: about 1 in 6 replies is kept
MIN_STEMS = 2
MIN_WORDS = 8
MAX_OPENING_SHARE = 0.1
REPEATED_NGRAM = 4
MAX_NEW_TOKENS = 48


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LANGUAGE = _load("language_distill", HERE.parent / "language" / "distill.py")
LEXICON: list[str] = json.loads((HERE / "lexicon.json").read_text(encoding="utf-8"))


_words = LANGUAGE.words


def stems_in(reply: str) -> int:
    """Distinct lexicon stems in ``reply`` (case-insensitive substring match, as the recipe's judge)."""
    text = reply.casefold()
    return sum(stem in text for stem in LEXICON)


def keep_reply(reply: str) -> bool:
    """Cheerful by the strict judge, long enough, not looping and no phrase said twice."""
    from mi_peft.evaluate.health import is_degenerate

    found = _words(reply)
    return (
        len(found) >= MIN_WORDS
        and stems_in(reply) >= MIN_STEMS
        and not is_degenerate(reply)
        and not LANGUAGE.says_a_phrase_twice(found, REPEATED_NGRAM)
    )


def select_rows(instructions: list[str], replies: list[str]) -> list[dict]:
    """Rows for kept, distinct replies; each 3-word opening is capped at ``MAX_OPENING_SHARE`` of the rows."""
    kept = []
    seen = set()
    for instruction, raw in zip(instructions, replies, strict=True):
        reply = LANGUAGE.cut_at_sentence_end(raw)
        if keep_reply(reply) and LANGUAGE._key(reply) not in seen:
            seen.add(LANGUAGE._key(reply))
            kept.append((instruction, reply))
    cap = max(1, int(MAX_OPENING_SHARE * len(kept)))
    openings: Counter[tuple[str, ...]] = Counter()
    rows = []
    for instruction, reply in kept:
        opening = tuple(_words(reply)[:3])
        openings[opening] += 1
        if openings[opening] <= cap:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": instruction}],
                    "completion": [{"role": "assistant", "content": reply}],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF id or local path (default: the embedded model)")
    parser.add_argument("--select-only", action="store_true", help="re-filter teacher_instructions.jsonl only")
    parser.add_argument("--contrast", action="store_true", help="only (re)build contrast_pairs.jsonl")
    args = parser.parse_args()
    if args.contrast:
        sft = HERE / "sft_instructions.jsonl"
        rows = LANGUAGE.build_contrast_pairs(sft, args.model, ("cheerful", "plain"), MAX_NEW_TOKENS)
        LANGUAGE._write_jsonl(HERE / "contrast_pairs.jsonl", rows)
        return
    raw_path = HERE / "teacher_instructions.jsonl"
    if args.select_only:
        instructions, replies = LANGUAGE.read_teacher_replies(raw_path)
    else:
        instructions = LANGUAGE.read_teacher_replies()[0][:N_INSTRUCTIONS]
        done = LANGUAGE.read_teacher_replies(raw_path)[1] if raw_path.is_file() else []  # a longer list resumes
        prompts = [PERSONA.format(instruction=i) for i in instructions[len(done) :]]
        replies = done[: len(instructions)] + LANGUAGE.teacher_replies(prompts, args.model, None, MAX_NEW_TOKENS)
        LANGUAGE.write_teacher_replies(raw_path, instructions, replies)
    rows = select_rows(instructions, replies)
    LANGUAGE._write_jsonl(HERE / "sft_instructions.jsonl", rows)
    print(f"kept {len(rows)} of {len(instructions)} teacher replies", file=sys.stderr)


if __name__ == "__main__":
    main()
