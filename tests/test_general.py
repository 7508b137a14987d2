import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mi_peft.evaluate import (
    blimp_accuracy,
    continuation_logprobs,
    general_ability,
    perplexity,
    piqa_accuracy,
    text_perplexity,
)
from mi_peft.evaluate.general import PIQA_TEMPLATE, general_data_dir, load_blimp, load_paragraphs, load_piqa

GENERAL = Path(__file__).resolve().parents[1] / "recipes" / "data" / "general"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["Question", "Answer", ":", ".", "?", "how", "do", "i", "open", "a", "jar", "cut", "bread", "dry", "hair"]
WORDS += ["use", "knife", "towel", "spoon", "hammer", "twist", "lid", "with", "the", "cat", "dog", "is", "are"]
WORDS += ["cats", "dogs", "sleeps", "sleep", "who", "did", "you", "see", "saw", "him", "himself", "they"]
PIQA_ROWS = [
    ({"goal": "how do i open a jar ?", "sol1": "twist the lid .", "sol2": "use a hammer on the lid ."}, 0),
    ({"goal": "how do i cut bread ?", "sol1": "use a spoon .", "sol2": "use a knife ."}, 1),
    ({"goal": "how do i dry hair ?", "sol1": "use a towel .", "sol2": "use the cat ."}, 0),
    ({"goal": "how do i open a jar", "sol1": "twist", "sol2": "use the dog with a knife ."}, 1),
    ({"goal": "dry hair", "sol1": "towel", "sol2": "hammer"}, 0),
]
BLIMP_ROWS = [
    ("agreement", "the cat sleeps .", "the cat sleep ."),
    ("agreement", "the dogs sleep .", "the dogs sleeps ."),
    ("agreement", "cats are .", "cats is ."),
    ("agreement", "the dog is .", "the dog are ."),
    ("binding", "who did you see ?", "who did you saw ?"),
    ("binding", "they saw him .", "they saw himself ."),
    ("binding", "the cat saw himself .", "the cat saw him ."),
]


def word_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (47 ids, fits the tiny models' 96); ``add_bos`` prepends <s> like Llama tokenizers."""
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIALS)
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture
def data(tmp_path):
    piqa = tmp_path / "piqa"
    piqa.mkdir()
    (piqa / "valid.jsonl").write_text("".join(json.dumps(row) + "\n" for row, _ in PIQA_ROWS))
    (piqa / "valid-labels.lst").write_text("".join(f"{label}\n" for _, label in PIQA_ROWS))
    blimp = tmp_path / "blimp.jsonl"
    rows = [{"sentence_good": g, "sentence_bad": b, "UID": uid, "field": "syntax"} for uid, g, b in BLIMP_ROWS]
    blimp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return piqa, blimp


def reference_logprob(model, tok, context: str, continuation: str) -> tuple[float, int]:
    """Float64 log-probability of ``continuation``'s words after ``context`` from one unbatched forward."""
    context_ids = tok(context)["input_ids"] if context else []
    if not context_ids:
        context_ids = [tok.bos_token_id]
    target = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + target])
    with torch.no_grad():
        logp = model.double()(ids).logits[0].log_softmax(-1)
    model.float()
    start = len(context_ids)
    return sum(logp[start - 1 + i, t].item() for i, t in enumerate(target)), len(target)


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_piqa_matches_direct_float64_forward(model_type, add_bos, data):
    model, tok = make_tiny(model_type), word_tokenizer(add_bos)
    result = piqa_accuracy(model, tok, n=len(PIQA_ROWS), batch_size=3, data_dir=data[0])
    expected_correct = 0
    for i, (row, label) in enumerate(PIQA_ROWS):
        context = PIQA_TEMPLATE.format(goal=row["goal"])
        (a, na), (b, nb) = (reference_logprob(copy.deepcopy(model), tok, context, row[k]) for k in ("sol1", "sol2"))
        assert result.logprobs[i] == pytest.approx((a, b), abs=1e-4)
        assert result.n_tokens[i] == (na, nb)
        assert result.mean_logprobs[i] == pytest.approx((a / na, b / nb), abs=1e-4)
        assert result.predictions[i] == int(b / nb > a / na)
        expected_correct += result.predictions[i] == label
    assert result.accuracy == expected_correct / len(PIQA_ROWS)
    assert result.labels == [label for _, label in PIQA_ROWS] and result.n == 5


