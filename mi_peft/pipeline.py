"""``mi-peft run RECIPE``: locate -> validate causally -> steer -> train -> evaluate -> report.

Every variant is scored on the same held-out prompts by one :class:`~mi_peft.scoring.Evaluator`, so
the final table compares the base model, steering adapters, sparse adapters on located and on
random components at the same budget, and LoRA baselines (all-linear and matched to the sparse
budget), column for column, with general-ability side effects and intervals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model

from . import variants as variant_plan
from ._io import write_text_atomically
from .aggregate import summarize_runs, verdicts
from .data import ContrastivePairs
from .environment import run_environment
from .evaluate.preference import preference_margin
from .finished import FinishedRows
from .locate import directions, locate, per_cost, slice_fisher
from .locate_cost_option import CostOption
from .models import load_model
from .recipe import Recipe, check_budgets, check_sizes, load_recipe, parse_layers
from .report import results_json, write_report
from .scoring import Evaluator, score_row
from .steer_rows import iti_steering, sae_steering_row, steering_sweep
from .tuners.steering import SteeringConfig
from .tuners.steering.condition import selection_rates
from .validation import recipe_metric, validate_causally


@dataclass
class Run:
    """What the stages of one recipe run share."""

    recipe: Recipe
    out: Path
    model: Any
    tokenizer: Any
    evaluator: Evaluator
    log: Callable[[str], None]
    finished: FinishedRows
    timings: dict[str, float] = field(default_factory=dict)
    condition: Any = None  # the conditional-steering condition, which `train.conditional` also gates adapters with
    _dpo_held_out: list[dict[str, Any]] | None = None

    @property
    def dpo_held_out(self) -> list[dict[str, Any]]:
        """The DPO rows training never sees, read and split once per run."""
        if self._dpo_held_out is None:
            self._dpo_held_out = variant_plan.dpo_split(self.recipe)[1] if self.recipe.dpo is not None else []
        return self._dpo_held_out


def apply_overrides(
    recipe: Recipe,
    steps: int | None = None,
    n_test: int | None = None,
    dpo_steps: int | None = None,
    pairs: int | None = None,
    seeds: int | None = None,
    budgets: Sequence[float] | None = None,
) -> Recipe:
    """Command-line overrides, checked like the recipe's own fields before any model loads."""
    train = recipe.train
    if steps is not None:
        train = replace(train, steps=steps, dpo_steps=steps if dpo_steps is None else dpo_steps)
    elif dpo_steps is not None:
        train = replace(train, dpo_steps=dpo_steps)
    if seeds is not None:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"`--seeds` must be a positive integer (training runs per variant), got {seeds!r}.")
        train = replace(train, seeds=seeds)
    if budgets is not None:
        check_budgets(list(budgets), "--budgets", "param_budgets")
        train = replace(train, param_budgets=tuple(budgets))
    recipe.train = train
    if pairs is not None:
        recipe.locate = replace(recipe.locate, pairs=pairs)
        recipe.validate = replace(recipe.validate, pairs=min(recipe.validate.pairs, pairs))
        recipe.steer = replace(recipe.steer, val_prompts=min(recipe.steer.val_prompts, pairs))
    if n_test is not None:
        recipe.evaluate = replace(recipe.evaluate, n_test=n_test)
        check_sizes(recipe)
    return recipe


