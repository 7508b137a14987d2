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


def test_layers_keep_the_lora_to_those_layers():
    model = make_tiny("llama")
    spread = matched_lora(model, 300)  # rank 1 fills projections of both layers
    assert {".0." in name for name in spread.config.target_modules} == {True, False}
    kept = matched_lora(model, 300, layer_order=[0, 1], layers=[1])
    assert kept.layers == (1,) and all(".1." in name for name in kept.config.target_modules)
    assert abs(kept.n_params / 300 - 1) <= 0.1
    for bad, message in (([2], "layer index 2 is out of range: this model has layers 0..1"), ([], "is empty")):
        with pytest.raises(ValueError, match=message):
            matched_lora(model, 300, layers=bad)


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


def test_recipe_layers_restrict_every_budgeted_variant(tmp_path):
    """`train.layers` reaches the located, random and matched LoRA variants: all train those layers only."""
    import torch

    from mi_peft.locate import LocalizationResult
    from mi_peft.recipe import Recipe, TrainSection
    from mi_peft.variants import Variant, peft_config

    model = make_tiny("llama")
    gen = torch.Generator().manual_seed(0)
    scores = {"heads": torch.randn(2, 4, generator=gen), "neurons": torch.randn(2, 48, generator=gen)}
    scores["neurons"][0] += 10.0  # without the restriction layer 0 would take the whole budget
    result = LocalizationResult.from_model(model, scores, method="test")
    recipe = Recipe(name="t", path=tmp_path, pairs=tmp_path, test_positive=tmp_path)
    recipe.train = TrainSection(param_budget=400, layers="1")
    for adapter, seed in (("located", 0), ("random", 0), ("random", 1)):
        config = peft_config(Variant(adapter), recipe, result, model, seed)
        assert set(config.heads) | set(config.neurons) == {1}, adapter
        assert config.num_parameters(result.spec) <= 400
    matched = peft_config(Variant("lora_matched"), recipe, result, model, 0)
    assert matched.target_modules and all(".1." in name for name in matched.target_modules)
    recipe.train = TrainSection(param_budget=400)
    located = peft_config(Variant("located"), recipe, result, model, 0)
    assert set(located.neurons) == {0}
