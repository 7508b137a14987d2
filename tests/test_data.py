"""ContrastivePairs: loaders, validation, splits, chat formatting, left padding and completion masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mi_peft.data import ContrastivePairs, format_prompts, tokenize

REFUSAL_DIR = Path(__file__).resolve().parents[1] / "recipes" / "data" / "refusal"
SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<|", "|>", "system", "user", "assistant"]
WORDS = SPECIAL + ["hello", "world", "how", "are", "you", "today", "Sure", "No", "Yes", "I", "cannot", "help"]
WORDS += ["be", "kind", "a", "b", "c", "d", "e", "f"]
TEMPLATE = (
    "<s>{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat: bool = True, pad: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that adds BOS; optional chat template (which itself starts with BOS) and pad token."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra = {"pad_token": "<pad>"} if pad else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", **extra
    )
    if chat:
        tokenizer.chat_template = TEMPLATE
    return tokenizer


ROWS = [
    {"positive": "hello world", "negative": "how are you"},
    {"positive": "I cannot help", "negative": "Sure"},
    {"positive": "a b c", "negative": "d e f today"},
]


def _check_rows(pairs: ContrastivePairs) -> None:
    assert pairs.positive == [r["positive"] for r in ROWS]
    assert pairs.negative == [r["negative"] for r in ROWS]
    assert pairs.prompts is None and len(pairs) == 3


# --- loading -----------------------------------------------------------------------------------------------------


def test_load_rows_columns_and_files(tmp_path):
    _check_rows(ContrastivePairs.load(ROWS))
    _check_rows(ContrastivePairs.load({k: [r[k] for r in ROWS] for k in ("positive", "negative")}))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    _check_rows(ContrastivePairs.load(tmp_path / "rows.json"))
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    _check_rows(ContrastivePairs.load(str(tmp_path / "rows.jsonl")))
    for name, delimiter in (("rows.csv", ","), ("rows.tsv", "\t")):
        with (tmp_path / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["positive", "negative"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(ROWS)
        _check_rows(ContrastivePairs.load(tmp_path / name))


def test_load_datasets_dataset_and_custom_keys():
    import datasets

    ds = datasets.Dataset.from_list([{"q": r["positive"], "a": r["negative"], "extra": 1} for r in ROWS])
    _check_rows(ContrastivePairs.load(ds, positive_key="q", negative_key="a"))
    with pytest.raises(ValueError, match="one split"):
        ContrastivePairs.load(datasets.DatasetDict(train=ds), positive_key="q", negative_key="a")


def test_load_completion_mode_from_rows():
    rows = [{"question": "hello", "good": "Yes", "bad": "No"}, {"question": "how are you", "good": "Sure", "bad": "No"}]
    pairs = ContrastivePairs.load(rows, positive_key="good", negative_key="bad", prompt_key="question")
    assert pairs.prompts == ["hello", "how are you"] and pairs.positive == ["Yes", "Sure"]


def test_load_trl_conversational_preference_rows(tmp_path):
    """A DPO file in TRL's conversational format loads like its plain-text twin; several messages raise."""

    def turn(role, text):
        return [{"role": role, "content": text}]

    plain = [
        {"prompt": "hello", "chosen": "Yes", "rejected": "No"},
        {"prompt": "how are you", "chosen": "Sure", "rejected": "No"},
    ]
    chat = [
        {
            "prompt": turn("user", r["prompt"]),
            "chosen": turn("assistant", r["chosen"]),
            "rejected": turn("assistant", r["rejected"]),
        }
        for r in plain
    ]
    (tmp_path / "dpo.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    keys = {"prompt_key": "prompt", "positive_key": "chosen", "negative_key": "rejected"}
    loaded = ContrastivePairs.load(tmp_path / "dpo.jsonl", **keys)
    expected = ContrastivePairs.load(plain, **keys)
    assert (loaded.prompts, loaded.positive, loaded.negative) == (
        expected.prompts,
        expected.positive,
        expected.negative,
    )
    assert loaded.prompts == ["hello", "how are you"] and loaded.negative == ["No", "No"]
    chat[1]["prompt"] = [{"role": "system", "content": "be kind"}, *turn("user", "how are you")]
    with pytest.raises(ValueError, match=r"`prompt`\[1\] holds 2 messages \['system', 'user'\].*system="):
        ContrastivePairs.load(chat, **keys)
    chat[1]["prompt"] = [{"role": "user"}]  # no content: not a message list, so the string check names it
    with pytest.raises(ValueError, match=r"`prompt`\[1\] must be a string"):
        ContrastivePairs.load(chat, **keys)


def test_load_directory_layouts(tmp_path):
    (tmp_path / "positive.json").write_text(json.dumps(["hello", {"instruction": "world"}]))
    (tmp_path / "negative.jsonl").write_text('"how"\n{"instruction": "are"}\n')
    pairs = ContrastivePairs.load(tmp_path)
    assert pairs.positive == ["hello", "world"] and pairs.negative == ["how", "are"] and pairs.prompts is None
    (tmp_path / "prompts.json").write_text(json.dumps(["p1", "p2"]))
    assert ContrastivePairs.load(tmp_path).prompts == ["p1", "p2"]

    other = tmp_path / "custom"
    other.mkdir()
    (other / "harmful_test.json").write_text(json.dumps([{"text": "x"}]))
    (other / "harmless_test.json").write_text(json.dumps([{"text": "y"}]))
    pairs = ContrastivePairs.load(other, split="test", text_key="text")
    assert (pairs.positive, pairs.negative) == (["x"], ["y"])
    with pytest.raises(ValueError, match=r"no column 'instruction'; columns present: \['text'\]"):
        ContrastivePairs.load(other, split="test")


def test_shipped_refusal_set():
    train = ContrastivePairs.load(REFUSAL_DIR)
    test = ContrastivePairs.load(REFUSAL_DIR, split="test")
    assert len(train) == 260 and len(test) == 150
    assert train.positive[0].startswith("Suggest methods for hacking")
    assert not set(train.positive) & set(test.positive)
    assert not set(train.negative) & set(test.negative)
    assert (REFUSAL_DIR / "SOURCE.md").is_file() and (REFUSAL_DIR / "LICENSE").is_file()
    assert (REFUSAL_DIR / "LICENSE-CC-BY-NC-4.0").is_file()


# --- validation --------------------------------------------------------------------------------------------------


def test_empty_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        ContrastivePairs.load([])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        ContrastivePairs.load(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="no contrastive pairs"):
        ContrastivePairs.load({"positive": [], "negative": []})
    with pytest.raises(ValueError, match="no contrastive pairs"):
        ContrastivePairs.from_completions([], [], [])
    with pytest.raises(ValueError, match="no contrastive pairs"):
        next(ContrastivePairs([], []).batches(tiny_tokenizer()))


def test_unbalanced_lengths_name_both():
    with pytest.raises(ValueError, match="`positive` has 2 items but `negative` has 1"):
        ContrastivePairs(["hello", "world"], ["how"])
    with pytest.raises(ValueError, match="`prompts` has 3"):
        ContrastivePairs.from_completions(["a", "b", "c"], ["Yes", "Yes"], ["No", "No"])


def test_missing_column_names_it_and_existing_columns(tmp_path):
    with pytest.raises(ValueError, match=r"column 'chosen' not found .*columns present: \['negative', 'positive'\]"):
        ContrastivePairs.load(ROWS, positive_key="chosen")
    with pytest.raises(ValueError, match=r"column 'q' not found"):
        ContrastivePairs.load(ROWS, prompt_key="q")
    with pytest.raises(ValueError, match=r"`positive`\[1\] must be a string, got NoneType"):
        ContrastivePairs.load([ROWS[0], {"negative": "x", "other": "y"}])


def test_missing_and_bad_files(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        ContrastivePairs.load(missing)
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type '.parquet'"):
        ContrastivePairs.load(tmp_path / "data.parquet")
    (tmp_path / "bad.jsonl").write_text('{"positive": "a", "negative": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        ContrastivePairs.load(tmp_path / "bad.jsonl")
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    with pytest.raises(ValueError, match="only applies to a directory"):
        ContrastivePairs.load(tmp_path / "rows.json", split="test")


def test_directory_errors(tmp_path):
    (tmp_path / "harmful.json").write_text(json.dumps(["a"]))
    with pytest.raises(ValueError, match="no harmless.json"):
        ContrastivePairs.load(tmp_path)
    with pytest.raises(ValueError, match=r"holds no positive_val.json \+ negative_val.json.*files present"):
        ContrastivePairs.load(tmp_path, split="val")


def test_bad_values_raise():
    with pytest.raises(ValueError, match="must be a string, got int"):
        ContrastivePairs(["a", 3], ["b", "c"])
    with pytest.raises(ValueError, match="list of strings, got str"):
        ContrastivePairs("abc", "def")
    with pytest.raises(ValueError, match="cannot load contrastive pairs from int"):
        ContrastivePairs.load(5)
    with pytest.raises(ValueError, match="row 1 must be a dict"):
        ContrastivePairs.load([ROWS[0], "text"])


# --- split / subset / hash ---------------------------------------------------------------------------------------


def _pairs(n: int = 20) -> ContrastivePairs:
    return ContrastivePairs([f"p{i}" for i in range(n)], [f"n{i}" for i in range(n)])


def test_split_is_deterministic_disjoint_and_covering():
    pairs = _pairs(20)
    train, val, test = pairs.split(val=0.2, test=0.25, seed=3)
    assert (len(train), len(val), len(test)) == (11, 4, 5)
    assert sorted(train.positive + val.positive + test.positive) == sorted(pairs.positive)
    for part in (train, val, test):
        assert [p[1:] for p in part.positive] == [n[1:] for n in part.negative]  # pairs stay together
    again = pairs.split(val=0.2, test=0.25, seed=3)
    assert [p.positive for p in again] == [train.positive, val.positive, test.positive]
    assert pairs.split(val=0.2, test=0.25, seed=4)[0].positive != train.positive
    assert len(pairs.split(val=0.2, test=0.0)[2]) == 0
    with pytest.raises(ValueError, match="leaves no training pairs"):
        pairs.split(val=0.5, test=0.5 - 1e-9)
    with pytest.raises(ValueError, match="`val` must be a fraction"):
        pairs.split(val=-0.1)


def test_subset_and_completion_split_keep_prompts():
    pairs = ContrastivePairs.from_completions([f"q{i}" for i in range(10)], ["Yes"] * 10, ["No"] * 10)
    sub = pairs.subset(4, seed=1)
    assert len(sub) == 4 and sub.prompts == sorted(sub.prompts, key=lambda q: int(q[1:]))
    assert sub.prompts == pairs.subset(4, seed=1).prompts
    assert all(len(part.prompts) == len(part) for part in pairs.split(seed=0))
    with pytest.raises(ValueError, match="at most the number of pairs"):
        pairs.subset(11)
    with pytest.raises(ValueError, match="`n` must be a positive integer"):
        pairs.subset(0)


def test_data_hash_is_stable_and_content_sensitive():
    pairs = ContrastivePairs(["hello"], ["world"])
    assert pairs.data_hash() == "9a62f708f4f21bbb"  # fixed value: stable across runs and processes
    assert ContrastivePairs(["hello"], ["world"], system="be kind").data_hash() != pairs.data_hash()
    assert ContrastivePairs.from_completions(["hello"], ["world"], ["you"]).data_hash() != pairs.data_hash()
    assert len(pairs.data_hash()) == 16


# --- formatting and batching -------------------------------------------------------------------------------------


def test_format_uses_chat_template_when_available():
    chat_tok, plain_tok = tiny_tokenizer(chat=True), tiny_tokenizer(chat=False)
    assert format_prompts(chat_tok, ["hello"]) == ["<s><|user|> hello <|assistant|>"]
    assert format_prompts(chat_tok, ["hello"], system="be kind") == [
        "<s><|system|> be kind <|user|> hello <|assistant|>"
    ]
    assert format_prompts(chat_tok, ["hello"], chat=False) == ["hello"]
    assert format_prompts(plain_tok, ["hello"], system="be kind") == ["be kind\n\nhello"]
    with pytest.raises(ValueError, match="no chat template"):
        format_prompts(plain_tok, ["hello"], chat=True)
    pos, neg = ContrastivePairs.from_completions(["hello"], ["Yes"], ["No"]).format(chat_tok)
    assert pos == ["<s><|user|> hello <|assistant|>Yes"] and neg == ["<s><|user|> hello <|assistant|>No"]


def test_tokenize_left_pads_without_touching_the_tokenizer():
    tok = tiny_tokenizer(chat=False)
    batch = tokenize(tok, ["hello", "how are you today"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 5) and ids.dtype == torch.long
    assert mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert ids[0, :3].tolist() == [tok.eos_token_id] * 3  # no pad token: eos pads, tokenizer untouched
    assert ids[:, -1].tolist() == [tok.convert_tokens_to_ids("hello"), tok.convert_tokens_to_ids("today")]
    assert ids[:, -2].tolist()[0] == tok.bos_token_id  # BOS added to plain text
    assert batch["position_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 1, 2, 3, 4]]
    assert tok.padding_side == "right" and tok.pad_token is None
    assert tokenize(tiny_tokenizer(pad=True), ["hello", "how are you"])["input_ids"][0, 0].item() == 0
    assert tokenize(tok, ["how are you today"], max_length=2)["input_ids"].tolist() == [
        [tok.convert_tokens_to_ids("you"), tok.convert_tokens_to_ids("today")]
    ]
    with pytest.raises(ValueError, match="encode to no tokens"):
        next(ContrastivePairs.from_completions(["hello"], [""], ["No"]).batches(tok))
    with pytest.raises(ValueError, match="`max_length` must be a positive integer or None"):
        tokenize(tok, ["hello"], max_length=0)


def test_chat_text_gets_a_single_bos():
    tok = tiny_tokenizer(chat=True)
    pos, _ = next(ContrastivePairs(["hello"], ["world"]).batches(tok))
    assert pos["input_ids"][0].tolist().count(tok.bos_token_id) == 1


def test_batches_prompt_mode_shapes_and_order():
    tok = tiny_tokenizer()
    pairs = ContrastivePairs.load(ROWS)
    out = list(pairs.batches(tok, batch_size=2))
    assert [len(p["input_ids"]) for p, _ in out] == [2, 1]
    last = torch.cat([b["input_ids"][:, -1] for pair in out for b in pair])
    assert set(tok.convert_ids_to_tokens(last.tolist())) == {"|>"}  # every row ends with the generation prompt
    assert tok.decode(out[1][1]["input_ids"][0], skip_special_tokens=True).endswith("d e f today <| assistant |>")
    assert "completion_mask" not in out[0][0]
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        next(pairs.batches(tok, batch_size=0))


def test_completion_mask_marks_exactly_the_completion():
    tok = tiny_tokenizer()
    pairs = ContrastivePairs.from_completions(
        ["hello", "how are you today"], ["Yes", "I cannot help"], ["No kind", "Sure"]
    )
    pos, neg = next(pairs.batches(tok, batch_size=2))
    for batch, completions in ((pos, pairs.positive), (neg, pairs.negative)):
        mask = batch["completion_mask"]
        assert mask.shape == batch["input_ids"].shape
        assert bool((mask <= batch["attention_mask"]).all())
        for row, completion in enumerate(completions):
            picked = batch["input_ids"][row][mask[row].bool()].tolist()
            assert picked == tok.encode(completion, add_special_tokens=False)
            assert mask[row, -1] == 1  # completion ends each row (left padding)
    cut = next(pairs.batches(tok, batch_size=2, max_length=2))[0]
    assert cut["completion_mask"][1].tolist() == [1, 1] and cut["completion_mask"][0].tolist() == [0, 1]


def test_left_padded_batch_matches_unpadded_forward():
    """position_ids make a left-padded row give the same last-position logits as the row alone (GPT-2: absolute)."""
    from conftest import make_tiny

    model = make_tiny("gpt2")
    tok = tiny_tokenizer(chat=False)
    texts = ["hello", "how are you today a b"]
    batch = tokenize(tok, texts)
    with torch.no_grad():
        padded = model(**batch).logits[:, -1]
        alone = torch.stack([model(**tokenize(tok, [t])).logits[0, -1] for t in texts])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
