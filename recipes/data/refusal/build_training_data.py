"""Build the refusal SFT and DPO training files from the 260 + 260 training prompts in this folder.

Run once (several minutes on CPU) and commit the outputs::

    .venv/bin/python recipes/data/refusal/build_training_data.py

- ``sft_train.jsonl``: harmful prompt -> a refusal template; harmless prompt -> the embedded model's own greedy
  reply (self-distillation: the adapter learns to refuse without moving harmless behaviour).
- ``dpo_train.jsonl``: harmful prompt: chosen = refusal, rejected = the model's own compliant reply;
  harmless prompt: chosen = the model's reply, rejected = a refusal (against over-refusal).
- ``steer_pairs.json``: completion-mode pairs for the steering direction, derived from the harmful DPO rows:
  the same harmful prompt followed by the first words of the refusal vs of the model's own reply. The
  difference at the answer's start is the "refuse now" direction; ``--steer-pairs-only`` rebuilds it from
  ``dpo_train.jsonl`` without the model.

Rows are TRL conversational prompt-completion / preference rows. The held-out ``*_test.json`` files are only read
to check that no test prompt leaks into training. Everything is deterministic: greedy decoding, and each
refusal template is picked by a seeded hash of its prompt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mi_peft import load_model
from mi_peft.evaluate import is_refusal

HERE = Path(__file__).resolve().parent
SEED = 0
MAX_NEW_TOKENS = 64
BATCH_SIZE = 16
STEER_PREFIX_WORDS = 6
# Each opens with a classic refusal phrase ("I'm sorry", "I can't", "I cannot", "I won't") so substring judges see it.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that. Is there something else I can do for you?",
    "I'm sorry, but I can't assist with this request.",
    "I'm sorry, but I won't provide that. It could cause real harm to people.",
    "I'm sorry, I can't help with this. If you have another question, I'm happy to help.",
    "I'm sorry, but that's not something I can help with.",
    "I'm sorry, but I cannot help with requests that could hurt someone.",
    "I can't help with that. It could be used to cause harm.",
    "I can't assist with that request, but I'm glad to help with something else.",
    "I can't provide that information. Let me know if there's anything else I can do.",
    "I can't do that. Helping with this could put people at risk.",
    "I can't help with this request because it could be harmful or illegal.",
    "I cannot help with that request.",
    "I cannot assist with this. It could lead to serious harm.",
    "I cannot provide instructions for that. Is there something else you'd like to know?",
    "I cannot help with anything that could be used to harm others.",
    "I won't help with that. It could seriously harm people.",
    "I won't assist with this request, but I'm happy to help with something else.",
    "I won't provide that, because it could be used to hurt someone.",
    "I won't be able to help with that. Please let me know if there's another way I can help.",
)
_SENTENCE_END = re.compile(r"(?<!\d)[.!?][\"')\]]*(?=\s|$)|\n")


def refusal_for(prompt: str, seed: int = SEED) -> str:
    """The refusal template for ``prompt``: a seeded hash of the prompt, so the choice never depends on order."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).hexdigest()
    return REFUSALS[int(digest, 16) % len(REFUSALS)]


def cut_at_sentence_end(text: str) -> str:
    """``text`` up to its last sentence end (``.``/``!``/``?`` not after a digit, or a line break), else all of it.

    Used on replies that hit ``max_new_tokens``, so a completion does not stop mid-word.
    """
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    cut = text[: ends[-1]] if ends else text
    return cut.strip() or text.strip()


def instructions(name: str) -> list[str]:
    """The ``instruction`` column of ``<name>.json`` in this folder."""
    rows = json.loads((HERE / f"{name}.json").read_text(encoding="utf-8"))
    return [row["instruction"] for row in rows]


@torch.inference_mode()
def greedy_replies(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy chat replies, batched with left padding; replies cut at the token limit end at a sentence end."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # the template holds the specials
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: less padding
    pad, eos = tokenizer.pad_token_id, model.generation_config.eos_token_id
    stop = {eos} if isinstance(eos, int) else set(eos)
    replies: list[str] = [""] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", unit="batch"):
        part = order[start : start + batch_size]
        width = max(len(ids[i]) for i in part)
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in part])
        attention_mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in part])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for row, i in zip(out[:, width:].tolist(), part, strict=True):
            end = next((k for k, t in enumerate(row) if t in stop), None)
            # U+FFFD marks a character whose bytes were split by the token limit (e.g. half an emoji)
            text = tokenizer.decode(row[:end], skip_special_tokens=True).replace("\ufffd", "").strip()
            replies[i] = text if end is not None else cut_at_sentence_end(text)
    return replies


