"""Build "reply in French" SFT rows by context distillation from the model's own French replies.

Run from the repository root (about 20 minutes on 2 CPU cores)::

    .venv/bin/python recipes/data/language/distill.py [--source PATH/TO/shared/data] [--model ID_OR_PATH]

The teacher is the model itself under a system prompt that asks for French; the student row drops the
system prompt, so training moves "answer in French" from the context into the weights. The instructions
are generic English Alpaca instructions (not maths questions), so a fixed answer template cannot pass:
each kept reply must be real French by the strict judge (at least ``MIN_FRENCH_VOTES`` French
function-word votes, see ``mi_peft.evaluate.language``), must not be degenerate (a phrase repeated to the
end), repeat a sentence or a 4-word phrase, or echo the teacher's system prompt, and must not be a copy of
another kept reply.

Outputs (beside this file):

- ``teacher_replies.jsonl``: every raw teacher reply, ``{"instruction", "reply"}``; ``--select-only`` rebuilds
  ``sft_train.jsonl`` from it without the model (the filter is deterministic; the generation may differ
  slightly between CPUs).
- ``sft_train.jsonl``: TRL conversational prompt-completion rows, English instruction -> French reply.
- ``instructions_test.json``: ``N_TEST`` held-out English instructions (the recipe scores the first 100).
- ``--demos``: ``teacher_replies_demos.jsonl`` and ``sft_train_demos.jsonl``, the same 1,460 candidates asked
  after three hand-written French exchanges (:data:`DEMOS`), a stronger teacher than the system prompt alone;
  a reply that copies a 4-word phrase of a demonstration is dropped.
- ``contrast_pairs.jsonl`` (``--contrast``, about 3 minutes): per SFT row, the instruction, its French reply
  and the model's own reply without the system prompt (English), cut at the last full sentence: completion
  pairs for ``locate.method: weight_gradient``, which scores what training each neuron can do to the French
  reply's log-likelihood minus the English one's.

Alpaca instructions are CC BY-NC 4.0 (non-commercial); see SOURCE.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEACHER_SYSTEM = (
    "Tu es un assistant francophone. Tu réponds toujours en français, même quand la question est posée en anglais."
)
MIN_FRENCH_VOTES = 3.0
MIN_WORDS = 6
N_TEST = 120  # 100 scored + 20 for the steering alpha sweep
N_CANDIDATES = 1460  # nearly every remaining usable sample row: about 1 in 10 replies passes the filter
REPEATED_NGRAM = 4  # a reply that says the same 4 words twice is looping, not answering
SYSTEM_ECHOES = ("même quand la question", "posée en anglais", "toujours en français", "assistant francophone")
FIRST_SAMPLE_ROW = 400  # rows before this are kept for recipes/data/general/generic_instructions.json
MAX_NEW_TOKENS = 64
KEYS = ("french", "english")  # columns of contrast_pairs.jsonl: the distilled reply, the model's plain reply
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# ``--demos``: three hand-written exchanges (instructions not in the Alpaca sample) shown to the teacher before
# each instruction. The 135M teacher under the system prompt alone writes French on 45.5% of the 1,460
# candidates (teacher_replies.jsonl); with these in its context, on 70.2% (teacher_replies_demos.jsonl).
DEMOS = (
    (
        "Describe your ideal weekend.",
        "Mon week-end idéal commence par une longue promenade dans la forêt. L'après-midi, je lis un bon livre dans "
        "un café, et le soir je prépare un repas avec mes amis.",
    ),
    (
        "Write a short note thanking a neighbour for their help.",
        "Cher voisin, merci beaucoup pour votre aide pendant le déménagement. Sans vous, la journée aurait été bien "
        "plus difficile. N'hésitez pas à passer prendre un café !",
    ),
    (
        "What is a good way to learn a new language?",
        "Le plus efficace est de pratiquer un peu chaque jour. Écoutez des podcasts, lisez des textes simples et "
        "parlez avec des locuteurs natifs dès que possible.",
    ),
)


def default_source() -> Path:
    """``$MI_PEFT_SHARED_DATA``, else the ``shared/data`` folder beside the repository."""
    env = os.environ.get("MI_PEFT_SHARED_DATA")
    return Path(env) if env else HERE.parents[3] / "shared" / "data"


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def taken_instructions(data_dir: Path) -> set[str]:
    """Every string (normalised) in the other recipe data files, so the new rows stay disjoint from them.

    Reuses the general-data builder's walk over ``recipes/data`` so both scripts apply one rule.
    """
    spec = importlib.util.spec_from_file_location("general_build", data_dir / "general" / "build.py")
    general = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(general)
    return set(general.recipe_strings(data_dir, skip=HERE))


def candidate_instructions(source: Path, data_dir: Path) -> list[str]:
    """Alpaca-sample instructions from ``FIRST_SAMPLE_ROW`` on that occur in no other recipe data file."""
    path = source / "alpaca_sample" / "alpaca_noinput_sample2000_seed0.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found; pass --source pointing at a folder holding alpaca_sample/.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    taken = taken_instructions(data_dir)
    kept = [r["instruction"].strip() for r in rows[FIRST_SAMPLE_ROW:] if _key(r["instruction"]) not in taken]
    if len(kept) < N_TEST + N_CANDIDATES:
        raise ValueError(f"{path}: only {len(kept)} usable instructions, need {N_TEST + N_CANDIDATES}.")
    return kept[: N_TEST + N_CANDIDATES]


def words(text: str) -> list[str]:
    """Case-folded words of ``text`` (punctuation other than apostrophes dropped)."""
    return _key(re.sub(r"[^\w\s']", " ", text)).split()


def phrases(found: list[str], n: int = REPEATED_NGRAM) -> list[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``found``, in order."""
    return [tuple(found[i : i + n]) for i in range(len(found) - n + 1)]


