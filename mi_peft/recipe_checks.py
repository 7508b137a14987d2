"""Recipe validation: every field, cross-field rule and data file column, checked before any model loads.

Kept apart from :mod:`mi_peft.recipe` (the fields and the YAML parsing) so each module has one job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data_files import read_rows
from .locate_cost_option import CostOption
from .precision import check_precision

if TYPE_CHECKING:
    from .recipe import Recipe

BEHAVIOURS = ("refusal", "language", "ab", "target", "mc")
# behaviours scored on log-likelihoods of the fixed answers of `data.test_positive` rows (A/B items,
# multiple choice), not on generated replies
ROW_BEHAVIOURS = ("ab", "mc")


def parse_layers(value: str | int | Sequence[int] | None) -> list[int] | None:
    """``"8-19"`` -> 8..19, ``"3,5,7"`` -> [3, 5, 7]; YAML numbers ``5`` or ``[3, 5]`` as they are; ``None`` -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        raise ValueError(f"cannot parse layers {value!r}; a list must hold layer numbers, e.g. [3, 5, 7].")
    if not isinstance(value, str):
        raise ValueError(f"cannot parse layers {value!r}; use e.g. '8-19', '3,5,7' or 5.")
    layers: list[int] = []
    for part in value.split(","):
        start, _, stop = part.partition("-")
        try:
            layers.extend(range(int(start), int(stop) + 1) if stop else [int(start)])
        except ValueError as err:
            raise ValueError(f"cannot parse layers {value!r}; use e.g. '8-19' or '3,5,7'.") from err
    return layers


def check_recipe(recipe: Recipe, source: Path) -> None:
    """Every cross-field rule of a parsed recipe, and the columns of its files; raises naming field and fix."""
    ev, tr = recipe.evaluate, recipe.train
    for where, value in (("train.precision", tr.precision), ("evaluate.precision", ev.precision)):
        check_precision(value, f"{source}: {where}")
    _check_behaviour(recipe, source)
    _check_validate_and_iti(recipe, source)
    if recipe.steer.sae is not None:
        from .sae.recipe_row import SAESteerOptions

        SAESteerOptions.from_raw(recipe.steer.sae, str(source))
    if recipe.steer_pairs is not None:
        first = _first_row(recipe.steer_pairs)
        if not {"prompt", "positive", "negative"} <= set(first):
            raise ValueError(
                f"{source}: `data.steer_pairs` rows need keys prompt, positive, negative (a prompt and two "
                f"completions); {recipe.steer_pairs.name} has {sorted(first)}."
            )
    if recipe.pair_keys is not None and not recipe.pairs.is_file():
        raise ValueError(f"{source}: `data.pair_keys` names columns of a file, but `data.pairs` is a folder.")
    if recipe.steer.method not in ("mean_diff", "pca", "probe"):
        raise ValueError(f"{source}: `steer.method` must be mean_diff, pca or probe, got {recipe.steer.method!r}.")
    if recipe.sft is None and recipe.dpo is None:
        raise ValueError(f"{source}: give `data.sft` and/or `data.dpo` training data.")
    check_budgets([tr.param_budget], source, "train.param_budget")
    if tr.param_budgets is not None:
        check_budgets(tr.param_budgets, source, "train.param_budgets")
    if tr.dpo_args is not None and not isinstance(tr.dpo_args, dict):
        raise ValueError(f"{source}: `train.dpo_args` must be a mapping of trl.DPOConfig fields, got {tr.dpo_args!r}.")
    if tr.conditional and not (recipe.steer.conditional and recipe.sft is not None):
        raise ValueError(
            f"{source}: `train.conditional` gates the SFT adapters with the conditional-steering condition; it needs "
            "`steer.conditional: true` and `data.sft`."
        )
    if not isinstance(tr.seeds, int) or isinstance(tr.seeds, bool) or tr.seeds < 1:
        raise ValueError(f"{source}: `train.seeds` must be a positive integer (runs per variant), got {tr.seeds!r}.")
    counts = ("n_test", "piqa_n", "blimp_n", "ppl_texts", "health_prompts", "health_tokens", "dpo_held_out")
    named = {"train.steps": tr.steps, "locate.pairs": recipe.locate.pairs}
    for name, value in {**named, **{f"evaluate.{key}": getattr(ev, key) for key in counts}}.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: `{name}` must be a positive integer, got {value!r}.")
    unknown = sorted(set(recipe.locate.components) - {"heads", "neurons", "residual"})
    if unknown:
        raise ValueError(f"{source}: `locate.components` has unknown kind(s) {unknown}; use heads, neurons, residual.")
    if recipe.locate.options is not None and not isinstance(recipe.locate.options, dict):
        raise ValueError(
            f"{source}: `locate.options` must be a mapping of the method's options (e.g. {{norm: l2}}), "
            f"got {recipe.locate.options!r}."
        )
    _check_locate_method(recipe, source)
    if recipe.locate.cost is not None:
        CostOption.from_raw(recipe.locate.cost, recipe.path.parent, str(source))
        if not {"heads", "neurons"} & set(recipe.locate.components):
            raise ValueError(f"{source}: `locate.cost` divides head and neuron scores; locate heads or neurons too.")
    for where, layers in (("steer.layers", recipe.steer.layers), ("train.layers", recipe.train.layers)):
        try:
            parse_layers(layers)
        except ValueError as err:
            raise ValueError(f"{source}: `{where}`: {err}") from err
    _check_columns(recipe, source)
    check_sizes(recipe)


