from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import load_script, make_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mi_peft.evaluate import (
    degenerate_rate,
    distinct_2,
    duplicate_rate,
    generate,
    generation_health,
    is_degenerate,
    load_generic_instructions,
    shared_opening_rate,
)
from mi_peft.evaluate.health import units

RECIPE_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data"
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "tell", "me", "story"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(VOCAB[:4])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@contextmanager
def forced(model, token_id: int):
    """Greedy decoding always picks ``token_id`` (a large logit bias on the output layer)."""
    bias = torch.zeros(model.get_output_embeddings().out_features)
    bias[token_id] = 100.0
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias)
    try:
        yield
    finally:
        handle.remove()


def test_units_split_words_punctuation_and_emoji():
    assert units("I love you. I LOVE you!") == ["i", "love", "you", ".", "i", "love", "you", "!"]
    assert units("😊😊 ok") == ["😊", "😊", "ok"]


@pytest.mark.parametrize(
    "reply",
    [
        "the the the the the the the the",  # one word, 8 times
        "Sure! The answer is: the the the the the the the the the the",
        "I love you. I love you. I love you.",  # 4-unit phrase, 3 times (12 units)
        "a b c a b c a b c a b",  # last copy cut by the token limit still counts
        " ".join(["one two three four five six seven eight"] * 3),  # 8-gram, 3 times
        "😊😊😊😊😊😊😊😊",
    ],
)
def test_degenerate_replies(reply):
    assert is_degenerate(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "The cat sat on the mat.",
        "the the the",  # 3 units: shorter than the 8-unit tail
        "No, no, no.",
        "the the the the the the the the the and then we went home.",  # loops in the middle, not to the end
        " ".join(["one two three four five six seven eight nine"] * 3),  # a 9-gram is longer than max_ngram
        "I love you. I love you.",  # 2 copies < 3
    ],
)
def test_healthy_replies(reply):
    assert not is_degenerate(reply)


def test_degenerate_rule_parameters_and_bad_values():
    nine = " ".join(["one two three four five six seven eight nine"] * 3)
    assert is_degenerate(nine, max_ngram=9)
    assert is_degenerate("the the the", min_tail_units=3)
    assert not is_degenerate("I love you. I love you. I love you.", min_repeats=4)
    with pytest.raises(ValueError, match="max_ngram"):
        is_degenerate("the", max_ngram=0)


def test_rates_on_hand_written_replies():
    replies = [
        "the the the the the the the the the the",
        "The cat sat on the mat.",
        "The cat  sat on the mat. ",  # duplicate of the one before after whitespace normalisation
        "the cat sat on the mat.",  # case differs: not a duplicate
        "I love you. I love you. I love you.",
    ]
    assert degenerate_rate(replies) == pytest.approx(2 / 5)
    assert duplicate_rate(replies) == pytest.approx(2 / 5)
    assert duplicate_rate(["a", "b", "c"]) == 0.0
    assert duplicate_rate(["", " ", "x"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="`replies` is empty"):
        degenerate_rate([])
    with pytest.raises(ValueError, match="list of strings"):
        duplicate_rate("one reply")


def test_distinct_2_by_hand():
    # bigrams: (the,cat) (cat,sat) | (the,cat) (cat,ran) | none -> 3 distinct of 4
    assert distinct_2(["the cat sat", "The cat ran", "a"]) == pytest.approx(3 / 4)
    # no bigram spans two replies: (a,b) (b,a) only, not (b,b)
    assert distinct_2(["a b", "b a"]) == 1.0
    # "the" x 10: 9 bigrams, all (the,the)
    assert distinct_2(["the " * 10]) == pytest.approx(1 / 9)
    assert distinct_2(["hi, hi"]) == 1.0  # (hi ,) (, hi)
    assert distinct_2(["a", ""]) == 0.0


def test_shared_opening_rate_by_hand():
    replies = ["I'm so glad, yes!", "i'm so GLAD to help", "I'm so tired.", "Sure", "sure!"]
    # openings (i m so glad) x2, (i m so tired), (sure) x2 -> 4 of 5 share theirs
    assert shared_opening_rate(replies) == pytest.approx(4 / 5)
    assert shared_opening_rate(replies, n_words=2) == pytest.approx(1.0)  # (i m) x3, (sure) x2
    assert shared_opening_rate(["The cat sat.", "The dog sat.", "A cat"], n_words=4) == 0.0
    assert shared_opening_rate(["", "!!"]) == 1.0  # no words: both open with nothing
    with pytest.raises(ValueError, match="n_words"):
        shared_opening_rate(replies, n_words=0)
    with pytest.raises(ValueError, match="`replies` is empty"):
        shared_opening_rate([])


def test_generation_health_on_forced_loop():
    model, tok = make_tiny("llama"), word_tokenizer()
    prompts = ["tell me a story", "the cat", "a dog ran"]
    with forced(model, VOCAB.index("the")):
        health = generation_health(model, tok, prompts, max_new_tokens=10, chat=False)
        assert health.generations == generate(model, tok, prompts, max_new_tokens=10, chat=False)
    assert health.generations == ["the the the the the the the the the the"] * 3
    assert (health.degenerate_rate, health.duplicate_rate) == (1.0, 1.0)
    assert health.distinct_2 == pytest.approx(1 / 27)  # 3 replies x 9 bigrams, all (the, the)
    assert health.shared_opening_rate == 1.0
    assert health.n == 3 and health.prompts == prompts
    assert health.to_dict()["generations"] == health.generations


def test_generation_health_on_random_model_reports_its_replies():
    model, tok = make_tiny("llama"), word_tokenizer()
    prompts = ["tell me a story", "the cat", "a dog ran", "the mat"]
    health = generation_health(model, tok, prompts, max_new_tokens=6, chat=False, batch_size=2)
    assert health.generations == generate(model, tok, prompts, max_new_tokens=6, chat=False)
    assert health.degenerate_rate == degenerate_rate(health.generations)
    assert health.duplicate_rate == duplicate_rate(health.generations)
    assert health.distinct_2 == distinct_2(health.generations)
    assert health.shared_opening_rate == shared_opening_rate(health.generations)
    with pytest.raises(ValueError, match="prompts"):
        generation_health(model, tok, [], chat=False)


def _recipe_strings() -> set[str]:
    """The strings of every recipe data file by the generic-instruction builder's own rule (one rule)."""
    build = load_script(RECIPE_DATA / "general" / "build.py")
    return set(build.recipe_strings(RECIPE_DATA))


def test_generic_instructions_are_held_out_and_unique():
    instructions = load_generic_instructions()
    assert len(instructions) == 200
    normalised = [" ".join(t.split()).casefold() for t in instructions]
    assert len(set(normalised)) == 200
    taken = _recipe_strings()
    assert len(taken) > 1000  # the refusal, sentiment, language and sycophancy files were read
    assert not [t for t in normalised if t in taken or any(t in s for s in taken)]
    assert load_generic_instructions(5) == instructions[:5]
    with pytest.raises(ValueError, match="only 200 instructions"):
        load_generic_instructions(201)
