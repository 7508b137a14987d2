import pytest
import torch
from conftest import make_tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mi_peft.data import format_prompts, tokenize
from mi_peft.lens import LensResult, logit_lens

WORDS = ["user", "assistant", "Paris", "the", "capital", "of", "France", "is", "a", "cat", "dog"]


def word_tokenizer(vocab_size: int = 96, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer whose ids fit a tiny model's vocabulary."""
    names = ["<pad>", "<eos>", "<unk>", *WORDS]
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


PROMPTS = ["the capital of France is", "a cat w5 w9 w17 is", "dog"]


def model_logits(model, tok, prompts, chat=False):
    batch = tokenize(tok, format_prompts(tok, prompts, chat=chat))
    with torch.no_grad():
        return model(**batch).logits[:, -1]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "gemma2", "qwen3", "phi3", "olmo2"])
def test_last_layer_matches_model_logits(model_type):
    model = make_tiny(model_type)
    tok = word_tokenizer()
    lens = logit_lens(model, tok, PROMPTS, targets=["Paris", " dog"], k=5)
    logits = model_logits(model, tok, PROMPTS)
    assert isinstance(lens, LensResult) and lens.top_ids.shape == (3, 2, 5)
    assert torch.equal(lens.top_ids[:, -1], logits.topk(5).indices)  # softcapping (gemma2) keeps the order
    if model_type != "gemma2":
        assert torch.allclose(lens.top_probs[:, -1], logits.softmax(-1).topk(5).values, atol=1e-6)
    tid = tok.convert_tokens_to_ids("Paris")
    assert lens.target_ids == [tid, tok.convert_tokens_to_ids("dog")]
    expected_rank = (logits > logits[:, tid : tid + 1]).sum(-1)
    assert torch.equal(lens.target_ranks[:, -1, 0], expected_rank)
    top1 = lens.top_ids[:, :, 0] == tid
    assert torch.equal(top1, lens.target_ranks[:, :, 0] == 0)


def test_table_and_plot(tmp_path):
    model = make_tiny("llama")
    tok = word_tokenizer()
    lens = logit_lens(model, tok, PROMPTS, targets=["Paris"], k=3, plot=tmp_path / "lens.png")
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = lens.table()
    assert len(rows) == 3 * 2
    row = rows[1]
    assert (row["prompt"], row["layer"]) == (0, 1) and len(row["top_tokens"]) == 3
    assert row["top_tokens"][0] == tok.decode([int(lens.top_ids[0, 1, 0])])
    assert row["p[Paris]"] == pytest.approx(float(lens.target_probs[0, 1, 0]))
    assert row["rank[Paris]"] == int(lens.target_ranks[0, 1, 0])
    no_targets = logit_lens(model, tok, "the cat", k=2)
    assert no_targets.targets == [] and no_targets.target_probs.shape == (1, 2, 0)
    assert no_targets.plot(tmp_path / "top1.png").exists()
    many = logit_lens(model, tok, PROMPTS * 2, targets=["Paris"])
    assert many.plot(tmp_path / "band.png").exists()


def test_chat_formatting():
    model = make_tiny("llama")
    template = "{% for m in messages %}user {{ m['content'] }} {% endfor %}assistant"
    tok = word_tokenizer(chat_template=template)
    chat = logit_lens(model, tok, ["the cat"], targets=["Paris"])
    manual = logit_lens(model, tok, ["user the cat assistant"], targets=["Paris"], chat=False)
    plain = logit_lens(model, tok, ["the cat"], targets=["Paris"], chat=False)
    assert torch.equal(chat.top_ids, manual.top_ids) and torch.equal(chat.target_probs, manual.target_probs)
    assert not torch.equal(chat.target_probs, plain.target_probs)


def test_errors(tmp_path):
    model = make_tiny("llama")
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="`prompts` is empty"):
        logit_lens(model, tok, [])
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        logit_lens(model, tok, "the cat", k=0)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        logit_lens(model, tok, "the cat", k=1000)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        logit_lens(model, tok, "the cat", targets=[""])
    with pytest.raises(ValueError, match="ending in .png"):
        logit_lens(model, tok, "the cat", plot=tmp_path / "lens.jpg")
    with pytest.raises(ValueError, match="no chat template"):
        logit_lens(model, tok, "the cat", chat=True)


@pytest.mark.slow
def test_embedded_paris(embedded):
    model, tok = embedded
    lens = logit_lens(model, tok, "The capital of France is", targets=[" Paris"], chat=False)
    assert lens.target_ranks[0, -1, 0] == 0 and lens.top_tokens[0][-1][0] == " Paris"
    assert lens.target_probs[0, -1, 0] > 0.5
    assert (lens.target_ranks[0, :10, 0] > 0).all()  # early layers do not predict it yet
