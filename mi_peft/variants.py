"""The trained variants of a recipe run: what each one trains, at which budget, with which seed.

Located and random sparse adapters and the LoRA baselines are planned here as data, so the budget
sweep and the seeds are loops over one list instead of special cases in the pipeline. Across seeds
the training order and the random-component draw change; the located selection never does, since
it is a property of the model and the locate data, not of the training run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftConfig
from torch import nn

from .baselines import matched_lora
from .models import load_model
from .recipe import Recipe, parse_layers
from .train import TrainResult, dpo, load_data, sft
from .tuners.sparse import SparseConfig

ADAPTERS = ("located", "random", "lora", "lora_matched")


@dataclass(frozen=True)
class Variant:
    """One trained variant: an adapter choice, a training method and a parameter budget."""

    adapter: str  # located | random | lora | lora_matched
    method: str = "sft"  # sft | dpo | sft+dpo
    budget: float | None = None  # None: the recipe's `train.param_budget` (LoRA r=N ignores it)
    lora_r: int = 8
    conditional: bool = False  # the trained adapter of the same variant, gated by the steering condition

    @property
    def name(self) -> str:
        base = {
            "located": "sparse located",
            "random": "sparse random",
            "lora": f"LoRA r={self.lora_r}",
            "lora_matched": "LoRA matched",
        }[self.adapter]
        name = base + {"sft": "", "dpo": " DPO", "sft+dpo": " SFT->DPO"}[self.method]
        return name + (", conditional" if self.conditional else "")

    @property
    def slug(self) -> str:
        budget = "" if self.budget is None else f"_b{self.budget:g}"
        return f"{self.adapter}_{self.method.replace('+', '_')}{budget}" + ("_cond" if self.conditional else "")

    def folder(self, seed: int) -> str:
        """The run's folder name for this variant trained with ``seed`` (adapters, finished rows)."""
        return f"{self.slug}_s{seed}"

    @property
    def unconditional(self) -> Variant:
        """The variant whose trained adapter a conditional variant gates."""
        return replace(self, conditional=False)


def plan(recipe: Recipe) -> list[Variant]:
    """Every variant the recipe asks for, in report order."""
    tr = recipe.train
    budgets = list(tr.param_budgets) if tr.param_budgets else [tr.param_budget]
    variants: list[Variant] = []
    if recipe.sft is not None:
        for budget in budgets:
            variants += [Variant("located", budget=budget), Variant("random", budget=budget)]
            if tr.conditional:
                variants += [Variant(a, budget=budget, conditional=True) for a in ("located", "random")]
            if tr.matched_lora:
                variants.append(Variant("lora_matched", budget=budget))
        if tr.lora_baseline:
            variants.append(Variant("lora", lora_r=tr.lora_r))
    if recipe.dpo is not None:
        variants.append(Variant("located", "dpo", tr.param_budget))
        if tr.dpo_from_sft and recipe.sft is not None:
            variants.append(Variant("located", "sft+dpo", tr.param_budget))
    return variants


def _sparse(recipe: Recipe, result: Any, budget: float, random: int | None) -> SparseConfig:
    tr = recipe.train
    return SparseConfig.from_localization(
        result,
        param_budget=budget,
        kinds=tr.kinds,
        head_mode=tr.head_mode,
        neuron_mode=tr.neuron_mode,
        random=random,
        layers=_train_layers(recipe),
    )


def _train_layers(recipe: Recipe) -> list[int] | None:
    """The layers `train.layers` allows (None: all)."""
    return parse_layers(recipe.train.layers)


def peft_config(variant: Variant, recipe: Recipe, result: Any, model: nn.Module, seed: int) -> PeftConfig:
    """The adapter config of ``variant`` for training seed ``seed``."""
    tr = recipe.train
    budget = tr.param_budget if variant.budget is None else variant.budget
    if variant.adapter == "located":
        return _sparse(recipe, result, budget, random=None)
    if variant.adapter == "random":
        return _sparse(recipe, result, budget, random=seed)
    if variant.adapter == "lora":
        return LoraConfig(r=tr.lora_r, lora_alpha=2 * tr.lora_r, lora_dropout=0.0, target_modules="all-linear")
    located = _sparse(recipe, result, budget, random=None)
    n_params = located.num_parameters(result.spec)
    layers = sorted({*located.heads, *located.neurons}, key=lambda layer: -_n_selected(located, layer))
    return matched_lora(model, n_params, layer_order=layers, layers=_train_layers(recipe)).config


def _n_selected(config: SparseConfig, layer: int) -> int:
    return len(config.heads.get(layer, ())) + len(config.neurons.get(layer, ()))


def learning_rate(variant: Variant, recipe: Recipe) -> float:
    """LoRA's learning rate for LoRA variants (`matched_lora_lr` for the matched one when set), the sparse
    one (or `dpo_lr` for DPO) otherwise."""
    tr = recipe.train
    if variant.adapter == "lora_matched" and tr.matched_lora_lr is not None:
        return tr.matched_lora_lr
    if variant.adapter in ("lora", "lora_matched"):
        return tr.lora_lr
    if variant.method == "dpo":
        return tr.dpo_lr or tr.lr
    return tr.lr


def dpo_split(recipe: Recipe) -> tuple[Any, list[dict[str, Any]]]:
    """DPO training rows and ``evaluate.dpo_held_out`` held-out rows (drawn with the recipe's seed, not the run's)."""
    data, held_out = load_data(recipe.dpo), recipe.evaluate.dpo_held_out
    if len(data) < 2 * held_out:
        raise ValueError(
            f"{recipe.path}: {recipe.dpo.name} has {len(data)} rows; holding out `evaluate.dpo_held_out`="
            f"{held_out} for the margin needs at least twice as many. Lower `evaluate.dpo_held_out`."
        )
    split = data.train_test_split(test_size=held_out, seed=recipe.seed)
    return split["train"], list(split["test"])


def train(variant: Variant, recipe: Recipe, result: Any, tokenizer: Any, output_dir: Path, seed: int) -> TrainResult:
    """Train ``variant`` from a fresh copy of the recipe's model with training seed ``seed``."""
    tr = recipe.train
    model, _ = load_model(recipe.model)
    config = peft_config(variant, recipe, result, model, seed)
    common = dict(batch_size=tr.batch_size, max_length=tr.max_length, seed=seed, precision=tr.precision)
    dpo_args = dict(max_steps=tr.dpo_steps or tr.steps, beta=tr.dpo_beta, **common, **(tr.dpo_args or {}))
    dpo_rows = dpo_split(recipe)[0] if variant.method != "sft" else None
    if variant.method == "dpo":
        return dpo(
            model,
            tokenizer,
            dpo_rows,
            config,
            output_dir=output_dir,
            learning_rate=learning_rate(variant, recipe),
            **dpo_args,
        )
    first = sft(
        model,
        tokenizer,
        recipe.sft,
        config,
        output_dir=output_dir,
        max_steps=tr.steps,
        learning_rate=learning_rate(variant, recipe),
        **common,
    )
    if variant.method == "sft":
        return first
    # SFT -> DPO: the same slices keep training, against a frozen copy of the SFT adapter as reference
    second = dpo(
        first.model,
        tokenizer,
        dpo_rows,
        None,
        output_dir=output_dir / "dpo",
        learning_rate=tr.dpo_lr or tr.lr,
        **dpo_args,
    )
    second.train_seconds += first.train_seconds
    second.log_history = first.log_history + second.log_history
    return second
