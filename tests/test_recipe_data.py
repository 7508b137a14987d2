"""The recipes' small datasets: they load, have the documented sizes and formats, and never leak test prompts."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

import conftest
import pytest
from conftest import load_script, shared_data

from mi_peft.data import ContrastivePairs
from mi_peft.evaluate import swap_options, target_rate
from mi_peft.evaluate.language import detect_language

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
FOLDERS = ("refusal", "sentiment", "language", "sycophancy")
# folder -> (train pairs, test pairs) for the positive/negative (or harmful/harmless) directory layout
PAIR_SIZES = {"refusal": (260, 150), "sentiment": (200, 50), "language": (200, 50)}
JSONL = {
    "refusal/sft_train.jsonl": "sft",
    "refusal/dpo_train.jsonl": "dpo",
    "language/sft_train.jsonl": "sft",
    "sentiment/sft_instructions.jsonl": "sft",
    "sycophancy/sft_train.jsonl": "sft",
    "sycophancy/dpo_train.jsonl": "dpo",
}
ROW_KEYS = {  # row key -> role of its single message
    "sft": {"prompt": "user", "completion": "assistant"},
    "dpo": {"prompt": "user", "chosen": "assistant", "rejected": "assistant"},
}
REFUSAL_OPENINGS = ("I'm sorry", "I can't", "I cannot", "I won't")
SENTIMENT = re.compile(r"^Act as if you're extremely (\w+)\. Continue this text: (.+)$", re.DOTALL)
SENTIMENT_PAIRS = {("happy", "sad"), ("joyful", "miserable"), ("cheerful", "gloomy"), ("delighted", "upset")}


def _json(relative: str):
    return json.loads((DATA / relative).read_text(encoding="utf-8"))


def _rows(relative: str) -> list[dict]:
    lines = (DATA / relative).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _user(row: dict) -> str:
    return row["prompt"][0]["content"]


def _reply(row: dict, key: str) -> str:
    return row[key][0]["content"]


def _instructions(relative: str) -> list[str]:
    return [row["instruction"] for row in _json(relative)]


def _build_module(folder: str) -> ModuleType:
    module = load_script(DATA / folder / "build.py")
    return module


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_folder_has_license_and_source(folder):
    for name in ("LICENSE", "SOURCE.md"):
        path = DATA / folder / name
        assert path.is_file(), f"{path} is missing"
        assert len(path.read_text(encoding="utf-8").strip()) > 200, f"{path} is (nearly) empty"


@pytest.mark.parametrize("folder", sorted(PAIR_SIZES))
def test_pair_folders_load_with_disjoint_splits(folder):
    n_train, n_test = PAIR_SIZES[folder]
    train = ContrastivePairs.load(DATA / folder)
    test = ContrastivePairs.load(DATA / folder, split="test")
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.prompts is None and test.prompts is None
    for side in ("positive", "negative"):
        values, held_out = getattr(train, side), getattr(test, side)
        assert all(v.strip() for v in values + held_out)
        assert len(set(values)) == n_train and len(set(held_out)) == n_test, f"{folder} {side} has duplicates"
        assert not set(values) & set(held_out), f"{folder} {side}: train and test share prompts"
    assert all(p != n for p, n in zip(train.positive, train.negative, strict=True))


@pytest.mark.parametrize(("relative", "kind"), sorted(JSONL.items()))
def test_jsonl_rows_are_trl_conversational(relative, kind):
    rows = _rows(relative)
    assert rows, f"{relative} is empty"
    for i, row in enumerate(rows):
        assert set(row) == set(ROW_KEYS[kind]), f"{relative} row {i} keys {sorted(row)}"
        for key, role in ROW_KEYS[kind].items():
            turns = row[key]
            assert isinstance(turns, list) and len(turns) == 1, f"{relative} row {i} {key}"
            assert turns[0].keys() == {"role", "content"} and turns[0]["role"] == role
            assert isinstance(turns[0]["content"], str) and turns[0]["content"].strip(), f"{relative} row {i} {key}"
        if kind == "dpo":
            assert _reply(row, "chosen") != _reply(row, "rejected"), f"{relative} row {i}: chosen == rejected"


def _training_and_test_prompts() -> dict[str, tuple[set[str], set[str]]]:
    """folder -> (every prompt a training file holds, every held-out test prompt)."""
    refusal_train = set(_instructions("refusal/harmful.json")) | set(_instructions("refusal/harmless.json"))
    refusal_train |= {_user(r) for name in ("sft_train", "dpo_train") for r in _rows(f"refusal/{name}.jsonl")}
    refusal_test = set(_instructions("refusal/harmful_test.json")) | set(_instructions("refusal/harmless_test.json"))
    sentiment_train = set(_json("sentiment/positive.json")) | set(_json("sentiment/negative.json"))
    sentiment_train |= {_user(r) for r in _rows("sentiment/sft_instructions.jsonl")}
    sentiment_test = set(_json("sentiment/positive_test.json")) | set(_json("sentiment/negative_test.json"))
    sentiment_test |= set(_json("language/instructions_test.json"))  # the recipe's scored prompts
    language_train = set(_json("language/positive.json")) | set(_json("language/negative.json"))
    language_train |= {q for qs in _json("language/classes.json").values() for q in qs}
    language_train |= {_user(r) for r in _rows("language/sft_train.jsonl")}
    language_test = set(_json("language/positive_test.json")) | set(_json("language/negative_test.json"))
    language_test |= set(_json("language/instructions_test.json"))
    sycophancy_train = {r["question"] for r in _json("sycophancy/train_ab.json")}
    sycophancy_train |= {_user(r) for name in ("sft_train", "dpo_train") for r in _rows(f"sycophancy/{name}.jsonl")}
    sycophancy_test = {r["question"] for r in _json("sycophancy/test_ab.json")}
    return {
        "refusal": (refusal_train, refusal_test),
        "sentiment": (sentiment_train, sentiment_test),
        "language": (language_train, language_test),
        "sycophancy": (sycophancy_train, sycophancy_test),
    }


def test_no_held_out_prompt_in_any_training_file():
    folders = _training_and_test_prompts()
    every_training_prompt = set().union(*(train for train, _ in folders.values()))
    for folder, (_, test) in folders.items():
        assert test, f"{folder} has no test prompts"
        leaked = sorted(test & every_training_prompt)
        assert not leaked, f"{folder} test prompts found in training files: {leaked[:3]}"


def test_refusal_training_rows():
    harmful, harmless = _instructions("refusal/harmful.json"), _instructions("refusal/harmless.json")
    sft, dpo = _rows("refusal/sft_train.jsonl"), _rows("refusal/dpo_train.jsonl")
    sft_harmful = [r for r in sft if _user(r) in set(harmful)]
    assert [_user(r) for r in sft_harmful] == harmful, "every harmful training prompt gets exactly one refusal row"
    assert all(_reply(r, "completion").startswith(REFUSAL_OPENINGS) for r in sft_harmful)
    assert len({_reply(r, "completion") for r in sft_harmful}) >= 15, "refusal templates should vary"
    sft_harmless = [r for r in sft if _user(r) in set(harmless)]
    assert len(sft_harmless) + len(sft_harmful) == len(sft) and len(sft_harmless) >= 0.8 * len(harmless)
    assert not any(_reply(r, "completion").startswith(REFUSAL_OPENINGS) for r in sft_harmless)
    # the helpful replies are the model's own: the same text in SFT and as DPO `chosen`
    helpful = {_user(r): _reply(r, "completion") for r in sft_harmless}
    for row in dpo:
        if _user(row) in set(harmful):
            assert _reply(row, "chosen").startswith(REFUSAL_OPENINGS)
            assert not _reply(row, "rejected").startswith(REFUSAL_OPENINGS)
        else:
            assert _user(row) in set(harmless)
            assert _reply(row, "chosen") == helpful[_user(row)]
            assert _reply(row, "rejected").startswith(REFUSAL_OPENINGS)
    assert sum(_user(r) in set(harmful) for r in dpo) >= 0.5 * len(harmful)


def test_refusal_steer_pairs_are_the_harmful_dpo_rows_cut_to_answer_prefixes():
    harmful = set(_instructions("refusal/harmful.json"))
    dpo = [r for r in _rows("refusal/dpo_train.jsonl") if _user(r) in harmful]
    steer = _json("refusal/steer_pairs.json")
    assert [r["prompt"] for r in steer] == [_user(r) for r in dpo]
    for row, source in zip(steer, dpo, strict=True):
        assert row["positive"].startswith(REFUSAL_OPENINGS) and not row["negative"].startswith(REFUSAL_OPENINGS)
        assert " ".join(_reply(source, "chosen").split()).startswith(row["positive"])
        assert " ".join(_reply(source, "rejected").split()).startswith(row["negative"])
        assert len(row["positive"].split()) <= 6 and len(row["negative"].split()) <= 6


def test_sentiment_pairs_differ_only_in_the_persona():
    for split in ("", "_test"):
        pos, neg = _json(f"sentiment/positive{split}.json"), _json(f"sentiment/negative{split}.json")
        for p, n in zip(pos, neg, strict=True):
            (happy, prefix), (sad, other) = SENTIMENT.match(p).groups(), SENTIMENT.match(n).groups()
            assert (happy, sad) in SENTIMENT_PAIRS and prefix == other
    prefixes = {
        split: {SENTIMENT.match(p).group(2) for p in _json(f"sentiment/positive{split}.json")}
        for split in ("", "_test")
    }
    assert not prefixes[""] & prefixes["_test"]
    neutral = _json("sentiment/neutral_prompts.json")
    assert len(set(neutral)) == 50 and not any("Act as if" in p for p in neutral)


def test_language_files_are_parallel():
    en, fr = _json("language/negative.json"), _json("language/positive.json")
    classes = _json("language/classes.json")
    assert sorted(classes) == ["de", "en", "es", "fr"] and all(len(v) == 100 for v in classes.values())
    assert classes["en"] == en[:100] and classes["fr"] == fr[:100]
    assert len({q for v in classes.values() for q in v}) == 400


def _distill_module(folder: str = "language") -> ModuleType:
    module = load_script(DATA / folder / "distill.py")
    return module


@pytest.mark.parametrize("demos", [False, True], ids=["system-prompt-teacher", "demonstrations-teacher"])
def test_language_sft_rows_are_varied_real_french_replies_to_english_instructions(demos):
    """The distilled rows pass the strict judge, are not one template, and answer generic instructions."""
    distill = _distill_module()
    suffix = "_demos" if demos else ""
    sft = _rows(f"language/sft_train{suffix}.jsonl")
    replies = [_reply(r, "completion") for r in sft]
    banned = distill.demo_phrases() if demos else frozenset()
    assert len(sft) >= 100 and all(distill.keep_reply(reply, banned) for reply in replies)
    teacher = distill.read_teacher_replies(distill.HERE / f"teacher_replies{suffix}.jsonl")
    assert distill.select_rows(*teacher, demos=demos) == sft  # the filter reproduces the committed rows
    assert teacher[0] == distill.read_teacher_replies()[0]  # both teachers answer the same candidates
    assert len({" ".join(r.split()).casefold() for r in replies}) == len(replies)
    openings = Counter(" ".join(r.split()[:3]) for r in replies)
    assert openings.most_common(1)[0][1] <= len(replies) // 4, f"one opening dominates: {openings.most_common(3)}"
    prompts = [_user(r) for r in sft]
    assert all(detect_language(p) != "fr" for p in prompts) and not set(prompts) & set(_json("language/negative.json"))
    test = _json("language/instructions_test.json")
    assert len(test) == distill.N_TEST == len(set(test)) and not set(test) & set(prompts)
    assert not set(test) & set(_instructions("general/generic_instructions.json"))


def test_language_distillation_filter_rejects_templates_and_loops():
    distill = _distill_module()
    assert not distill.keep_reply("La réponse est 12.")  # the old template: 1.5 French votes
    assert not distill.keep_reply("La vie de la vie. La vie de la vie. La vie de la vie. La vie de la vie.")
    assert not distill.keep_reply("The capital of France is Paris and it is a large city.")
    assert not distill.keep_reply("La table des éléments est la table des éléments, ce qui est la table des éléments.")
    assert not distill.keep_reply("Le chat dort sur la table, même quand la question est posée en anglais.")
    assert distill.keep_reply("Le chat dort sur la table et il rêve de la mer pendant que nous parlons.")
    assert distill.cut_at_sentence_end("Le chat dort. Il rêve de la") == "Le chat dort."


def test_language_demonstrations_are_not_scored_and_cannot_be_copied():
    """The teacher's demonstrations are no held-out instruction, and a reply that copies one of their phrases is
    dropped, so the student cannot learn the demonstrations instead of the language."""
    distill = _distill_module()
    questions = {q for q, _ in distill.DEMOS}
    assert not questions & set(_json("language/instructions_test.json"))
    assert not questions & set(_instructions("general/generic_instructions.json"))
    copied = "Pour moi, le plus efficace est de pratiquer un peu chaque jour avec des amis."
    assert distill.keep_reply(copied) and not distill.keep_reply(copied, distill.demo_phrases())
    assert all(detect_language(a, min_votes=distill.MIN_FRENCH_VOTES) == "fr" for _, a in distill.DEMOS)


def test_sentiment_sft_rows_are_varied_cheerful_replies_to_generic_instructions():
    """Distilled rows pass the recipe's strict judge, no opening dominates, and no scored prompt is trained on."""
    distill = _distill_module("sentiment")
    sft = _rows("sentiment/sft_instructions.jsonl")
    replies = [_reply(r, "completion") for r in sft]
    assert len(sft) >= 100 and all(distill.keep_reply(reply) for reply in replies)
    assert (
        distill.select_rows(*distill.LANGUAGE.read_teacher_replies(distill.HERE / "teacher_instructions.jsonl")) == sft
    )
    judged = target_rate(replies, targets=_json("sentiment/lexicon.json"), min_hits=distill.MIN_STEMS)
    assert judged.rate == 1.0
    assert len({" ".join(r.split()).casefold() for r in replies}) == len(replies)
    openings = Counter(tuple(distill._words(r)[:3]) for r in replies)
    assert openings.most_common(1)[0][1] <= len(replies) // 5, f"one opening dominates: {openings.most_common(3)}"
    prompts = [_user(r) for r in sft]
    assert not any("Act as if" in p for p in prompts)
    assert not set(prompts) & set(_json("language/instructions_test.json"))
    assert not set(prompts) & set(_instructions("general/generic_instructions.json"))