def says_a_phrase_twice(found: list[str], n: int = REPEATED_NGRAM) -> bool:
    """Whether some ``n`` consecutive words occur twice: a looping reply, not an answer."""
    ngrams = phrases(found, n)
    return len(ngrams) != len(set(ngrams))


def cut_at_sentence_end(reply: str) -> str:
    """The reply up to its last full sentence (a reply cut by the token limit loses its broken tail)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(reply)]
    return reply[: ends[-1]].strip() if ends else reply.strip()


def demo_phrases(n: int = REPEATED_NGRAM) -> set[tuple[str, ...]]:
    """Every ``n``-word phrase of the demonstration replies: a kept reply may not copy one."""
    return {phrase for _, reply in DEMOS for phrase in phrases(words(reply), n)}


def keep_reply(reply: str, banned: set[tuple[str, ...]] = frozenset()) -> bool:
    """Real French, long enough, no degenerate tail, no phrase said twice, no echo of the system prompt, and
    no 4-word phrase of ``banned`` (the demonstrations' phrases under ``--demos``)."""
    from mi_peft.evaluate.health import is_degenerate
    from mi_peft.evaluate.language import detect_language

    found = words(reply)
    return (
        len(found) >= MIN_WORDS
        and detect_language(reply, min_votes=MIN_FRENCH_VOTES) == "fr"
        and not is_degenerate(reply)
        and not says_a_phrase_twice(found)
        and not any(echo in _key(reply) for echo in SYSTEM_ECHOES)
        and banned.isdisjoint(phrases(found))
    )


def select_rows(instructions: list[str], replies: list[str], demos: bool = False) -> list[dict]:
    """SFT rows for the replies that pass :func:`keep_reply`, dropping any reply already kept once."""
    rows, seen = [], set()
    banned = demo_phrases() if demos else frozenset()
    for instruction, raw in zip(instructions, replies, strict=True):
        reply = cut_at_sentence_end(raw)
        if keep_reply(reply, banned) and _key(reply) not in seen:
            seen.add(_key(reply))
            rows.append(
                {
                    "prompt": [{"role": "user", "content": instruction}],
                    "completion": [{"role": "assistant", "content": reply}],
                }
            )
    return rows


def teacher_replies(
    prompts: list[str],
    model_name: str | None,
    system: str | None = TEACHER_SYSTEM,
    max_new_tokens: int = MAX_NEW_TOKENS,
    demos: bool = False,
) -> list[str]:
    """Greedy replies of the model to ``prompts`` under ``system`` (default: the French system prompt),
    after the :data:`DEMOS` exchanges when ``demos``."""
    from tqdm.auto import tqdm

    from mi_peft.evaluate import generate
    from mi_peft.models import load_model

    model, tokenizer = load_model(model_name)
    context = {"system": system}
    if demos:  # chat-formatted here, demonstrations included, so generate sends the text as it is
        prompts, context = [demo_chat(tokenizer, p, system) for p in prompts], {"chat": False}
    replies: list[str] = []
    chunk = 36
    for start in tqdm(range(0, len(prompts), chunk), desc="teacher replies", unit="batch"):
        batch = prompts[start : start + chunk]
        replies += generate(model, tokenizer, batch, max_new_tokens, batch_size=chunk, **context)
    return replies


def demo_chat(tokenizer, prompt: str, system: str | None) -> str:
    """``prompt`` in the chat template after ``system`` and the :data:`DEMOS` turns, generation prompt added."""
    turns = [] if system is None else [{"role": "system", "content": system}]
    for question, answer in DEMOS:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    turns.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_teacher_replies(path: Path, instructions: list[str], replies: list[str]) -> None:
    """The raw teacher log that :func:`read_teacher_replies` reads: one ``{"instruction", "reply"}`` per line."""
    _write_jsonl(path, [{"instruction": i, "reply": r} for i, r in zip(instructions, replies, strict=True)])


def read_teacher_replies(path: Path = HERE / "teacher_replies.jsonl") -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["instruction"] for r in rows], [r["reply"] for r in rows]


