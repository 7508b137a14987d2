"""``mi-peft run RECIPE``: locate -> validate causally -> steer -> train -> evaluate -> report.

Every variant is evaluated on the same held-out prompts, so the final table compares the base
model, the best steering adapter, sparse adapters on located and on random components at the
same budget, and a LoRA baseline, column for column.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from .capture import ablate
from .data import ContrastivePairs, read_rows, read_texts
from .evaluate import ab_accuracy, kl_to_base, language_rate, refusal_rate, target_rate
from .evaluate.generation import generate
from .locate import directions, locate
from .metrics import get_metric, metric_name
from .models import load_model
from .recipe import Recipe, check_sizes, load_recipe, parse_layers
from .report import write_report
from .train import dpo, sft
from .tuners.sparse import SparseConfig
from .tuners.steering import SteeringConfig


def _metric_mean(model, tokenizer, pairs: ContrastivePairs, metric, batch_size: int) -> float:
    """Mean metric on the positive side (the behaviour-present prompts)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for pos, _ in pairs.batches(tokenizer, batch_size=batch_size):
            scores = metric(model(**pos).logits, pos)
            total, n = total + float(scores.sum()), n + scores.numel()
    return total / max(n, 1)


def _metric(recipe: Recipe, tokenizer, section: str):
    """The metric of ``locate`` or ``validate`` (validate falls back to the locate metric)."""
    loc, val = recipe.locate, recipe.validate
    if section == "validate" and val.metric is not None:
        return get_metric(val.metric, tokenizer, **(val.metric_args or {}))
    if loc.metric is None:
        if section == "locate":
            return None
        raise ValueError(f"{recipe.path}: `locate.metric` is null, so set `validate.metric` for causal validation.")
    return get_metric(loc.metric, tokenizer, **(loc.metric_args or {}))


def validate_causally(model, tokenizer, recipe: Recipe, result, val: ContrastivePairs) -> dict[str, Any]:
    """Ablate the top-k located heads+neurons vs a random set of the same size; compare the metric."""
    metric = _metric(recipe, tokenizer, "validate")
    pairs = val.subset(min(recipe.validate.pairs, len(val)), seed=recipe.seed)
    k = recipe.validate.top_k
    kinds = tuple(kind for kind in ("heads", "neurons") if kind in result.scores)
    top = result.select(top_k=k, kinds=kinds)
    rand = result.select(top_k=k, kinds=kinds, random=recipe.seed)
    clean = _metric_mean(model, tokenizer, pairs, metric, recipe.locate.batch_size)
    out = {"k": k, "metric": metric_name(metric), "clean": clean}
    for name, comps in (("top", top), ("random", rand)):
        with ablate(model, heads=comps.heads or None, neurons=comps.neurons or None):
            out[name] = _metric_mean(model, tokenizer, pairs, metric, recipe.locate.batch_size)
        out[f"{name}_components"] = comps.to_dict()
    out["top_effect"], out["random_effect"] = out["top"] - clean, out["random"] - clean
    return out


def _target_strings(recipe: Recipe) -> list[str]:
    if recipe.targets is not None:
        return [str(t) for t in json.loads(recipe.targets.read_text())]
    target = recipe.evaluate.target
    return [target] if isinstance(target, str) else list(target or [])


class Evaluator:
    """Measures the recipe's target behaviour and side effects on fixed held-out prompts.

    The first ``n_test`` rows of each test file are the test set; the next ``steer.val_prompts`` rows
    are the validation set that picks the steering alpha, so no choice is made on test items.
    """

    def __init__(self, recipe: Recipe, tokenizer):
        ev = recipe.evaluate
        self.recipe, self.tokenizer, self.ev = recipe, tokenizer, ev
        n, v = ev.n_test, recipe.steer.val_prompts
        if ev.behaviour == "ab":
            rows = read_rows(recipe.test_positive)
            self.sets = {"test": (rows[:n], []), "val": (rows[n : n + v], [])}
        else:
            pos = read_texts(recipe.test_positive)
            neg = read_texts(recipe.test_negative) if recipe.test_negative is not None else []
            self.sets = {"test": (pos[:n], neg[:n]), "val": (pos[n : n + v], neg[n : n + v])}
        self.targets = _target_strings(recipe)
        neutral_source = recipe.neutral or (
            None if ev.behaviour == "ab" else recipe.test_negative or recipe.test_positive
        )
        self.neutral = read_texts(neutral_source)[: ev.n_neutral] if neutral_source is not None else []

    def _rate(self, model, prompts: list[str]) -> float:
        ev, tok = self.ev, self.tokenizer
        if not prompts:
            return float("nan")
        if ev.behaviour == "refusal":
            return refusal_rate(model, tok, prompts, max_new_tokens=ev.max_new_tokens).rate
        if ev.behaviour == "language":
            return language_rate(model, tok, prompts, language=ev.language, max_new_tokens=ev.max_new_tokens).rate
        generations = generate(model, tok, prompts, max_new_tokens=ev.max_new_tokens)
        return target_rate(generations, targets=self.targets).rate

    def target(self, model, split: str = "test") -> float:
        """Rate of the wanted behaviour (refusal of harmful prompts, French replies, non-sycophantic choice)."""
        positive, _ = self.sets[split]
        if self.ev.behaviour == "ab":
            return 1.0 - ab_accuracy(model, self.tokenizer, positive).accuracy if positive else float("nan")
        return self._rate(model, positive)

    def side(self, model, split: str = "test") -> float:
        """Rate of the same behaviour where it is unwanted (e.g. over-refusal of harmless prompts)."""
        return self._rate(model, self.sets[split][1])

    def kl(self, model) -> float:
        """Mean KL to the base model on neutral prompts (0 for the base itself, NaN without neutral prompts)."""
        if not self.neutral:
            return float("nan")
        if not isinstance(model, PeftModel):
            return 0.0
        return kl_to_base(model, self.tokenizer, self.neutral)


