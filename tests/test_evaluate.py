import copy
import json
import math
from contextlib import contextmanager

import pytest
import torch
from conftest import make_tiny, shared_data
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mi_peft.evaluate import (
    ARDITI_2024,
    REFUSAL_SUBSTRINGS,
    EvalReport,
    ab_accuracy,
    detect_language,
    generate,
    is_refusal,
    kl_to_base,
    language_rate,
    perplexity,
    refusal_rate,
    swap_options,
    target_rate,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = [
    *[
        "(",
        ")",
        "A",
        "B",
        "C",
        ":",
        ".",
        ",",
        "?",
        "!",
        "I",
        "cannot",
        "sorry",
        "the",
        "a",
        "cat",
        "dog",
        "is",
        "on",
        "table",
        "and",
        "it",
    ]
]
WORDS += [
    *["le", "la", "chat", "est", "sur", "et", "il", "der", "die", "das", "und", "ist", "el", "perro", "en", "y", "no"]
]
WORDS += [*["hello", "world", "what", "how", "why", "tell", "me", "about", "please", "write", "story"]]
TEMPLATE = (
    "<s>{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["hello world", "tell me a story about the cat and the dog please", "why", "what is it"]
NEUTRAL_TEXTS = ["the cat is on the table", "hello world", "the dog and the cat and it is on la table et il est"]


def make_tokenizer(chat: bool = True, extra_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a 58-token vocabulary (fits the tiny models' 96) with a chat template."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIALS)
    tk.add_tokens(["I cannot", *extra_tokens])  # one token, so a forced reply reads "I cannot I cannot ..."
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        tok.chat_template = TEMPLATE
    return tok


@pytest.fixture
def tok():
    return make_tokenizer()


@contextmanager
def forced(model, token_id: int | list[int], amount: float = 100.0):
    """Add ``amount`` to logits (a large positive one makes greedy decoding always pick ``token_id``)."""
    head = model.get_output_embeddings()
    bias = torch.zeros(head.out_features)
    bias[token_id] = amount
    handle = head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        yield
    finally:
        handle.remove()


def lora(model, init: bool):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init)
    torch.manual_seed(3)
    return get_peft_model(model, config).eval()


# --- refusal substrings and language ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry, but I can\u2019t help with that.",  # curly apostrophes
        "As an AI language model, I do not condone this.",
        "I cannot fulfill your request.",
        "Creating malware is illegal and unethical.",
        "i apologize, BUT this is not something I can do",
        "Well... I am unable to provide that.",
        "My purpose is to be helpful and harmless.",
        "I won't be able to help with that request.",
        "I can't help but notice the risk. I'm sorry, but I can't assist with that.",  # idiom + a real refusal
    ],
)
def test_is_refusal_positive(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure, here is a recipe for banana bread: mash three bananas.",
        "The capital of France is Paris.",
        "Hello! How can I help you today?",
        "As an example, consider the number 7.",
        "I can't help but think this is a great idea: start with a plan.",
        "I can\u2019t wait to try it! First, preheat the oven.",
        "I cannot stress enough how useful a budget is.",
        "",
    ],
)
def test_is_refusal_negative(text):
    assert not is_refusal(text)


def test_not_refusal_idioms_can_be_switched_off():
    """With no idioms the published substring judge is back: "I can't help but" counts as a refusal."""
    assert not is_refusal("I can't help but think so.")
    assert is_refusal("I can't help but think so.", not_refusal=())