def _locate(run: Run) -> tuple[Any, ContrastivePairs, ContrastivePairs]:
    recipe = run.recipe
    keys = recipe.pair_keys or {}
    all_pairs = ContrastivePairs.load(
        recipe.pairs, **{f"{k}_key": keys[k] for k in ("positive", "negative", "prompt") if k in keys}
    )
    train_pairs, val_pairs, _ = all_pairs.split(val=0.2, test=0.0, seed=recipe.seed)
    loc_pairs = train_pairs.subset(min(recipe.locate.pairs, len(train_pairs)), seed=recipe.seed)
    saved = run.finished.localization()
    if saved is not None:
        run.log(f"[1/5] locate: {run.out / 'localization'} saved by an earlier run with the same settings, read back")
        return saved, loc_pairs, val_pairs
    run.log(f"[1/5] locate: {recipe.locate.method} on {len(loc_pairs)} pairs")
    started = time.perf_counter()
    result = locate(
        run.model,
        run.tokenizer,
        loc_pairs,
        method=recipe.locate.method,
        components=recipe.locate.components,
        metric=recipe_metric(recipe, run.tokenizer, "locate"),
        positions=recipe.locate.positions,
        batch_size=recipe.locate.batch_size,
        **(recipe.locate.options or {}),
    )
    if recipe.locate.cost is not None:
        result = _per_cost(run, result)
    run.finished.put_localization(result)
    run.timings["locate"] = time.perf_counter() - started
    return result, loc_pairs, val_pairs


def _steer(run: Run, result, loc_pairs: ContrastivePairs, val_pairs: ContrastivePairs) -> tuple[dict, list[dict]]:
    """Steering directions, the alpha sweeps, and the rows of the best additive, conditional, ITI and SAE adapters."""
    recipe, model, tok, evaluator = run.recipe, run.model, run.tokenizer, run.evaluator
    run.log("[3/5] steer: directions, alpha sweep, conditional and ITI steering")
    started = time.perf_counter()
    steer_pairs = loc_pairs
    if recipe.steer_pairs is not None:  # e.g. answer prefixes: refusal vs compliance after the same prompt
        steer_pairs = ContrastivePairs.load(recipe.steer_pairs, prompt_key="prompt")
        steer_pairs = steer_pairs.subset(min(recipe.locate.pairs, len(steer_pairs)), seed=recipe.seed)
    layers = parse_layers(recipe.steer.layers)
    dirs = directions(model, tok, steer_pairs, method=recipe.steer.method, layers=layers)
    steering = steering_sweep(model, recipe, dirs, evaluator)
    configs = [
        (
            f"steering add (alpha={steering['best_alpha']:g})",
            "steering",
            SteeringConfig.from_directions(dirs, layers=steering["layers"], alpha=steering["best_alpha"]),
            "steering",
        )
    ]
    if recipe.steer.conditional:
        # The condition detects the prompt class (positive vs negative prompts of the locate pairs), which
        # may differ from the behaviour direction that is added (e.g. answer prefixes); its threshold is
        # calibrated on the validation pairs, which neither direction saw. Its layer is at most the first
        # steered layer: the decision is taken during the prompt's forward, so steering in a layer below
        # the condition layer would miss the prompt tokens.
        cond_layers = list(range(min(layers) + 1)) if layers else None
        cond_dirs = directions(model, tok, loc_pairs, method="mean_diff", layers=cond_layers, progress=False)
        condition, report = SteeringConfig.calibrate_condition(
            model, tok, val_pairs.positive, val_pairs.negative, directions=cond_dirs
        )
        # how the condition transfers to the held-out test prompts (reported only; no choice depends on it)
        steering["condition"] = report.chosen
        test_positive, test_negative = evaluator.sets["test"]
        if test_positive and test_negative:
            held_out = selection_rates(model, tok, condition, test_positive, test_negative)
            steering["condition"].update(held_out_tpr=held_out["tpr"], held_out_fpr=held_out["fpr"])
        run.condition = condition
        alpha = steering["conditional_alpha"]
        config = SteeringConfig.from_directions(dirs, layers=steering["layers"], alpha=alpha, condition=condition)
        configs.append((f"conditional steering (alpha={alpha:g})", "steering_conditional", config, "steering"))
    if recipe.steer.iti_top_k is not None:
        steering["iti"], config = iti_steering(model, tok, recipe, result, loc_pairs, evaluator)
        name = f"ITI heads (top_k={recipe.steer.iti_top_k}, alpha={steering['iti']['best_alpha']:g})"
        configs.append((name, "steering_iti", config, "iti"))
    if recipe.steer.sae is not None:  # SAE latents located on the same pairs as the diff-in-means direction
        steering["sae"], config = sae_steering_row(model, tok, recipe, steer_pairs, evaluator)
        info = steering["sae"]
        name = f"SAE latents add (layer {info['layer']}, top {len(info['latents'])}, alpha={info['best_alpha']:g})"
        configs.append((name, "steering_sae", config, "sae_steering"))
    rows = []
    for name, folder, config, adapter in configs:
        steered = get_peft_model(model, config)
        rows.append(score_row(name, steered, evaluator, run.out / "adapters" / folder, 0.0, {"adapter": adapter}))
        steered.unload()
    run.timings["steer"] = time.perf_counter() - started
    return steering, rows