def build_contrast_pairs(
    sft: Path, model_name: str | None, keys: tuple[str, str], max_new_tokens: int = MAX_NEW_TOKENS
) -> list[dict]:
    """Per row of ``sft``: ``{"prompt", keys[0]: its distilled reply, keys[1]: the model's reply to the bare prompt}``.

    The second reply is what the model says without the teacher's context, cut at its last full sentence.
    Shared with the sentiment recipe's builder.
    """
    from mi_peft.data_files import read_rows

    rows = read_rows(sft)
    prompts = [r["prompt"][0]["content"] for r in rows]
    plain = teacher_replies(prompts, model_name, system=None, max_new_tokens=max_new_tokens)
    return [
        {"prompt": p, keys[0]: r["completion"][0]["content"], keys[1]: cut_at_sentence_end(e)}
        for p, r, e in zip(prompts, rows, plain, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=default_source(), help="the shared data folder")
    parser.add_argument("--model", default=None, help="HF id or local path (default: the embedded model)")
    parser.add_argument("--select-only", action="store_true", help="re-filter teacher_replies.jsonl only")
    parser.add_argument("--contrast", action="store_true", help="only (re)build contrast_pairs.jsonl")
    parser.add_argument(
        "--demos",
        action="store_true",
        help="teacher sees the DEMOS exchanges first; writes teacher_replies_demos.jsonl and sft_train_demos.jsonl",
    )
    args = parser.parse_args()
    if args.contrast:
        _write_jsonl(HERE / "contrast_pairs.jsonl", build_contrast_pairs(HERE / "sft_train.jsonl", args.model, KEYS))
        return
    suffix = "_demos" if args.demos else ""
    if args.select_only:
        train, replies = read_teacher_replies(HERE / f"teacher_replies{suffix}.jsonl")
    elif args.demos:  # the same 1,460 candidates as the plain teacher's, asked after the demonstrations
        train = read_teacher_replies()[0]
        replies = teacher_replies(train, args.model, demos=True)
        write_teacher_replies(HERE / "teacher_replies_demos.jsonl", train, replies)
    else:
        instructions = candidate_instructions(args.source, HERE.parent)
        test, train = instructions[:N_TEST], instructions[N_TEST:]
        replies = teacher_replies(train, args.model)
        (HERE / "instructions_test.json").write_text(json.dumps(test, ensure_ascii=False, indent=1) + "\n")
        write_teacher_replies(HERE / "teacher_replies.jsonl", train, replies)
    rows = select_rows(train, replies, demos=args.demos)
    _write_jsonl(HERE / f"sft_train{suffix}.jsonl", rows)
    print(f"kept {len(rows)} of {len(train)} teacher replies", file=sys.stderr)


if __name__ == "__main__":
    main()
