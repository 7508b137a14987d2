"""Zero-training rows of a recipe run: residual steering and ITI head steering, each at the alpha that
does best on the validation items.

Both adapters are swept over their strengths on the validation split of the :class:`Evaluator` (the
rows after the first ``n_test``), so the test items never choose an alpha. Residual steering adds one
direction per layer to the residual stream (ActAdd/CAA style); ITI (Li et al. 2023) adds a direction to
the output of each of the ``steer.iti_top_k`` heads whose linear probes separate the pairs best, in units
of each head's activation spread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from peft import PeftConfig, get_peft_model

from .data import ContrastivePairs
from .recipe import Recipe, parse_layers
from .scoring import Evaluator
from .tuners.steering import SteeringConfig, head_directions


def sweep_alphas(
    model, alphas: Sequence[float], make_config: Callable[[float], PeftConfig], evaluator: Evaluator
) -> list[dict[str, float]]:
    """Target and side rate on the validation items for each alpha (the adapter is removed after each)."""
    sweep = []
    for alpha in alphas:
        steered = get_peft_model(model, make_config(float(alpha)))
        sweep.append(
            {"alpha": float(alpha), "target": evaluator.target(steered, "val"), "side": evaluator.side(steered, "val")}
        )
        steered.unload()
    return sweep


def best_alpha(sweep: list[dict[str, float]]) -> float:
    """The alpha with the highest target minus side rate (side counts 0 where there is none); ties: smaller."""
    best = max(sweep, key=lambda r: (r["target"] - (0 if math.isnan(r["side"]) else r["side"]), -r["alpha"]))
    return best["alpha"]


def steering_sweep(model, recipe: Recipe, dirs, evaluator: Evaluator) -> dict:
    """Alpha sweep of additive steering on validation prompts; pick the best alpha (target - side)."""
    layers = parse_layers(recipe.steer.layers)
    sweep = sweep_alphas(
        model, recipe.steer.alphas, lambda a: SteeringConfig.from_directions(dirs, layers=layers, alpha=a), evaluator
    )
    # With a condition the side effect is the condition's job, so conditional steering takes the alpha
    # with the highest target rate on validation.
    strongest = max(sweep, key=lambda r: (r["target"], -abs(r["alpha"])))
    return {"layers": layers, "sweep": sweep, "best_alpha": best_alpha(sweep), "conditional_alpha": strongest["alpha"]}


def iti_steering(
    model, tokenizer, recipe: Recipe, result: Any, pairs: ContrastivePairs, evaluator: Evaluator
) -> tuple[dict[str, Any], SteeringConfig]:
    """ITI on the top ``steer.iti_top_k`` heads of a ``probe`` localization, mass-mean directions from
    ``pairs`` (the locate pairs, so validation and test items stay unseen); the alpha comes from
    ``steer.iti_alphas`` by :func:`best_alpha` on the validation items. Returns the sweep and the config."""
    steer = recipe.steer
    dirs = head_directions(model, tokenizer, pairs, batch_size=recipe.locate.batch_size, progress=False)

    def config(alpha: float) -> SteeringConfig:
        return SteeringConfig.from_head_probes(result, dirs, top_k=steer.iti_top_k, alpha=alpha)

    sweep = sweep_alphas(model, steer.iti_alphas, config, evaluator)
    alpha = best_alpha(sweep)
    chosen = config(alpha)
    heads = sorted([int(layer), int(head)] for layer, hs in chosen.head_directions.items() for head in hs)
    info = {"top_k": steer.iti_top_k, "heads": heads, "sweep": sweep, "best_alpha": alpha}
    return info, chosen


def sae_steering_row(
    model, tokenizer, recipe: Recipe, pairs: ContrastivePairs, evaluator: Evaluator
) -> tuple[dict[str, Any], PeftConfig]:
    """Steering by the top SAE latents of ``pairs`` (``steer.sae``), swept and picked like residual steering."""
    from .sae.recipe_row import SAESteerOptions, sae_steering

    options = SAESteerOptions.from_raw(recipe.steer.sae, str(recipe.path))
    return sae_steering(
        model,
        tokenizer,
        options,
        pairs,
        sweep=lambda make_config, alphas: sweep_alphas(model, alphas, make_config, evaluator),
        pick=best_alpha,
        base=recipe.path.parent,
    )