def _check_locate_method(recipe: Recipe, source: Path) -> None:
    """``locate.method`` exists and scores every kind in ``locate.components`` (checked before a model loads)."""
    from .locate.api import scored_kinds

    method = recipe.locate.method
    try:
        kinds = scored_kinds(method)
    except ValueError as err:
        raise ValueError(f"{source}: `locate.method`: {err}") from err
    extra = [k for k in recipe.locate.components if k not in kinds]
    if extra:
        raise ValueError(
            f"{source}: `locate.method: {method}` scores {', '.join(kinds)} only, not {', '.join(extra)}: "
            f"set `locate.components: [{', '.join(k for k in recipe.locate.components if k in kinds) or kinds[0]}]`."
        )


def _check_prompt_baseline(ev: Any, source: Path) -> None:
    """``evaluate.prompt_baseline`` is a system message, and the behaviour is judged on generated replies."""
    text = ev.prompt_baseline
    if text is None:
        return
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"{source}: `evaluate.prompt_baseline` must be a non-empty string (the system message of the "
            f"prompting row) or null, got {text!r}."
        )
    if ev.behaviour in ROW_BEHAVIOURS:
        raise ValueError(
            f"{source}: `evaluate.prompt_baseline` asks for replies under a system message, but `evaluate.behaviour: "
            f"{ev.behaviour}` scores log-likelihoods of fixed answers; remove `evaluate.prompt_baseline`."
        )


def _check_behaviour(recipe: Recipe, source: Path) -> None:
    """The behaviour named in ``evaluate`` has what it needs (a language, targets, A/B rows)."""
    ev = recipe.evaluate
    if ev.behaviour not in BEHAVIOURS:
        raise ValueError(f"{source}: `evaluate.behaviour` must be one of {BEHAVIOURS}, got {ev.behaviour!r}.")
    if ev.behaviour == "language" and not ev.language:
        raise ValueError(f"{source}: `evaluate.behaviour: language` needs `evaluate.language` (e.g. fr).")
    votes = ev.language_min_votes
    if isinstance(votes, bool) or not isinstance(votes, int | float) or not votes > 0:
        raise ValueError(f"{source}: `evaluate.language_min_votes` must be a positive number, got {votes!r}.")
    if not isinstance(ev.ab_both_orders, bool):
        raise ValueError(f"{source}: `evaluate.ab_both_orders` must be true or false, got {ev.ab_both_orders!r}.")
    hits = ev.target_min_hits
    if isinstance(hits, bool) or not isinstance(hits, int) or hits < 1:
        raise ValueError(f"{source}: `evaluate.target_min_hits` must be a positive integer, got {hits!r}.")
    _check_prompt_baseline(ev, source)
    if ev.behaviour == "target" and not (ev.target or recipe.targets):
        raise ValueError(
            f"{source}: `evaluate.behaviour: target` needs `evaluate.target` (a string or a list of strings) "
            "or `data.targets` (a JSON list of strings)."
        )
    if ev.behaviour == "mc":
        _check_mc(recipe, source)
    if ev.behaviour == "ab":
        keys = {"question", "answer_matching_behavior", "answer_not_matching_behavior"}
        rows = read_rows(recipe.test_positive)
        first = rows[0] if rows else None
        if not isinstance(first, dict) or not keys <= set(first):
            found = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise ValueError(
                f"{source}: `evaluate.behaviour: ab` needs A/B rows in `data.test_positive` with keys {sorted(keys)}; "
                f"the first row of {recipe.test_positive.name} is {found}."
            )


