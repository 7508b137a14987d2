"""weight_gradient: the norm of the metric's gradient with respect to each component's trainable slice."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny
from test_locate import one_thread, tiny_tokenizer  # noqa: F401  (one_thread: autouse fixture)
from transformers import AutoModelForCausalLM, LlamaConfig

from mi_peft.arch import spec_for
from mi_peft.data import ContrastivePairs
from mi_peft.locate import locate
from mi_peft.metrics import completion_logprob


def completion_pairs(n: int = 6, seed: int = 0) -> ContrastivePairs:
    """Shared prompts of different lengths, each with two different completions."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " " + " ".join(f"w{rng.randrange(10, 90)}" for _ in range(rng.randrange(lo, hi)))

    prompts = [words(2, 6) for _ in range(n)]
    return ContrastivePairs.from_completions(prompts, [words(1, 4) for _ in range(n)], [words(1, 4) for _ in range(n)])


def slice_grads_by_autograd(model, tokenizer, pairs, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over examples of d logprob / d W for every attention-out and MLP-out weight, by plain backward."""
    spec = spec_for(model)
    outs = [spec.attn_out_module(model, layer) for layer in range(spec.n_layers)]
    downs = [spec.mlp_out_module(model, layer) for layer in range(spec.n_layers)]
    weights = [m.weight for m in outs + downs]
    model.zero_grad(set_to_none=True)
    for w in weights:
        w.requires_grad_(True)
    metric, n = completion_logprob(), 0
    for batch in pairs.batches(tokenizer, batch_size=4, chat=False):
        b = batch[side]
        logits = model(**{k: v for k, v in b.items() if k != "completion_mask"}).logits
        metric(logits, b).sum().backward()
        n += b["input_ids"].shape[0]
    grads = [_as_out_in(m, w.grad) / n for m, w in zip(outs + downs, weights, strict=True)]
    for w in weights:
        w.requires_grad_(False)
        w.grad = None
    return torch.stack(grads[: spec.n_layers]), torch.stack(grads[spec.n_layers :])


def _as_out_in(module, grad: torch.Tensor) -> torch.Tensor:
    """``[d_out, d_in]`` whatever the layout (GPT-2's Conv1D stores ``[d_in, d_out]``)."""
    return grad.T if type(module).__name__ == "Conv1D" else grad


def norms(attn: torch.Tensor, mlp: torch.Tensor, spec, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head (its ``d_head`` input columns of the attention output) and per neuron (its MLP-out column)."""
    heads = attn.unflatten(-1, (spec.n_heads, spec.head_dim))  # [L, D, H, e]
    if norm == "l1":
        return heads.abs().sum((1, 3)), mlp.abs().sum(1)
    return heads.square().sum((1, 3)).sqrt(), mlp.square().sum(1).sqrt()


def test_scores_equal_the_norms_of_autograd_weight_gradients(tiny_model):
    tok, pairs = tiny_tokenizer(), completion_pairs()
    spec = spec_for(tiny_model)
    result = locate(tiny_model, tok, pairs, method="weight_gradient", metric="logprob", batch_size=4, chat=False)
    pos, neg = slice_grads_by_autograd(tiny_model, tok, pairs, 0), slice_grads_by_autograd(tiny_model, tok, pairs, 1)
    heads, neurons = norms(pos[0] - neg[0], pos[1] - neg[1], spec, "l1")
    assert set(result.scores) == {"heads", "neurons"} and result.extra["positions"] == "all"
    assert torch.allclose(result.scores["heads"], heads, rtol=1e-4, atol=1e-6)
    assert torch.allclose(result.scores["neurons"], neurons, rtol=1e-4, atol=1e-6)
    assert (neurons > 0).any() and (heads > 0).any()


def realistic_llama():
    """A random Llama with d_model 128, 256 neurons per layer, 2 layers of 2 heads of 64."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_positive_side_alone_with_l2_norm_at_realistic_size():
    """``negative_weight=0`` is the SFT loss gradient on the positive completions; d_model 128, 256 neurons."""
    model = realistic_llama()
    tok, pairs = tiny_tokenizer(), completion_pairs(8, seed=1)
    result = locate(
        model, tok, pairs, method="weight_gradient", metric="logprob", components=("neurons",), batch_size=4,
        chat=False, negative_weight=0, norm="l2",
    )  # fmt: skip
    attn, mlp = slice_grads_by_autograd(model, tok, pairs, 0)
    _, expected = norms(attn, mlp, spec_for(model), "l2")
    assert set(result.scores) == {"neurons"}
    assert torch.allclose(result.scores["neurons"], expected, rtol=1e-4, atol=1e-7)
    (layer, index), _ = result.top("neurons", k=1)[0]
    assert float(expected[layer, index]) == pytest.approx(float(expected.max()), rel=1e-5)
    assert "metric_negative" not in result.extra


def test_model_is_left_as_it_came():
    model, tok = make_tiny("qwen2"), tiny_tokenizer()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    locate(model, tok, completion_pairs(4), method="weight_gradient", metric="logprob", chat=False, progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_bad_inputs_name_the_problem_and_the_fix():
    model, tok, pairs = make_tiny("llama"), tiny_tokenizer(), completion_pairs(4)
    with pytest.raises(ValueError, match=r"residual.*have none.*components="):
        locate(model, tok, pairs, method="weight_gradient", metric="logprob", components=("neurons", "residual"))
    with pytest.raises(ValueError, match=r"`norm` must be one of \('l1', 'l2'\)"):
        locate(model, tok, pairs, method="weight_gradient", metric="logprob", norm="max", chat=False)
    with pytest.raises(ValueError, match=r"`negative_weight` must be a number >= 0"):
        locate(model, tok, pairs, method="weight_gradient", metric="logprob", negative_weight=-1, chat=False)
    with pytest.raises(ValueError, match=r"every weight gradient is zero.*positions='all'"):
        locate(model, tok, pairs, method="weight_gradient", metric="logprob", positions="last", chat=False)