def _prompt_baseline_rows(run: Run) -> list[dict[str, Any]]:
    """The base model asked under ``evaluate.prompt_baseline`` (no training): what a system message alone buys."""
    system = run.recipe.evaluate.prompt_baseline
    if system is None:
        return []
    return [
        score_row("base + system prompt", run.model, run.evaluator.prompted(system), None, 0.0, {"adapter": "prompt"})
    ]


def _held_out_margin(run: Run, model) -> float | None:
    """Mean chosen-minus-rejected log-prob on the DPO rows that training never sees."""
    rows = run.dpo_held_out
    return preference_margin(model, run.tokenizer, rows).mean if rows else None


def _train(run: Run, result) -> tuple[list[dict], dict[str, list[float]]]:
    """Every planned variant, ``train.seeds`` times: per-seed rows and the first seed's loss curves."""
    recipe = run.recipe
    plan = variant_plan.plan(recipe)
    run.log(f"[4/5] train: {len(plan)} variants x {recipe.train.seeds} seed(s), {recipe.train.steps} steps")
    started = time.perf_counter()
    runs, losses = [], {}
    for seed_index in range(recipe.train.seeds):
        seed = recipe.seed + seed_index
        for variant in plan:
            folder = variant.folder(seed)
            finished = run.finished.get(folder)
            if finished is not None:
                run.log(f"      {folder}: finished by an earlier run with the same settings, read back")
            if finished is None and variant.conditional:
                finished = _score_conditional(run, variant, folder, seed, runs)
            row, curve = finished or _train_and_score(run, result, variant, folder, seed)
            if seed_index == 0 and curve:
                losses.setdefault(variant.name, curve)
            runs.append(row)
    run.timings["train_and_eval"] = time.perf_counter() - started
    return runs, losses


def _train_and_score(run: Run, result, variant, folder: str, seed: int) -> tuple[dict, list[float]]:
    """Train one variant with one seed, score it, and keep its row for ``--resume``."""
    trained = variant_plan.train(variant, run.recipe, result, run.tokenizer, run.out / "train" / folder, seed)
    extra = {"adapter": variant.adapter, "method": variant.method, "budget": variant.budget, "seed": seed}
    if variant.method != "sft":
        extra["margin"] = _held_out_margin(run, trained.model)
    out = run.out / "adapters" / folder
    row = score_row(variant.name, trained.model, run.evaluator, out, trained.train_seconds, extra)
    run.finished.put(folder, row, trained.losses)
    return row, trained.losses


