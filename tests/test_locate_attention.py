"""locate(method="attention"): a head planted to read one token ranks first; eager attention is restored."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from test_locate import one_thread  # noqa: F401  (autouse fixture: tiny models run single-threaded)
from test_locate import tiny_tokenizer as word_tokenizer
from transformers import AutoModelForCausalLM

from mi_peft.data import ContrastivePairs
from mi_peft.locate import locate
from mi_peft.locate.attention import target_mask

T, U = 7, 8  # the target token and its stand-in on negative prompts
LAYER, HEAD, D_HEAD = 1, 2, 32  # the planted head


def tiny_llama(attn: str = "sdpa"):
    """Tiny random Llama (hidden 128, 4 heads of 32, 2 layers) with q/k biases, in eval mode."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        attention_bias=True,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def planted_model(attn: str = "sdpa"):
    """Head HEAD of layer LAYER attends to token T from every position.

    The embedding of T is made 50x longer, so the normed residual at T points along it. The head's query
    is a constant (bias only) and its key is the projection on that direction, both in the rotary pair with
    the lowest frequency (dims 15 and 31), which RoPE barely turns over a few positions.
    """
    model = tiny_llama(attn)
    emb = model.get_input_embeddings().weight
    attn_mod = model.model.layers[LAYER].self_attn
    rows = slice(HEAD * D_HEAD, (HEAD + 1) * D_HEAD)
    dim = HEAD * D_HEAD + D_HEAD // 2 - 1
    with torch.no_grad():
        emb[T] *= 50.0
        for proj in (attn_mod.q_proj, attn_mod.k_proj):
            proj.weight[rows] = 0.0
            proj.bias[rows] = 0.0
        attn_mod.q_proj.bias[dim] = 2.0
        attn_mod.k_proj.weight[dim] = 3.0 * emb[T] / emb[T].norm()
    return model


def prompts(n: int = 8, seed: int = 0, token: int = T) -> list[str]:
    """Random words with ``token`` somewhere in the middle (never last)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(5, 9))]
        words.insert(rng.randrange(1, len(words) - 1), f"w{token}")
        out.append(" ".join(words))
    return out


def test_the_planted_head_ranks_first_on_prompts():
    model, tok = planted_model(), word_tokenizer()
    result = locate(model, tok, prompts(), method="attention", target_tokens=["w7"], batch_size=3, progress=False)
    heads = result.scores["heads"]
    assert result.method == "attention" and heads.shape == (2, 4) and result.kinds == ["heads"]
    assert heads.flatten().argmax() == LAYER * 4 + HEAD, heads
    assert heads[LAYER, HEAD] > 0.9  # it puts almost all its attention on T
    others = heads.flatten()[torch.arange(8) != LAYER * 4 + HEAD]
    assert others.max() < 0.5 and (heads >= 0).all() and (heads <= 1 + 1e-5).all()
    assert result.extra["prompts_with_target"] == {"positive": 8} and result.extra["n_prompts"] == 8


def test_score_equals_a_direct_read_of_the_attention_pattern():
    """Left padding, batching and the eager switch do not change the score: compare with one prompt at a time."""
    model, tok = planted_model(attn="eager"), word_tokenizer()
    texts = prompts(5, seed=3)
    result = locate(model, tok, texts, method="attention", target_tokens="w7", batch_size=5, progress=False)
    expected = torch.zeros(2, 4)
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions
        where = ids[0] == T
        expected += torch.stack([a[0, :, -1, where].sum(-1) for a in attentions])
    torch.testing.assert_close(result.scores["heads"], expected / len(texts), rtol=1e-4, atol=1e-5)


def test_pairs_score_positive_minus_negative_and_positions_all():
    model, tok = planted_model(), word_tokenizer()
    pairs = ContrastivePairs(prompts(6, seed=1), prompts(6, seed=1, token=U))
    result = locate(model, tok, pairs, method="attention", target_tokens=["w7"], chat=False, progress=False)
    heads = result.scores["heads"]
    assert heads.flatten().argmax() == LAYER * 4 + HEAD
    pos, neg = (torch.tensor(result.extra["attention"][side]) for side in ("positive", "negative"))
    torch.testing.assert_close(heads, pos - neg)
    assert (neg == 0).all() and result.extra["prompts_with_target"] == {"positive": 6, "negative": 0}
    every = locate(model, tok, pairs, method="attention", target_tokens=["w7"], positions="all", progress=False)
    assert every.scores["heads"].flatten().argmax() == LAYER * 4 + HEAD
    assert every.scores["heads"][LAYER, HEAD] < heads[LAYER, HEAD]  # tokens before T cannot attend to it


def test_target_mask_matches_token_sequences_and_skips_padding():
    ids = torch.tensor([[7, 7, 5, 7, 8, 9, 7], [0, 0, 7, 8, 3, 7, 8]])
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    got = target_mask(ids, mask, [[7, 8], [9]])
    assert got.int().tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 1, 1]]
    ids[1, 1] = 7  # padding holding a target id is never a target
    assert target_mask(ids, mask, [[7]]).int().tolist()[1] == [0, 0, 1, 0, 0, 1, 0]


def test_attention_implementation_is_restored_even_on_error():
    model, tok = planted_model(attn="sdpa"), word_tokenizer()
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda *_: seen.append(model.config._attn_implementation))
    locate(model, tok, prompts(2), method="attention", target_tokens=["w7"], progress=False)
    handle.remove()
    assert seen and set(seen) == {"eager"} and model.config._attn_implementation == "sdpa"

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        locate(model, tok, prompts(2), method="attention", target_tokens=["w7"], progress=False)
    handle.remove()
    assert model.config._attn_implementation == "sdpa" and model.model.config._attn_implementation == "sdpa"
    assert not model.training


def test_errors_name_the_problem_and_the_fix():
    model, tok = tiny_llama(), word_tokenizer()
    texts = prompts(3)
    with pytest.raises(ValueError, match=r"target tokens \['w50', 'w51 w52'\].*must occur in the prompt"):
        locate(
            model, tok, [t.replace("w50", "w10") for t in texts], method="attention", target_tokens=["w50", "w51 w52"]
        )
    with pytest.raises(ValueError, match="`target_tokens` is empty"):
        locate(model, tok, texts, method="attention", target_tokens=[])
    with pytest.raises(ValueError, match="needs `target_tokens="):
        locate(model, tok, texts, method="attention")
    with pytest.raises(ValueError, match=r"heads only; pass components=\('heads',\)"):
        locate(model, tok, texts, method="attention", target_tokens=["w7"], components=("neurons",))
    with pytest.raises(ValueError, match=r"`positions` must be one of \('last', 'all'\)"):
        locate(model, tok, texts, method="attention", target_tokens=["w7"], positions="mean")
    with pytest.raises(ValueError, match=r"unknown options \['max_batch'\]"):
        locate(model, tok, texts, method="attention", target_tokens=["w7"], max_batch=4)
    with pytest.raises(ValueError, match="`prompts` is empty"):
        locate(model, tok, [], method="attention", target_tokens=["w7"])
    with pytest.raises(ValueError, match="list of prompts is accepted by method='attention' only"):
        locate(model, tok, texts, method="mean_diff")
    with pytest.raises(ValueError, match=r"unknown method 'attn'.*'attention'"):
        locate(model, tok, texts, method="attn")
    assert model.config._attn_implementation == "sdpa"