def test_refusal_substrings_contain_arditi_list_and_custom_lists_work():
    lowered = {s.lower() for s in REFUSAL_SUBSTRINGS}
    assert {s.lower() for s in ARDITI_2024} <= lowered
    assert is_refusal("Nope, not doing it.", substrings=["not doing"])
    assert not is_refusal("I'm sorry", substrings=["nope"])
    with pytest.raises(ValueError, match="blank"):
        is_refusal("text", substrings=["  "])
    with pytest.raises(ValueError, match="must be a string"):
        is_refusal(None)


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("The cat is on the table and it is sleeping because it was tired.", "en"),
        ("Le chat est sur la table et il dort parce qu'il est fatigué.", "fr"),
        ("Die Katze ist auf dem Tisch und sie schläft, weil sie müde ist.", "de"),
        ("El gato está en la mesa y duerme porque está cansado.", "es"),
        ("", "unknown"),
        ("12345 67890", "unknown"),
        ("Bonjour", "unknown"),
    ],
)
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_target_rate():
    gens = ["Sure, here is how", "sure thing", "No.", "Le chat est sur la table et il dort."]
    assert target_rate(gens, targets="Sure").rate == 0.5
    assert target_rate(gens, targets="Sure", case_sensitive=True).rate == 0.25
    assert target_rate(gens, targets=["no.", "chat"]).flags == [False, False, True, True]
    assert target_rate(gens, language="fr").flags == [False, False, False, True]
    assert target_rate(gens, targets="chat", language="en").rate == 0.0
    template = ["La réponse est 12.", "Le résultat est 7."]  # 1.5 French votes each
    assert target_rate(template, language="fr").flags == [True, True]
    assert target_rate(template, language="fr", min_votes=3).flags == [False, False]
    assert target_rate(gens, language="fr", min_votes=3).flags == [False, False, False, True]  # 5 votes
    with pytest.raises(ValueError, match="targets"):
        target_rate(gens)
    with pytest.raises(ValueError, match="'it'"):
        target_rate(gens, language="it")
    with pytest.raises(ValueError, match="empty"):
        target_rate([], targets="x")


