"""The sentiment recipe's extra data: persona-free test prompts, context-distillation SFT rows, cheerfulness lexicon.

Fast: reads the committed files only (no model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from conftest import load_script

FOLDER = Path(__file__).resolve().parents[1] / "recipes" / "data" / "sentiment"
PERSONA = re.compile(r"^Act as if you're extremely (\w+)\. Continue this text: (.+)$", re.DOTALL)
NEUTRAL = re.compile(r"^Continue this text: (.+)$", re.DOTALL)
N_TRAIN, N_TEST = 200, 50


def _json(name: str):
    return json.loads((FOLDER / name).read_text(encoding="utf-8"))


def _rows(name: str) -> list[dict]:
    lines = (FOLDER / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _prefixes(name: str) -> list[str]:
    return [PERSONA.match(p).group(2) for p in _json(name)]


def _build_module() -> ModuleType:
    module = load_script(FOLDER / "build.py")
    return module


@pytest.mark.parametrize(
    "name",
    [
        "positive.json",
        "negative.json",
        "positive_test.json",
        "negative_test.json",
        "neutral_prompts.json",
        "neutral_test.json",
        "sft_train.jsonl",
        "lexicon.json",
        "SOURCE.md",
        "LICENSE",
    ],
)
def test_file_exists(name):
    assert (FOLDER / name).is_file(), f"{FOLDER / name} is missing"


def test_neutral_test_is_the_test_prefixes_without_persona():
    neutral = _json("neutral_test.json")
    assert isinstance(neutral, list) and len(neutral) == N_TEST and len(set(neutral)) == N_TEST
    assert all(isinstance(p, str) and NEUTRAL.match(p) and "Act as if" not in p for p in neutral)
    assert [NEUTRAL.match(p).group(1) for p in neutral] == _prefixes("positive_test.json")


def test_sft_rows_are_trl_conversational_prompt_completion():
    rows = _rows("sft_train.jsonl")
    assert 80 <= len(rows) <= N_TRAIN, f"{len(rows)} rows"
    assert not any(_build_module().is_repetitive(r["completion"][0]["content"]) for r in rows)
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "completion"}, f"row {i} keys {sorted(row)}"
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            turns = row[key]
            assert isinstance(turns, list) and len(turns) == 1, f"row {i} {key}"
            assert turns[0].keys() == {"role", "content"} and turns[0]["role"] == role, f"row {i} {key}"
            content = turns[0]["content"]
            assert isinstance(content, str) and content.strip() == content and content, f"row {i} {key}"
        prompt = row["prompt"][0]["content"]
        assert NEUTRAL.match(prompt) and "Act as if" not in prompt, f"row {i} prompt is not persona-free: {prompt!r}"


def test_sft_prompts_are_train_prefixes_in_order_and_never_test_prefixes():
    prefixes = [NEUTRAL.match(r["prompt"][0]["content"]).group(1) for r in _rows("sft_train.jsonl")]
    train, test = _prefixes("positive.json"), _prefixes("positive_test.json")
    assert len(set(prefixes)) == len(prefixes), "one row per training prefix"
    assert set(prefixes) <= set(train)
    assert prefixes == [p for p in train if p in set(prefixes)], "rows follow positive.json's order"
    assert not set(prefixes) & set(test), "a held-out test prefix is in sft_train.jsonl"
    sft_prompts = {r["prompt"][0]["content"] for r in _rows("sft_train.jsonl")}
    assert not sft_prompts & set(_json("neutral_test.json"))


def test_lexicon_is_a_nonempty_lowercase_list_matching_build():
    lexicon = _json("lexicon.json")
    assert isinstance(lexicon, list) and lexicon
    assert all(isinstance(s, str) and s and s == s.strip().lower() for s in lexicon)
    assert len(set(lexicon)) == len(lexicon)
    assert lexicon == list(_build_module().LEXICON)


def test_is_cheerful_is_a_substring_match():
    build = _build_module()
    assert build.is_cheerful("I'm SO happy to see you!")
    assert build.is_cheerful("What a Delightful day.")
    assert not build.is_cheerful("The meeting is at noon on Tuesday.")
    assert build.cheerful_rate(["so glad", "a table", "joyful", "sad"]) == 0.5
    assert build.cheerful_rate([]) == 0.0


def test_cut_at_sentence_end():
    cut = _build_module().cut_at_sentence_end
    assert cut("I'm so happy. I love th") == "I'm so happy."
    assert cut("No end here") == "No end here"
    assert cut('He said "great!" and left') == 'He said "great!"'