def test_sentiment_distillation_filter_rejects_stock_phrases_and_loops():
    distill = _distill_module("sentiment")
    assert not distill.keep_reply("I'm so glad to help you with this question today.")  # one stem
    assert not distill.keep_reply("Happy happy joy joy. Happy happy joy joy. Happy happy joy joy.")
    assert not distill.keep_reply("I'm thrilled and happy!")  # too short
    assert distill.keep_reply("I'm thrilled to share this: the sun rises in the east, what a joy to watch!")
    rows = distill.select_rows(["a", "b", "c"], ["I'm so happy and glad, the sky is blue and wide."] * 3)
    assert len(rows) == 1  # copies of one reply are kept once


def test_sycophancy_rows_point_away_from_the_matching_answer():
    train, test = _json("sycophancy/train_ab.json"), _json("sycophancy/test_ab.json")
    assert (len(train), len(test)) == (300, 50)
    pairs = ContrastivePairs.load(
        DATA / "sycophancy" / "train_ab.json",
        positive_key="answer_matching_behavior",
        negative_key="answer_not_matching_behavior",
        prompt_key="question",
    )
    assert len(pairs) == 300 and set(pairs.positive) | set(pairs.negative) == {"(A)", "(B)"}
    sft, dpo = _rows("sycophancy/sft_train.jsonl"), _rows("sycophancy/dpo_train.jsonl")
    both_orders = [row for item in train for row in (item, swap_options(item))]
    assert Counter(_reply(s, "completion") for s in sft) == {"(A)": 300, "(B)": 300}  # no letter to learn
    for item, s, d in zip(both_orders, sft, dpo, strict=True):
        assert _user(s) == _user(d) == item["question"]
        assert _reply(s, "completion") == _reply(d, "chosen") == item["answer_not_matching_behavior"]
        assert _reply(d, "rejected") == item["answer_matching_behavior"]


@pytest.mark.parametrize("folder", ("sentiment", "language", "sycophancy"))
def test_build_scripts_reproduce_the_committed_files(folder):
    shared = shared_data()  # fails under CI=true when ../shared/data is missing; skips with the reason elsewhere
    module = _build_module(folder)
    if folder in ("sentiment", "language"):
        outputs, jsonl = module.build(shared), {}
    else:
        train, test, sft, dpo = module.build(shared)
        outputs, jsonl = {"train_ab": train, "test_ab": test}, {"sft_train": sft, "dpo_train": dpo}
    for stem, value in outputs.items():
        assert _json(f"{folder}/{stem}.json") == value, f"{folder}/{stem}.json differs from build.py's output"
    for stem, rows in jsonl.items():
        assert _rows(f"{folder}/{stem}.jsonl") == rows, f"{folder}/{stem}.jsonl differs from build.py's output"


def test_build_scripts_reject_a_missing_source(tmp_path):
    for folder in ("sentiment", "language", "sycophancy"):
        with pytest.raises(ValueError, match="--source"):
            _build_module(folder).build(tmp_path)


def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "absent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="absent is missing"):
        shared_data()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="absent is missing"):
        shared_data()
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    assert shared_data() == tmp_path