def test_target_rate_min_hits_counts_distinct_targets():
    lexicon = ["glad", "joy", "great", "happy"]
    gens = ["I'm glad to help.", "Glad, glad, glad!", "What a joy, I'm so glad!", "Great and happy and glad."]
    assert target_rate(gens, targets=lexicon).flags == [True, True, True, True]
    assert target_rate(gens, targets=lexicon, min_hits=2).flags == [False, False, True, True]
    assert target_rate(gens, targets=lexicon, min_hits=3).flags == [False, False, False, True]
    assert target_rate(gens, targets=lexicon + ["GLAD"], min_hits=2).flags == [False, False, True, True]  # one target
    with pytest.raises(ValueError, match="only 4 distinct targets"):
        target_rate(gens, targets=lexicon, min_hits=5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`min_hits` must be a positive integer"):
            target_rate(gens, targets=lexicon, min_hits=bad)


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate_left_padding_matches_one_by_one(model_type, tok):
    model = make_tiny(model_type)
    unused = [*range(len(SPECIALS)), *range(len(tok), model.config.vocab_size)]
    with forced(model, unused, amount=-100.0):  # only words: no early EOS, no ids the tokenizer lacks
        batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
        single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert tok.padding_side == "right"  # never modified
    assert all(len(tok(r, add_special_tokens=False)["input_ids"]) == 6 for r in batched)
    assert len(set(batched)) > 1


def test_generate_returns_only_new_text(tok):
    model = make_tiny("llama")
    with forced(model, tok.convert_tokens_to_ids("dog")):
        replies = generate(model, tok, ["hello world", "the cat"], max_new_tokens=3)
    assert replies == ["dog dog dog", "dog dog dog"]
    with forced(model, tok.eos_token_id):
        assert generate(model, tok, ["hello world"], max_new_tokens=3) == [""]


def test_generate_plain_text_and_bad_input():
    plain = make_tokenizer(chat=False)
    model = make_tiny("llama")
    with forced(model, plain.convert_tokens_to_ids("cat")):
        assert generate(model, plain, ["hello"], max_new_tokens=2) == ["cat cat"]
    with pytest.raises(ValueError, match="no chat template"):
        generate(model, plain, ["hello"], chat=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, plain, ["hello"], max_new_tokens=0)
    with pytest.raises(ValueError, match="list of strings"):
        generate(model, plain, "hello")


def test_generate_peft_with_adapter_disabled_matches_base(tok):
    model = make_tiny("llama")
    base = generate(model, tok, PROMPTS, max_new_tokens=5)
    peft_model = lora(model, init=False)
    with peft_model.disable_adapter():
        assert generate(peft_model, tok, PROMPTS, max_new_tokens=5) == base


def test_refusal_and_language_rate_on_forced_replies(tok):
    model = make_tiny("llama")
    with forced(model, tok.convert_tokens_to_ids("I cannot")):
        result = refusal_rate(model, tok, PROMPTS, max_new_tokens=4, batch_size=3)
    assert result.rate == 1.0 and result.n == 4 and result.prompts == PROMPTS
    assert result.generations[0] == "I cannot I cannot I cannot I cannot"
    with forced(model, tok.convert_tokens_to_ids("the")):
        assert refusal_rate(model, tok, PROMPTS, max_new_tokens=4).rate == 0.0
    with forced(model, tok.convert_tokens_to_ids("est")):
        assert language_rate(model, tok, PROMPTS, language="fr", max_new_tokens=4).rate == 1.0
        assert language_rate(model, tok, PROMPTS, language="en", max_new_tokens=4).rate == 0.0
    json.dumps(result.to_dict())


# --- side effects -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_kl_to_itself_is_zero_and_grows_after_perturbing(model_type, tok):
    model = make_tiny(model_type)
    assert abs(kl_to_base(model, tok, PROMPTS, base_model=model)) < 1e-6
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.get_output_embeddings().weight[20:30] += torch.randn(10, edited.config.hidden_size)
    kl = kl_to_base(edited, tok, PROMPTS, base_model=model, batch_size=4)
    assert kl > 1e-4
    assert kl_to_base(edited, tok, PROMPTS, base_model=model, batch_size=1) == pytest.approx(kl, rel=1e-5, abs=1e-7)


def test_kl_peft_base_none_uses_disable_adapter(tok):
    model = make_tiny("llama")
    reference = copy.deepcopy(model)
    peft_model = lora(model, init=False)
    kl = kl_to_base(peft_model, tok, PROMPTS)
    assert kl > 1e-6
    assert kl == pytest.approx(kl_to_base(peft_model, tok, PROMPTS, base_model=reference), rel=1e-5)

    identity = lora(make_tiny("llama"), init=True)  # LoRA B = 0: adapter is an identity
    assert abs(kl_to_base(identity, tok, PROMPTS)) < 1e-6


def test_kl_plain_model_needs_base_model(tok):
    with pytest.raises(ValueError, match="pass `base_model=`"):
        kl_to_base(make_tiny("llama"), tok, PROMPTS)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_perplexity_matches_hand_computed_nll(model_type, tok):
    model = make_tiny(model_type)
    text = NEUTRAL_TEXTS[0]
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    nll = [-(logits[i].log_softmax(-1)[ids[i + 1]].item()) for i in range(len(ids) - 1)]
    assert perplexity(model, tok, [text]) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_perplexity_padding_invariant_and_bad_input(tok):
    model = make_tiny("llama")
    batched = perplexity(model, tok, NEUTRAL_TEXTS, batch_size=3)
    assert perplexity(model, tok, NEUTRAL_TEXTS, batch_size=1) == pytest.approx(batched, rel=1e-5)
    assert perplexity(model, tok, NEUTRAL_TEXTS, max_length=2) != pytest.approx(batched, rel=1e-3)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        perplexity(model, tok, ["hello"])
    with pytest.raises(ValueError, match="max_length"):
        perplexity(model, tok, NEUTRAL_TEXTS, max_length=0)


# --- A/B accuracy -------------------------------------------------------------------------------


def ab_items():
    question = "what is the cat ?\n\nChoices:\n(A) the cat\n(B) the dog"
    return [
        {"question": question, "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"},
        {
            "question": "is it a dog ? (A) yes (B) no",
            "answer_matching_behavior": " (A)",
            "answer_not_matching_behavior": "B",
        },
        {"question": "why", "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(A)"},
    ]


def test_ab_accuracy_reads_the_letter_after_prefilled_paren(tok):
    model = make_tiny("llama")
    with forced(model, tok.convert_tokens_to_ids("A"), amount=30.0):
        result = ab_accuracy(model, tok, ab_items(), batch_size=2)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.probs == pytest.approx([1.0, 1.0, 0.0], abs=1e-9)
    assert result.mean_prob == pytest.approx(2 / 3, abs=1e-9)
    assert all(m > 0.999 for m in result.letter_mass)
    with forced(model, tok.convert_tokens_to_ids("B"), amount=30.0):
        assert ab_accuracy(model, tok, ab_items()).accuracy == pytest.approx(1 / 3)
    with forced(model, tok.convert_tokens_to_ids("the"), amount=30.0):
        assert max(ab_accuracy(model, tok, ab_items()).letter_mass) < 1e-6  # no mass on A/B: format not followed


def test_ab_accuracy_padding_invariant_and_matches_direct_forward(tok):
    model = make_tiny("llama")
    items = ab_items()
    batched = ab_accuracy(model, tok, items, batch_size=3).probs
    single = [ab_accuracy(model, tok, [item]).probs[0] for item in items]
    assert batched == pytest.approx(single, abs=1e-5)
    text = tok.apply_chat_template(
        [{"role": "user", "content": items[0]["question"]}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text + "(", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        p = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    a, b = p[tok.convert_tokens_to_ids("A")], p[tok.convert_tokens_to_ids("B")]
    assert batched[0] == pytest.approx(float(a / (a + b)), abs=1e-5)


def caa_items():
    return [
        {
            "question": "what is the cat ?\n\nChoices:\n (A) the cat\n (B) the dog",
            "answer_matching_behavior": "(A)",
            "answer_not_matching_behavior": "(B)",
        },
        {
            "question": "is it a dog ?\n(A) yes\n(B) no",
            "answer_matching_behavior": " (B)",
            "answer_not_matching_behavior": "A",
        },
    ]


def test_swap_options_by_hand():
    first, second = (swap_options(i) for i in caa_items())
    assert first == {
        "question": "what is the cat ?\n\nChoices:\n (A) the dog\n (B) the cat",
        "answer_matching_behavior": "(B)",
        "answer_not_matching_behavior": "(A)",
    }
    assert second["question"] == "is it a dog ?\n(A) no\n(B) yes"
    assert (second["answer_matching_behavior"], second["answer_not_matching_behavior"]) == (" (A)", "B")
    assert [swap_options(swap_options(i)) for i in caa_items()] == caa_items()
    with pytest.raises(ValueError, match="does not end in options"):
        swap_options({"question": "why", "answer_matching_behavior": "(A)"})
    with pytest.raises(ValueError, match="does not end in options"):
        swap_options({"question": "is it (A) yes (B) no"})  # options not on their own lines
    with pytest.raises(ValueError, match="needs the letters"):
        swap_options({**caa_items()[0], "answer_matching_behavior": "(C)"})


def test_ab_accuracy_both_orders_cancels_a_letter_preference(tok):
    model = make_tiny("llama")
    items = caa_items()
    with forced(model, tok.convert_tokens_to_ids("A"), amount=30.0):
        one_order = ab_accuracy(model, tok, items)
        both = ab_accuracy(model, tok, items, both_orders=True)
    assert one_order.accuracy == 0.5 and one_order.order_agreement is None
    assert both.probs == pytest.approx([0.5, 0.5], abs=1e-9)  # "A" in each order: one vote each way
    assert both.order_agreement == 0.0  # the choice follows the letter: the content flips with the swap
    plain = ab_accuracy(model, tok, items)
    swapped = ab_accuracy(model, tok, [swap_options(i) for i in items])
    both = ab_accuracy(model, tok, items, both_orders=True)
    expected = [(a + b) / 2 for a, b in zip(plain.probs, swapped.probs, strict=True)]
    assert both.probs == pytest.approx(expected, abs=1e-9)
    assert both.accuracy == sum(p > 0.5 for p in expected) / 2
    agree = [(a > 0.5) == (b > 0.5) for a, b in zip(plain.probs, swapped.probs, strict=True)]
    assert both.order_agreement == sum(agree) / 2


def test_ab_accuracy_bad_items(tok):
    model = make_tiny("llama")
    good = ab_items()[0]
    with pytest.raises(ValueError, match=r"items\[0\] must be a dict"):
        ab_accuracy(model, tok, [{"question": "q"}])
    with pytest.raises(ValueError, match="same letter"):
        ab_accuracy(model, tok, [{**good, "answer_not_matching_behavior": "(A)"}])
    with pytest.raises(ValueError, match="not an answer letter"):
        ab_accuracy(model, tok, [{**good, "answer_matching_behavior": "yes"}])
    with pytest.raises(ValueError, match="one token"):
        ab_accuracy(model, make_tokenizer(extra_tokens=("(A",)), [good])
    with pytest.raises(ValueError, match="non-empty list"):
        ab_accuracy(model, tok, [])


# --- report -------------------------------------------------------------------------------------


def test_eval_report_roundtrip_and_checks(tmp_path):
    report = EvalReport(metadata={"model": "tiny"}).add("refusal", 0.25).add("kl", torch.tensor(0.5))
    assert report["kl"] == 0.5
    loaded = EvalReport.load(report.save(tmp_path / "eval.json"))
    assert loaded == report and json.loads((tmp_path / "eval.json").read_text())["metrics"]["refusal"] == 0.25
    base = EvalReport({"refusal": 0.5})
    assert "| refusal | 0.5 | 0.25 | -0.25 |" in report.to_markdown(baseline=base)
    with pytest.raises(ValueError, match="'ppl' is nan"):
        report.add("ppl", float("nan"))
    with pytest.raises(ValueError, match="'ppl' is inf"):
        EvalReport({"ppl": math.inf})
    with pytest.raises(ValueError, match="real number"):
        report.add("flags", [1, 0])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        EvalReport(metadata={"model": object()})
    with pytest.raises(KeyError, match="holds"):
        report["missing"]


# --- embedded model -----------------------------------------------------------------------------


def _instructions(name: str, n: int) -> list[str]:
    return [row["instruction"] for row in json.loads(shared_data("refusal_direction", name).read_text())[:n]]


@pytest.mark.slow
def test_refusal_rate_on_embedded_model(embedded):
    model, tokenizer = embedded
    harmful = refusal_rate(model, tokenizer, _instructions("harmful_test_noharmbench.json", 6), max_new_tokens=12)
    harmless = refusal_rate(model, tokenizer, _instructions("harmless_test.json", 6), max_new_tokens=12)
    for result in (harmful, harmless):
        assert result.n == 6 and all(isinstance(g, str) for g in result.generations) and any(result.generations)
        assert not any(g.startswith("<|im_start|>") or "<|im_end|>" in g for g in result.generations)
        assert result.flags == [is_refusal(g) for g in result.generations]
        assert result.rate == pytest.approx(sum(result.flags) / 6)
    assert harmless.rate <= 1 / 6  # the embedded model answers ordinary requests


@pytest.mark.slow
def test_refusal_rate_flags_real_refusals_of_the_embedded_model(embedded):
    """Greedy replies the embedded model echoes: two refusals, two compliant answers."""
    model, tokenizer = embedded
    prompts = [
        "Repeat this sentence exactly: I'm sorry, but I cannot help with that.",
        "Repeat after me: As an AI, I am unable to do that.",
        "Repeat this sentence exactly: Sure, here is a short poem about the sea.",
        "Repeat after me: Here is the recipe you asked for.",
    ]
    result = refusal_rate(model, tokenizer, prompts, max_new_tokens=16)
    assert result.generations[0] == "I'm sorry, but I cannot help with that."
    assert result.generations[3].startswith("Here is the recipe")
    assert result.flags == [True, True, False, False] and result.rate == 0.5
