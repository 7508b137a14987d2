"""slice_fisher (what training a slice costs on generic text) and per_cost (gain per unit of that cost)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from test_locate import one_thread, tiny_tokenizer  # noqa: F401  (one_thread: autouse fixture)
from test_weight_gradient import completion_pairs, realistic_llama

from mi_peft.arch import spec_for
from mi_peft.data import tokenize
from mi_peft.locate import LocalizationResult, locate, per_cost, slice_fisher

TEXTS = [" ".join(f"w{(7 * i + 3 * j) % 80 + 10}" for j in range(4 + 3 * i)) for i in range(5)]


def fisher_by_autograd(model, tokenizer, texts) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(mean over texts of ||d log p(text) / d W_c||^2), one text at a time with plain backward."""
    spec = spec_for(model)
    outs = [spec.attn_out_module(model, layer).weight for layer in range(spec.n_layers)]
    downs = [spec.mlp_out_module(model, layer).weight for layer in range(spec.n_layers)]
    heads = torch.zeros(spec.n_layers, spec.n_heads)
    neurons = torch.zeros(spec.n_layers, spec.n_neurons)
    for text in texts:
        ids = tokenize(tokenizer, [text])["input_ids"]
        for w in outs + downs:
            w.requires_grad_(True)
            w.grad = None
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).sum()
        logp.backward()
        for layer in range(spec.n_layers):
            per_head = outs[layer].grad.unflatten(1, (spec.n_heads, spec.head_dim))  # [D, H, e]
            heads[layer] += per_head.square().sum((0, 2))
            neurons[layer] += downs[layer].grad.square().sum(0)
    for w in outs + downs:
        w.requires_grad_(False)
        w.grad = None
    return (heads / len(texts)).sqrt(), (neurons / len(texts)).sqrt()


def test_slice_fisher_equals_per_text_autograd_gradients_with_padding():
    """Batches of 2 pad the shorter texts; every text still counts as if scored alone. d_model 128, 256 neurons."""
    model, tok = realistic_llama(), tiny_tokenizer()
    flags = [p.requires_grad for p in model.parameters()]
    cost = slice_fisher(model, tok, TEXTS, batch_size=2, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training  # left as it came
    assert all(p.grad is None for p in model.parameters())
    heads, neurons = fisher_by_autograd(model, tok, TEXTS)
    assert cost.method == "slice_fisher" and cost.extra["n_texts"] == len(TEXTS)
    assert torch.allclose(cost.scores["heads"], heads, rtol=1e-4, atol=1e-7)
    assert torch.allclose(cost.scores["neurons"], neurons, rtol=1e-4, atol=1e-7)
    assert (neurons > 0).all()


def test_per_cost_divides_by_the_relative_cost():
    model, tok = realistic_llama(), tiny_tokenizer()
    gain = locate(
        model, tok, completion_pairs(6), method="weight_gradient", metric="logprob", chat=False, progress=False
    )
    cost = slice_fisher(model, tok, TEXTS, progress=False)
    ranked = per_cost(gain, cost, penalty=2.0)
    for kind in ("heads", "neurons"):
        c = cost.scores[kind]
        assert torch.allclose(ranked.scores[kind], gain.scores[kind] / (1 + 2.0 * c / c.median()), rtol=1e-6)
    assert ranked.extra["cost"] == {"method": "slice_fisher", "data_hash": cost.data_hash, "penalty": 2.0}
    assert torch.equal(per_cost(gain, cost, penalty=0).scores["neurons"], gain.scores["neurons"])
    # a component that costs more than the median loses rank against one that costs less
    top = [where for where, _ in ranked.top("neurons", k=20)]
    assert top != [where for where, _ in gain.top("neurons", k=20)]


def test_per_cost_bad_inputs_name_the_problem():
    model, tok = realistic_llama(), tiny_tokenizer()
    gain = locate(
        model, tok, completion_pairs(4), method="weight_gradient", metric="logprob", chat=False, progress=False
    )
    neurons_only = slice_fisher(model, tok, TEXTS, components=("neurons",), progress=False)
    with pytest.raises(ValueError, match=r"per_cost divides head and neuron scores.*\['heads'\]"):
        per_cost(gain, neurons_only)
    with pytest.raises(ValueError, match=r"`penalty` must be a finite number >= 0"):
        per_cost(gain, neurons_only, penalty=float("inf"))
    other = make_tiny("llama", seed=1)
    with pytest.raises(ValueError, match="scored on another model"):
        per_cost(gain, slice_fisher(other, tok, TEXTS, progress=False))
    with pytest.raises(ValueError, match="slice_fisher scores the trainable slices"):
        slice_fisher(model, tok, TEXTS, components=("residual",))
    with pytest.raises(ValueError, match="texts"):
        slice_fisher(model, tok, [])


def test_saved_result_keeps_the_cost_record(tmp_path):
    model, tok = realistic_llama(), tiny_tokenizer()
    gain = locate(
        model, tok, completion_pairs(4), method="weight_gradient", metric="logprob", chat=False, progress=False
    )
    ranked = per_cost(gain, slice_fisher(model, tok, TEXTS, progress=False))
    ranked.save(tmp_path / "loc")
    back = LocalizationResult.load(tmp_path / "loc", model=model)
    assert back.extra["cost"]["penalty"] == 1.0 and torch.equal(back.scores["neurons"], ranked.scores["neurons"])