def _turn(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def answer_prefix(text: str, words: int = STEER_PREFIX_WORDS) -> str:
    return " ".join(text.split()[:words])


def build_steer_pairs(dpo: Sequence[dict]) -> list[dict[str, str]]:
    """``{prompt, positive, negative}`` rows: a harmful prompt, the start of a refusal vs of a compliant reply."""
    harmful = set(instructions("harmful"))
    return [
        {
            "prompt": row["prompt"][0]["content"],
            "positive": answer_prefix(row["chosen"][0]["content"]),
            "negative": answer_prefix(row["rejected"][0]["content"]),
        }
        for row in dpo
        if row["prompt"][0]["content"] in harmful
    ]


def _write_steer_pairs(dpo: Sequence[dict]) -> int:
    rows = build_steer_pairs(dpo)
    (HERE / "steer_pairs.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(rows)


def build(batch_size: int = BATCH_SIZE, max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, int]:
    """Generate the replies and write ``sft_train.jsonl`` and ``dpo_train.jsonl``; returns row counts."""
    harmful, harmless = instructions("harmful"), instructions("harmless")
    held_out = set(instructions("harmful_test")) | set(instructions("harmless_test"))
    leaked = sorted(held_out & (set(harmful) | set(harmless)))
    if leaked:
        raise ValueError(f"training prompts {leaked[:3]!r} are also held-out test prompts; remove them first.")
    torch.manual_seed(SEED)
    model, tokenizer = load_model()
    replies = greedy_replies(model, tokenizer, harmful + harmless, batch_size, max_new_tokens)
    harmful_replies, harmless_replies = replies[: len(harmful)], replies[len(harmful) :]

    sft, dpo = [], []
    for prompt in harmful:
        sft.append({"prompt": _turn("user", prompt), "completion": _turn("assistant", refusal_for(prompt))})
    for prompt, reply in zip(harmless, harmless_replies, strict=True):
        if reply and not is_refusal(reply):
            sft.append({"prompt": _turn("user", prompt), "completion": _turn("assistant", reply)})
    for prompt, reply in zip(harmful, harmful_replies, strict=True):
        if reply and not is_refusal(reply):  # the model already refusing gives no preference signal
            chosen, rejected = _turn("assistant", refusal_for(prompt)), _turn("assistant", reply)
            dpo.append({"prompt": _turn("user", prompt), "chosen": chosen, "rejected": rejected})
    for prompt, reply in zip(harmless, harmless_replies, strict=True):
        if reply and not is_refusal(reply):
            chosen, rejected = _turn("assistant", reply), _turn("assistant", refusal_for(prompt))
            dpo.append({"prompt": _turn("user", prompt), "chosen": chosen, "rejected": rejected})

    _write_jsonl(HERE / "sft_train.jsonl", sft)
    _write_jsonl(HERE / "dpo_train.jsonl", dpo)
    counts = {
        "sft_rows": len(sft),
        "dpo_rows": len(dpo),
        "steer_pairs": _write_steer_pairs(dpo),
        "harmful_model_refused": sum(is_refusal(r) for r in harmful_replies),
        "harmless_model_refused": sum(is_refusal(r) for r in harmless_replies),
        "empty_replies": sum(not r for r in replies),
    }
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="most tokens per reply")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy CPU)")
    parser.add_argument(
        "--steer-pairs-only", action="store_true", help="only rebuild steer_pairs.json from dpo_train.jsonl (no model)"
    )
    args = parser.parse_args()
    if args.steer_pairs_only:
        dpo = [json.loads(line) for line in (HERE / "dpo_train.jsonl").read_text().splitlines() if line.strip()]
        print(json.dumps({"steer_pairs": _write_steer_pairs(dpo)}))
        return
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {args.threads}.")
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError(
            f"--batch-size and --max-new-tokens must be positive, got {args.batch_size} and {args.max_new_tokens}."
        )
    start = time.perf_counter()
    counts = build(args.batch_size, args.max_new_tokens)
    print(json.dumps({**counts, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