def _adapter_bytes(folder: Path) -> int:
    path = folder / "adapter_model.safetensors"
    return path.stat().st_size if path.is_file() else 0


def _row(name: str, model, evaluator: Evaluator, out: Path | None, seconds: float, extra: dict | None = None) -> dict:
    trainable, total = model.get_nb_trainable_parameters() if isinstance(model, PeftModel) else (0, None)
    if total is None:
        total = sum(p.numel() for p in model.parameters())
    if out is not None and isinstance(model, PeftModel):
        model.save_pretrained(out)
    row = {
        "variant": name,
        "trainable_params": int(trainable),
        "trainable_pct": 100.0 * trainable / total,
        "adapter_bytes": _adapter_bytes(out) if out is not None else 0,
        "target": evaluator.target(model),
        "side": evaluator.side(model),
        "kl_to_base": evaluator.kl(model),
        "train_seconds": seconds,
    }
    return {**row, **(extra or {})}


def steering_sweep(model, recipe: Recipe, dirs, evaluator: Evaluator) -> dict:
    """Alpha sweep of additive steering on validation prompts; pick the best alpha (target - side)."""
    layers = parse_layers(recipe.steer.layers)
    sweep = []
    for alpha in recipe.steer.alphas:
        steered = get_peft_model(model, SteeringConfig.from_directions(dirs, layers=layers, alpha=float(alpha)))
        sweep.append(
            {
                "alpha": float(alpha),
                "target": evaluator.target(steered, "val"),
                "side": evaluator.side(steered, "val"),
            }
        )
        steered.unload()
    best = max(sweep, key=lambda r: (r["target"] - (0 if math.isnan(r["side"]) else r["side"]), -r["alpha"]))
    # With a condition the side effect is the condition's job, so conditional steering takes the alpha
    # with the highest target rate on validation.
    strongest = max(sweep, key=lambda r: (r["target"], -abs(r["alpha"])))
    return {"layers": layers, "sweep": sweep, "best_alpha": best["alpha"], "conditional_alpha": strongest["alpha"]}


def _fresh(recipe: Recipe):
    model, _ = load_model(recipe.model)
    return model