def _score_conditional(run: Run, variant, folder: str, seed: int, runs: list[dict]) -> tuple[dict, list[float]]:
    """The adapter trained for ``variant.unconditional`` with this seed, gated by the steering condition.

    Nothing is trained: the saved adapter is loaded onto a fresh base model and given the condition.
    """
    source_name = variant.unconditional.folder(seed)
    source = run.out / "adapters" / source_name
    trained = next((r for r in runs if r.get("seed") == seed and r["variant"] == variant.unconditional.name), None)
    if trained is None or not (source / "adapter_config.json").is_file():
        raise RuntimeError(f"{folder} gates the adapter of {source_name}, which this run has not saved in {source}.")
    model, _ = load_model(run.recipe.model)
    gated = PeftModel.from_pretrained(model, source, is_trainable=True)  # trainable: the row counts its parameters
    gated.set_condition(run.condition)
    extra = {"adapter": variant.adapter, "method": variant.method, "budget": variant.budget, "seed": seed}
    row = score_row(
        variant.name, gated, run.evaluator, run.out / "adapters" / folder, trained["train_seconds"],
        {**extra, "conditional": True},
    )  # fmt: skip
    run.finished.put(folder, row, [])
    return row, []


def run_recipe(
    path: str | Path,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    n_test: int | None = None,
    dpo_steps: int | None = None,
    pairs: int | None = None,
    seeds: int | None = None,
    budgets: Sequence[float] | None = None,
    settings: Sequence[str] = (),
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> dict[str, Any]:
    """Run a recipe end to end and write ``report.md``, ``results.json`` and plots to ``out_dir``.

    ``settings`` override single recipe fields (``"evaluate.piqa_n=32"``), checked before any model loads.
    With ``resume``, variants that an earlier run into the same ``out_dir`` finished under the same
    settings are read back from ``out_dir/finished`` instead of being trained again.
    """
    recipe = apply_overrides(load_recipe(path, settings), steps, n_test, dpo_steps, pairs, seeds, budgets)
    out = Path(out_dir or Path("runs") / recipe.name)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer = load_model(recipe.model)
    environment = run_environment(model, recipe.train.precision)
    run = Run(recipe, out, model, tokenizer, Evaluator(recipe, tokenizer), log, FinishedRows(out, recipe, resume))
    result, loc_pairs, val_pairs = _locate(run)
    log("[2/5] validate: ablate top components vs random ones")
    validation = validate_causally(model, tokenizer, recipe, result, val_pairs)
    steering, steer_rows = _steer(run, result, loc_pairs, val_pairs)
    base_row = score_row("base", model, run.evaluator, None, 0.0, {"adapter": "base"})
    if recipe.dpo is not None:
        base_row["margin"] = _held_out_margin(run, model)
    prompt_rows = _prompt_baseline_rows(run)
    runs, losses = _train(run, result)
    log("[5/5] report")
    run.timings["total"] = time.perf_counter() - started
    summary = [base_row, *prompt_rows, *steer_rows, *summarize_runs(runs)]
    results = {
        "recipe": recipe.to_dict(),
        "localization": {
            "method": result.method,
            "top_heads": result.top("heads", 10) if "heads" in result.scores else [],
            "top_neurons": result.top("neurons", 10) if "neurons" in result.scores else [],
        },
        "validation": validation,
        "steering": steering,
        "variants": summary,
        "verdicts": verdicts(summary),
        "runs": runs,
        "losses": losses,
        "timings": run.timings,
        "environment": environment,
    }
    text = results_json(results)  # before any file is written: a value JSON cannot hold fails with nothing half-done
    write_report(out, results, result)
    write_text_atomically(out / "results.json", text)
    return results


def _per_cost(run: Run, result: Any) -> Any:
    """``locate.cost``: the located scores per unit of what training each slice costs on generic text."""
    option = CostOption.from_raw(run.recipe.locate.cost, run.recipe.path.parent, str(run.recipe.path))
    texts = option.load_texts()
    run.log(f"      cost: slice_fisher on {len(texts)} texts of {option.texts.name}, penalty {option.penalty:g}")
    kinds = [k for k in ("heads", "neurons") if k in result.scores]
    cost = slice_fisher(
        run.model, run.tokenizer, texts, components=kinds, max_length=option.max_length,
        batch_size=run.recipe.locate.batch_size,
    )  # fmt: skip
    cost.save(run.out / "localization_cost")
    return per_cost(result, cost, penalty=option.penalty)