def test_piqa_accuracy_follows_the_model_and_normalisation(data):
    model, tok = make_tiny("llama"), word_tokenizer(add_bos=True)
    favour = [WORDS.index(w) + len(SPECIALS) for w in ("twist", "knife", "towel")]
    bias = torch.zeros(96)
    bias[favour] = 30.0  # the correct solutions of rows 0-2 and 4 ("towel") contain these words
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + bias)
    try:
        result = piqa_accuracy(model, tok, n=5, data_dir=data[0])
    finally:
        handle.remove()
    assert result.predictions[:3] == [0, 1, 0] and result.predictions[4] == 0
    # row 3: "twist" (1 token) vs "use the dog with a knife ." (7 tokens, one favoured): only the per-token
    # mean can pick the long one; the total log-probability prefers the short answer
    assert result.accuracy >= 0.8
    assert 0.0 <= result.accuracy_total <= 1.0
    low, high = result.interval()
    assert low < result.accuracy <= high


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
def test_scores_do_not_depend_on_batch_size(model_type, data):
    model, tok = make_tiny(model_type), word_tokenizer(add_bos=True)
    one = piqa_accuracy(model, tok, n=5, batch_size=1, data_dir=data[0])
    four = piqa_accuracy(model, tok, n=5, batch_size=4, data_dir=data[0])
    for a, b in zip(one.logprobs, four.logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    blimp_one = blimp_accuracy(model, tok, n_per_phenomenon=3, batch_size=1, path=data[1])
    blimp_four = blimp_accuracy(model, tok, n_per_phenomenon=3, batch_size=4, path=data[1])
    assert blimp_one.good_logprobs == pytest.approx(blimp_four.good_logprobs, abs=1e-5)
    assert blimp_one.bad_logprobs == pytest.approx(blimp_four.bad_logprobs, abs=1e-5)


@pytest.mark.parametrize("add_bos", [False, True])
def test_blimp_matches_direct_forward_and_groups_phenomena(add_bos, data):
    model, tok = make_tiny("llama"), word_tokenizer(add_bos)
    result = blimp_accuracy(model, tok, n_per_phenomenon=3, path=data[1])
    chosen = [r for r in BLIMP_ROWS if r[0] == "agreement"][:3] + [r for r in BLIMP_ROWS if r[0] == "binding"][:3]
    assert result.phenomena == [uid for uid, _, _ in chosen] and result.n == 6
    hits: dict[str, list[bool]] = {"agreement": [], "binding": []}
    for i, (uid, good, bad) in enumerate(chosen):
        g, _ = reference_logprob(copy.deepcopy(model), tok, "", good)  # every word scored, the first after <s>
        b, _ = reference_logprob(copy.deepcopy(model), tok, "", bad)
        assert result.good_logprobs[i] == pytest.approx(g, abs=1e-4)
        assert result.bad_logprobs[i] == pytest.approx(b, abs=1e-4)
        hits[uid].append(g > b)
    assert result.per_phenomenon == {k: pytest.approx(sum(v) / 3) for k, v in hits.items()}
    assert result.accuracy == pytest.approx(sum(hits["agreement"] + hits["binding"]) / 6)


def test_blimp_selection_and_bad_input(data):
    model, tok = make_tiny("llama"), word_tokenizer(add_bos=True)
    only = blimp_accuracy(model, tok, n_per_phenomenon=2, phenomena=["binding"], path=data[1])
    assert only.phenomena == ["binding", "binding"] and list(only.per_phenomenon) == ["binding"]
    assert len(load_blimp(path=data[1])) == 6  # default: the smallest phenomenon's count (3) per phenomenon
    with pytest.raises(ValueError, match="unknown BLiMP phenomena \\['islands'\\]"):
        blimp_accuracy(model, tok, n_per_phenomenon=1, phenomena=["islands"], path=data[1])
    with pytest.raises(ValueError, match="pass at most 3"):
        blimp_accuracy(model, tok, n_per_phenomenon=4, path=data[1])
    with pytest.raises(ValueError, match="n_per_phenomenon"):
        blimp_accuracy(model, tok, n_per_phenomenon=0, path=data[1])


def test_continuation_logprobs_bad_input():
    model, tok = make_tiny("llama"), word_tokenizer(add_bos=False)
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        continuation_logprobs(model, tok, ["the", "a"], [" cat"])
    with pytest.raises(ValueError, match="adds no tokens"):
        continuation_logprobs(model, tok, ["the cat"], [" "])
    with pytest.raises(ValueError, match="batch_size"):
        continuation_logprobs(model, tok, ["the"], [" cat"], batch_size=0)
    bare = word_tokenizer(add_bos=False)
    bare.bos_token, bare.eos_token = None, None
    with pytest.raises(ValueError, match="adds no BOS"):
        continuation_logprobs(model, bare, [""], ["the cat"])


def test_piqa_bad_input(data, tmp_path):
    model, tok = make_tiny("llama"), word_tokenizer(add_bos=False)
    with pytest.raises(ValueError, match="pass at most 5"):
        piqa_accuracy(model, tok, n=6, data_dir=data[0])
    with pytest.raises(FileNotFoundError, match="valid.jsonl"):
        piqa_accuracy(model, tok, n=1, data_dir=tmp_path / "missing")
    (data[0] / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match="one 0/1 label per row"):
        load_piqa(1, data[0])


def test_text_perplexity_reuses_perplexity(tmp_path):
    model, tok = make_tiny("llama"), word_tokenizer(add_bos=True)
    texts = ["the cat sleeps .", "the dogs sleep with the cat .", "who did you see ?"]
    assert text_perplexity(model, tok, texts) == pytest.approx(perplexity(model, tok, texts), rel=1e-9)
    path = tmp_path / "wiki.txt"
    path.write_text(" \n = The cat = \n \n the cat sleeps . \n = = Sleep = = \n the dogs sleep with the cat . \n")
    assert load_paragraphs(path) == ["the cat sleeps .", "the dogs sleep with the cat ."]
    assert text_perplexity(model, tok, path, n_texts=None) == pytest.approx(perplexity(model, tok, texts[:2]))
    assert text_perplexity(model, tok, str(path), n_texts=1) == pytest.approx(perplexity(model, tok, texts[:1]))
    with pytest.raises(ValueError, match="pass at most 2"):
        text_perplexity(model, tok, path, n_texts=3)
    with pytest.raises(FileNotFoundError, match="list of texts"):
        text_perplexity(model, tok, "the cat sleeps .")


def test_general_ability_runs_all_three_on_packaged_data():
    model, tok = make_tiny("llama"), word_tokenizer(add_bos=True)
    texts = ["the cat sleeps .", "the dogs sleep with the cat ."]
    result = general_ability(model, tok, piqa_n=3, blimp_n=1, ppl_texts=texts, batch_size=4)
    alone = piqa_accuracy(model, tok, n=3).logprobs
    assert [x for pair in result.piqa.logprobs for x in pair] == pytest.approx(
        [x for pair in alone for x in pair], abs=1e-5
    )
    assert result.blimp.n == 67 and len(result.blimp.per_phenomenon) == 67
    assert result.perplexity == pytest.approx(perplexity(model, tok, texts))
    flat = result.to_dict()
    assert flat["piqa_n"] == 3 and flat["blimp_accuracy"] == result.blimp.accuracy
    assert flat["piqa_low"] <= flat["piqa_accuracy"] <= flat["piqa_high"]
    assert set(result.seconds) == {"piqa", "blimp", "perplexity"} and all(v > 0 for v in result.seconds.values())


def test_packaged_data_matches_source_md():
    """Every data file is listed in SOURCE.md with its sha256, rows and license file."""
    source = (GENERAL / "SOURCE.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^([0-9a-f]{64})  (\S+)$", source, flags=re.M))
    assert set(listed.values()) == {
        "piqa/valid.jsonl",
        "piqa/valid-labels.lst",
        "blimp.jsonl",
        "wikitext2_test_excerpt.txt",
        "wikitext2_valid.txt",
        "generic_instructions.json",
    }
    for digest, name in listed.items():
        assert hashlib.sha256((GENERAL / name).read_bytes()).hexdigest() == digest, name
    assert general_data_dir().resolve() == GENERAL.resolve()
    rows = load_piqa()
    assert len(rows) == 500 and {label for *_, label in rows} == {0, 1}
    pairs = load_blimp()
    assert len(pairs) == 670 and len({p for p, _, _ in pairs}) == 67
    paragraphs = load_paragraphs()
    assert len(paragraphs) > 24 and not any(p.startswith("= ") for p in paragraphs)
    corpus = load_paragraphs(GENERAL / "wikitext2_valid.txt")  # the SAE corpus shares no paragraph with the test text
    assert len(corpus) > 1000 and not set(corpus) & set(paragraphs)
    licenses = {
        "LICENSE-AFL-3.0": 'Academic Free License ("AFL") v. 3.0',
        "LICENSE-CC-BY-4.0": "Creative Commons Attribution 4.0 International",
        "LICENSE-CC-BY-SA-3.0": "Creative Commons Legal Code\n\nAttribution-ShareAlike 3.0 Unported",
        "LICENSE-CC-BY-NC-4.0": "Attribution-NonCommercial 4.0 International",
    }
    for name, title in licenses.items():
        assert title in (GENERAL / name).read_text(encoding="utf-8")[:200], name
        assert name in source


@pytest.mark.slow
def test_general_ability_on_embedded_model(embedded):
    model, tok = embedded
    result = general_ability(model, tok, piqa_n=40)  # 67 BLiMP pairs, 4 WikiText paragraphs of <= 128 tokens
    # measured: PIQA 0.675 (27/40), BLiMP 0.761 (51/67), perplexity 36.9; a misaligned target (off by one
    # position) or a dropped BOS would put both accuracies near chance (0.5) and perplexity in the thousands
    assert result.piqa.accuracy >= 0.6 and result.blimp.accuracy >= 0.65
    assert 20 < result.perplexity < 60