def run_recipe(
    path: str | Path,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    n_test: int | None = None,
    dpo_steps: int | None = None,
    pairs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a recipe end to end and write ``report.md``, ``results.json`` and plots to ``out_dir``."""
    recipe = load_recipe(path)
    if steps is not None:
        recipe.train = replace(recipe.train, steps=steps, dpo_steps=steps if dpo_steps is None else dpo_steps)
    elif dpo_steps is not None:
        recipe.train = replace(recipe.train, dpo_steps=dpo_steps)
    if pairs is not None:
        recipe.locate = replace(recipe.locate, pairs=pairs)
        recipe.validate = replace(recipe.validate, pairs=min(recipe.validate.pairs, pairs))
        recipe.steer = replace(recipe.steer, val_prompts=min(recipe.steer.val_prompts, pairs))
    if n_test is not None:
        recipe.evaluate = replace(recipe.evaluate, n_test=n_test)
        check_sizes(recipe)
    out = Path(out_dir or Path("runs") / recipe.name)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model, tokenizer = load_model(recipe.model)
    evaluator = Evaluator(recipe, tokenizer)
    keys = recipe.pair_keys or {}
    all_pairs = ContrastivePairs.load(
        recipe.pairs,
        **{f"{k}_key": keys[k] for k in ("positive", "negative", "prompt") if k in keys},
    )
    train_pairs, val_pairs, _ = all_pairs.split(val=0.2, test=0.0, seed=recipe.seed)
    loc_pairs = train_pairs.subset(min(recipe.locate.pairs, len(train_pairs)), seed=recipe.seed)

    log(f"[1/5] locate: {recipe.locate.method} on {len(loc_pairs)} pairs")
    t = time.perf_counter()
    result = locate(
        model,
        tokenizer,
        loc_pairs,
        method=recipe.locate.method,
        components=recipe.locate.components,
        metric=_metric(recipe, tokenizer, "locate"),
        positions=recipe.locate.positions,
        batch_size=recipe.locate.batch_size,
    )
    result.save(out / "localization")
    timings["locate"] = time.perf_counter() - t

    log("[2/5] validate: ablate top components vs random ones")
    validation = validate_causally(model, tokenizer, recipe, result, val_pairs)

    log("[3/5] steer: directions, alpha sweep, conditional steering")
    t = time.perf_counter()
    steer_pairs = loc_pairs
    if recipe.steer_pairs is not None:  # e.g. answer prefixes: refusal vs compliance after the same prompt
        steer_pairs = ContrastivePairs.load(recipe.steer_pairs, prompt_key="prompt")
        steer_pairs = steer_pairs.subset(min(recipe.locate.pairs, len(steer_pairs)), seed=recipe.seed)
    layers = parse_layers(recipe.steer.layers)
    dirs = directions(model, tokenizer, steer_pairs, method=recipe.steer.method, layers=layers)
    steering = steering_sweep(model, recipe, dirs, evaluator)
    rows = [_row("base", model, evaluator, None, 0.0)]
    best = SteeringConfig.from_directions(dirs, layers=steering["layers"], alpha=steering["best_alpha"])
    steered = get_peft_model(model, best)
    rows.append(
        _row(f"steering add (alpha={steering['best_alpha']:g})", steered, evaluator, out / "adapters" / "steering", 0.0)
    )
    steered.unload()
    if recipe.steer.conditional:
        # The condition detects the prompt class (positive vs negative prompts of the locate pairs), which
        # may differ from the behaviour direction that is added (e.g. answer prefixes); its threshold is
        # calibrated on the validation pairs, which neither direction saw. Its layer is at most the first
        # steered layer: the decision is taken during the prompt's forward, so steering in a layer below
        # the condition layer would miss the prompt tokens.
        cond_layers = list(range(min(layers) + 1)) if layers else None
        cond_dirs = directions(model, tokenizer, loc_pairs, method="mean_diff", layers=cond_layers, progress=False)
        condition, report = SteeringConfig.calibrate_condition(
            model, tokenizer, val_pairs.positive, val_pairs.negative, directions=cond_dirs
        )
        steering["condition"] = report.chosen
        cond_cfg = SteeringConfig.from_directions(
            dirs, layers=steering["layers"], alpha=steering["conditional_alpha"], condition=condition
        )
        steered = get_peft_model(model, cond_cfg)
        rows.append(
            _row(
                f"conditional steering (alpha={steering['conditional_alpha']:g})",
                steered,
                evaluator,
                out / "adapters" / "steering_conditional",
                0.0,
            )
        )
        steered.unload()
    timings["steer"] = time.perf_counter() - t

    log(f"[4/5] train: sparse located / sparse random / LoRA r={recipe.train.lora_r}, {recipe.train.steps} steps")
    t = time.perf_counter()
    tr = recipe.train
    common = dict(max_steps=tr.steps, batch_size=tr.batch_size, max_length=tr.max_length, seed=recipe.seed)
    select = dict(param_budget=tr.param_budget, kinds=tr.kinds, head_mode=tr.head_mode, neuron_mode=tr.neuron_mode)
    variants = [
        ("sparse located", SparseConfig.from_localization(result, **select), tr.lr),
        ("sparse random", SparseConfig.from_localization(result, random=recipe.seed, **select), tr.lr),
        (
            f"LoRA r={tr.lora_r}",
            LoraConfig(r=tr.lora_r, lora_alpha=2 * tr.lora_r, target_modules="all-linear"),
            tr.lora_lr,
        ),
    ]
    losses: dict[str, list[float]] = {}
    data = recipe.sft if recipe.sft is not None else None
    for name, config, lr in variants if data is not None else []:
        slug = name.split()[0] + "_" + name.split()[1].replace("r=", "r")
        run = sft(_fresh(recipe), tokenizer, data, config, output_dir=out / "train" / slug, learning_rate=lr, **common)
        losses[name] = run.losses
        rows.append(_row(name, run.model, evaluator, out / "adapters" / slug, run.train_seconds))
    if recipe.dpo is not None:
        dpo_steps = tr.dpo_steps or tr.steps
        config = SparseConfig.from_localization(result, **select)
        run = dpo(
            _fresh(recipe),
            tokenizer,
            recipe.dpo,
            config,
            output_dir=out / "train" / "dpo",
            learning_rate=tr.lr,
            **{**common, "max_steps": dpo_steps},
        )
        losses["sparse located DPO"] = run.losses
        rows.append(
            _row("sparse located DPO", run.model, evaluator, out / "adapters" / "sparse_dpo", run.train_seconds)
        )
    timings["train_and_eval"] = time.perf_counter() - t

    log("[5/5] report")
    timings["total"] = time.perf_counter() - started
    results = {
        "recipe": recipe.to_dict(),
        "localization": {
            "method": result.method,
            "top_heads": result.top("heads", 10) if "heads" in result.scores else [],
            "top_neurons": result.top("neurons", 10) if "neurons" in result.scores else [],
        },
        "validation": validation,
        "steering": steering,
        "variants": rows,
        "losses": losses,
        "timings": timings,
    }
    write_report(out, results, result)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2, default=str, allow_nan=False))
    return results


def _json_safe(value: Any) -> Any:
    """NaN (a metric that does not apply, e.g. no side prompts) becomes JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
