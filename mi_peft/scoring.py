"""One row per variant: the recipe's behaviour and every side effect, on the same held-out prompts.

Every variant of a run (base, steering, each trained adapter) is scored by one :class:`Evaluator`,
so the report compares column for column: the target behaviour and its unwanted twin (each rate
with its sample size, for Wilson intervals), KL to the base model on neutral prompts, general
ability (PIQA, BLiMP, WikiText-2 perplexity) and generation health on generic instructions.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from peft import PeftModel

from .data import read_rows, read_texts
from .evaluate import ab_accuracy, kl_to_base, language_rate, mc_accuracy, mc_items, refusal_rate, target_rate
from .evaluate.general import general_ability
from .evaluate.generation import generate
from .evaluate.health import generation_health
from .precision import autocast
from .recipe import Recipe
from .recipe_checks import ROW_BEHAVIOURS
from .stats import wilson_interval


def _target_strings(recipe: Recipe) -> list[str]:
    if recipe.targets is not None:
        return [str(t) for t in json.loads(recipe.targets.read_text())]
    target = recipe.evaluate.target
    return [target] if isinstance(target, str) else list(target or [])


class Evaluator:
    """Measures the recipe's target behaviour and side effects on fixed held-out prompts.

    The first ``n_test`` rows of each test file are the test set; the next ``steer.val_prompts`` rows
    are the validation set that picks the steering alpha, so no choice is made on test items.
    ``system`` (set by :meth:`prompted`) is a system message every generation is asked under.
    """

    system: str | None = None

    def __init__(self, recipe: Recipe, tokenizer):
        ev = recipe.evaluate
        self.recipe, self.tokenizer, self.ev = recipe, tokenizer, ev
        n, v = ev.n_test, recipe.steer.val_prompts
        if ev.behaviour in ROW_BEHAVIOURS:
            rows = read_rows(recipe.test_positive)
            self.sets = {"test": (rows[:n], []), "val": (rows[n : n + v], [])}
            if ev.behaviour == "mc":  # parsed once here, not once per scored variant
                self.mc = {split: mc_items(pos) for split, (pos, _) in self.sets.items() if pos}
        else:
            pos = read_texts(recipe.test_positive)
            neg = read_texts(recipe.test_negative) if recipe.test_negative is not None else []
            self.sets = {"test": (pos[:n], neg[:n]), "val": (pos[n : n + v], neg[n : n + v])}
        self.targets = _target_strings(recipe)
        neutral_source = recipe.neutral or (
            None if ev.behaviour in ROW_BEHAVIOURS else recipe.test_negative or recipe.test_positive
        )
        self.neutral = read_texts(neutral_source)[: ev.n_neutral] if neutral_source is not None else []

    def prompted(self, system: str) -> Evaluator:
        """The same evaluator with every reply generated under the system message ``system``.

        Scores a zero-training prompting baseline on the same held-out prompts. Only generated replies can be
        asked under a system message: KL and the log-likelihood columns (PIQA, BLiMP, perplexity) are left out.
        """
        if self.ev.behaviour in ROW_BEHAVIOURS:
            raise ValueError(f"`evaluate.behaviour: {self.ev.behaviour}` scores log-likelihoods, not replies.")
        view = copy.copy(self)
        view.system = system
        return view

    def _rate(self, model, prompts: list[str]) -> float:
        ev, tok, system = self.ev, self.tokenizer, self.system
        if not prompts:
            return float("nan")
        if ev.behaviour == "refusal":
            return refusal_rate(model, tok, prompts, max_new_tokens=ev.max_new_tokens, system=system).rate
        if ev.behaviour == "language":
            return language_rate(
                model, tok, prompts, ev.language, ev.max_new_tokens, min_votes=ev.language_min_votes, system=system
            ).rate
        generations = generate(model, tok, prompts, max_new_tokens=ev.max_new_tokens, system=system)
        return target_rate(generations, targets=self.targets, min_hits=ev.target_min_hits).rate

    def n(self, split: str = "test") -> tuple[int, int]:
        """Number of target and side prompts of ``split``."""
        positive, negative = self.sets[split]
        return len(positive), len(negative)

    def target(self, model, split: str = "test") -> float:
        """Rate of the wanted behaviour (refusal of harmful prompts, French replies, unsycophantic or right choice)."""
        positive, _ = self.sets[split]
        if self.ev.behaviour == "ab":
            if not positive:
                return float("nan")
            return 1.0 - ab_accuracy(model, self.tokenizer, positive, both_orders=self.ev.ab_both_orders).accuracy
        if self.ev.behaviour == "mc":
            return mc_accuracy(model, self.tokenizer, *self.mc[split]).accuracy if positive else float("nan")
        return self._rate(model, positive)

    def side(self, model, split: str = "test") -> float:
        """Rate of the same behaviour where it is unwanted (e.g. over-refusal of harmless prompts)."""
        return self._rate(model, self.sets[split][1])

    def kl(self, model) -> float:
        """Mean KL to the base model on neutral prompts (0 for the base itself, NaN without neutral prompts or
        under a system message, whose effect on next-token distributions is not a weight change)."""
        if not self.neutral or self.system is not None:
            return float("nan")
        if not isinstance(model, PeftModel):
            return 0.0
        return kl_to_base(model, self.tokenizer, self.neutral)

    def general(self, model) -> dict[str, float]:
        """PIQA and BLiMP accuracy, WikiText-2 perplexity and generation health (empty if switched off)."""
        ev = self.ev
        if not ev.general:
            return {}
        health = generation_health(
            model, self.tokenizer, n_prompts=ev.health_prompts, max_new_tokens=ev.health_tokens, system=self.system
        )
        health_columns = {
            "degenerate": health.degenerate_rate,
            "duplicates": health.duplicate_rate,
            "distinct_2": health.distinct_2,
            "openings": health.shared_opening_rate,
            "health_n": health.n,
        }
        if self.system is not None:
            return health_columns
        ability = general_ability(model, self.tokenizer, piqa_n=ev.piqa_n, blimp_n=ev.blimp_n, ppl_n_texts=ev.ppl_texts)
        return {
            "piqa": ability.piqa.accuracy,
            "piqa_n": ability.piqa.n,
            "blimp": ability.blimp.accuracy,
            "blimp_n": ability.blimp.n,
            "perplexity": ability.perplexity,
            **health_columns,
        }


def adapter_bytes(folder: Path) -> int:
    path = folder / "adapter_model.safetensors"
    return path.stat().st_size if path.is_file() else 0


def score_row(
    name: str, model, evaluator: Evaluator, out: Path | None, seconds: float, extra: dict | None = None
) -> dict[str, Any]:
    """Save the adapter (if any) to ``out`` and score ``model`` on every column of the report."""
    trainable, total = model.get_nb_trainable_parameters() if isinstance(model, PeftModel) else (0, None)
    if total is None:
        total = sum(p.numel() for p in model.parameters())
    if out is not None and isinstance(model, PeftModel):
        model.save_pretrained(out)
    n_target, n_side = evaluator.n()
    with autocast(evaluator.ev.precision):
        row = {
            "variant": name,
            "trainable_params": int(trainable),
            "trainable_pct": 100.0 * trainable / total,
            "adapter_bytes": adapter_bytes(out) if out is not None else 0,
            "target": evaluator.target(model),
            "target_n": n_target,
            "side": evaluator.side(model),
            "side_n": n_side,
            "kl_to_base": evaluator.kl(model),
            **evaluator.general(model),
            "train_seconds": seconds,
        }
    for key in ("target", "side"):
        if not is_missing(row[key]) and row[f"{key}_n"]:
            n = row[f"{key}_n"]
            row[f"{key}_low"], row[f"{key}_high"] = wilson_interval(round(row[key] * n), n)
    return {**row, **(extra or {})}


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