def _check_mc(recipe: Recipe, source: Path) -> None:
    """``behaviour: mc`` scores rows of ``data.test_positive`` and has no side prompts."""
    from .evaluate.mc import MC_KEYS, mc_items

    if recipe.test_negative is not None:
        raise ValueError(
            f"{source}: `evaluate.behaviour: mc` has no side prompts, so `data.test_negative` would be ignored; "
            "remove it."
        )
    try:
        mc_items(read_rows(recipe.test_positive), where=recipe.test_positive.name)
    except ValueError as err:
        raise ValueError(
            f"{source}: `evaluate.behaviour: mc` needs rows with keys {list(MC_KEYS)} in `data.test_positive`: {err}"
        ) from None


def _check_validate_and_iti(recipe: Recipe, source: Path) -> None:
    """``validate.top_k`` (0 skips causal validation) and the ITI steering options."""
    top_k, steer = recipe.validate.top_k, recipe.steer
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{source}: `validate.top_k` must be an integer >= 0 (0 skips validation), got {top_k!r}.")
    if steer.iti_top_k is None:
        return
    k = steer.iti_top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{source}: `steer.iti_top_k` must be a positive integer or null (no ITI), got {k!r}.")
    if recipe.locate.method != "probe" or "heads" not in recipe.locate.components:
        raise ValueError(
            f"{source}: `steer.iti_top_k` steers the heads that probes rank best, so it needs `locate.method: "
            f"probe` with `heads` in `locate.components` (got {recipe.locate.method!r}, "
            f"{list(recipe.locate.components)}); set those or `steer.iti_top_k: null`."
        )
    alphas = steer.iti_alphas
    ok = isinstance(alphas, tuple) and alphas and all(is_finite_number(a) for a in alphas)
    if not ok:
        raise ValueError(f"{source}: `steer.iti_alphas` must be a non-empty list of numbers, got {alphas!r}.")


def is_finite_number(value: Any) -> bool:
    """A finite int or float, not a bool: what numeric recipe fields accept."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_budgets(budgets: Any, source: Path | str, name: str) -> None:
    """Each budget is a fraction of the model's parameters (0 < b < 1) or a count (an integer >= 1)."""
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, (list, tuple)) or not budgets:
        raise ValueError(f"{source}: `{name}` must be a non-empty list of budgets, e.g. [0.0003, 0.0013].")
    for budget in budgets:
        ok = isinstance(budget, (int, float)) and not isinstance(budget, bool) and math.isfinite(budget)
        if not ok or budget <= 0 or (budget >= 1 and float(budget) != int(budget)):
            raise ValueError(
                f"{source}: `{name}` has {budget!r}; a budget is a fraction of the parameters (0 < b < 1, e.g. "
                "0.0013 = 0.13%) or a whole parameter count (>= 1)."
            )
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"{source}: `{name}` lists a budget twice: {list(budgets)}.")


def check_sizes(recipe: Recipe) -> None:
    """The test files must hold ``n_test`` test items plus at least 2 validation items for the alpha sweep."""
    ev, source = recipe.evaluate, recipe.path
    files = [recipe.test_positive] + ([recipe.test_negative] if recipe.test_negative is not None else [])
    for path in files:
        rows = len(read_rows(path))
        if rows < ev.n_test + 2:
            raise ValueError(
                f"{source}: {path.name} has {rows} rows but `evaluate.n_test` is {ev.n_test}; the alpha sweep "
                f"validates on the rows after the first n_test, so lower n_test to at most {rows - 2}."
            )


def _check_columns(recipe: Recipe, source: Path) -> None:
    """Read the first row of each training file and check its columns."""
    from .train import DPO_FORMAT, SFT_FORMATS

    for key, formats in (("sft", SFT_FORMATS), ("dpo", (DPO_FORMAT,))):
        path = getattr(recipe, key)
        if path is None:
            continue
        first = _first_row(path)
        if not any(set(cols) <= set(first) for cols in formats):
            wanted = " or ".join("+".join(c) for c in formats)
            raise ValueError(f"{source}: `data.{key}` ({path.name}) needs columns {wanted}; it has {sorted(first)}.")


def _first_row(path: Path) -> dict[str, Any]:
    rows = read_rows(path)
    row = rows[0] if rows else None
    if not isinstance(row, dict):
        raise ValueError(f"{path} is empty or not a list of objects.")
    return row
