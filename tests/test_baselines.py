"""Matched-budget LoRA: the trainable count PEFT reports is within 10% of the sparse budget."""

import pytest
from conftest import make_tiny
from peft import get_peft_model

from mi_peft.baselines import matched_lora


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "phi3"])
@pytest.mark.parametrize("n_params", [300, 1000, 3000])
def test_peft_counts_what_was_promised(model_type, n_params):
    model = make_tiny(model_type)
    matched = matched_lora(model, n_params)
    peft_model = get_peft_model(model, matched.config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == matched.n_params
    assert abs(trainable / n_params - 1) <= 0.1


def test_layer_order_puts_the_located_layers_first():
    model = make_tiny("llama")
    matched = matched_lora(model, 144, layer_order=[1])  # both output projections of layer 1: 64 + 80
    assert matched.layers == (1,) and all(".1." in name for name in matched.config.target_modules)
    assert matched.rank == 1


def test_lowest_rank_that_fits_is_chosen():
    matched = matched_lora(make_tiny("llama"), 3000)  # rank 10 over all four projections; rank 11 would not fit
    assert matched.rank == 10 and len(matched.config.target_modules) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_params": 0}, "positive parameter count"),
        ({"n_params": 80}, r"no LoRA .* matches 80 parameters within 10%"),
        ({"n_params": 500, "projections": ("qkv",)}, "must name 'attn_out' and/or 'mlp_out'"),
    ],
)
def test_bad_budgets_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        matched_lora(make_tiny("llama"), **kwargs)
