"""From per-seed rows to the numbers a report states: means, spreads, Wilson intervals, verdicts.

A rate's interval pools every seed's prompts (``successes / (n x seeds)``), so it is the interval of
the evaluation sample; the standard deviation across seeds shows the training noise beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .scoring import is_missing
from .stats import combination_interval, intervals_overlap, mean_std, wilson_interval

RATES = ("target", "side")
AVERAGED = (
    "target",
    "side",
    "kl_to_base",
    "piqa",
    "blimp",
    "perplexity",
    "degenerate",
    "duplicates",
    "distinct_2",
    "openings",
    "train_seconds",
    "trainable_params",
    "trainable_pct",
    "adapter_bytes",
    "margin",
)


def _successes(row: dict[str, Any], key: str) -> int:
    """Judged items that met ``key`` in ``row``: its rate times its item count (rates are exact fractions)."""
    return round(row[key] * row[f"{key}_n"])


def _pooled_interval(rows: Sequence[dict[str, Any]], key: str) -> tuple[float, float] | None:
    counted = [r for r in rows if not is_missing(r.get(key)) and r.get(f"{key}_n")]
    if not counted:
        return None
    successes = sum(_successes(r, key) for r in counted)
    return wilson_interval(successes, sum(int(r[f"{key}_n"]) for r in counted))


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row for several seeds of one variant: means, ``*_std`` across seeds, pooled ``*_low``/``*_high``."""
    out = dict(rows[0])
    for key in AVERAGED:
        values = [r[key] for r in rows if key in r and not is_missing(r[key])]
        if values and any(key not in r for r in rows):
            out.pop(key, None)  # rows scored before this column existed: a mean over some seeds would mislead
        elif values:
            out[key], out[f"{key}_std"] = mean_std([float(v) for v in values])
    for key in RATES:
        interval = _pooled_interval(rows, key)
        if interval is not None:
            out[f"{key}_low"], out[f"{key}_high"] = interval
            out[f"{key}_n"] = sum(int(r[f"{key}_n"]) for r in rows)
    out["seeds"] = len(rows)
    out.pop("seed", None)
    return out


def summarize_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-seed rows by ``(variant, budget)`` in first-seen order and summarize each group."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in runs:
        groups.setdefault((row["variant"], row.get("budget")), []).append(row)
    return [summarize(rows) for rows in groups.values()]


def _find(
    rows: Sequence[dict[str, Any]], adapter: str, method: str, budget: Any, conditional: bool = False
) -> dict[str, Any] | None:
    for row in rows:
        same = row.get("adapter") == adapter and row.get("method") == method and row.get("budget") == budget
        if same and bool(row.get("conditional", False)) == conditional:
            return row
    return None


def _interval(row: dict[str, Any], key: str) -> tuple[float, float] | None:
    if f"{key}_low" not in row:
        return None
    return row[f"{key}_low"], row[f"{key}_high"]


def _counted(row: dict[str, Any], key: str) -> bool:
    return bool(row.get(f"{key}_n")) and not is_missing(row.get(key))


def _combination(terms: Sequence[tuple[dict[str, Any], str, float]]) -> tuple[float, float] | None:
    """95% MOVER interval of ``sum(weight * row[key])`` from the pooled counts (``None`` without counts)."""
    if not all(_counted(row, key) for row, key, _ in terms):
        return None
    _, low, high = combination_interval([(_successes(row, key), int(row[f"{key}_n"]), w) for row, key, w in terms])
    return low, high


def _difference(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[float, float] | None:
    """95% Newcombe interval of ``a[key] - b[key]`` from the pooled counts (``None`` without counts)."""
    return _combination([(a, key, 1.0), (b, key, -1.0)])


def _net(row: dict[str, Any]) -> float:
    """Target minus side (side counts 0 where the recipe has none)."""
    return row["target"] - (0.0 if is_missing(row.get("side")) else row["side"])


def _net_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float] | None:
    """95% interval of ``_net(a) - _net(b)``: the four rates' MOVER interval (target only where neither has a side)."""
    if not _counted(a, "side") and not _counted(b, "side"):
        return _difference(a, b, "target")
    return _combination([(a, "target", 1.0), (a, "side", -1.0), (b, "target", -1.0), (b, "side", 1.0)])


def _versus_random(located: dict[str, Any], random: dict[str, Any]) -> dict[str, Any]:
    a, b = _interval(located, "target"), _interval(random, "target")
    return {
        "random_target": random["target"],
        "target_gain_over_random": located["target"] - random["target"],
        "target_gain_interval": _difference(located, random, "target"),
        "side_change_over_random": (
            None
            if is_missing(located.get("side")) or is_missing(random.get("side"))
            else located["side"] - random["side"]
        ),
        "side_change_interval": _difference(located, random, "side"),
        "separated_from_random": None if a is None or b is None else not intervals_overlap(a, b),
    }


def _preference_methods(summary: Sequence[dict[str, Any]], located: dict[str, Any], budget: Any) -> dict[str, Any]:
    """Sparse DPO against the base model and the SFT->DPO chain against SFT alone, where they were trained."""
    out: dict[str, Any] = {}
    base = next((r for r in summary if r.get("adapter") == "base"), None)
    dpo = _find(summary, "located", "dpo", budget)
    if dpo is not None and base is not None:
        out.update(
            dpo_target=dpo["target"],
            dpo_side=dpo.get("side"),
            dpo_gain_over_base=dpo["target"] - base["target"],
            dpo_gain_interval=_difference(dpo, base, "target"),
        )
    chain = _find(summary, "located", "sft+dpo", budget)
    if chain is not None:
        out.update(
            sft_dpo_net=_net(chain),
            sft_dpo_net_gain_over_sft=_net(chain) - _net(located),
            sft_dpo_net_gain_interval=_net_difference(chain, located),
        )
    return out


def _versus_prompt(summary: Sequence[dict[str, Any]], located: dict[str, Any]) -> dict[str, Any]:
    """Located training against the base model asked under the prompting row's system message, where it ran."""
    prompt = next((r for r in summary if r.get("adapter") == "prompt"), None)
    if prompt is None:
        return {}
    return {
        "prompt_target": prompt["target"],
        "prompt_net": _net(prompt),
        "net_gain_over_prompt": _net(located) - _net(prompt),
        "net_gain_over_prompt_interval": _net_difference(located, prompt),
    }


def _conditional(
    summary: Sequence[dict[str, Any]], gated: dict[str, Any], located: dict[str, Any], budget: Any
) -> dict[str, Any]:
    """The located adapter gated by the steering condition against gated random and against itself ungated."""
    out: dict[str, Any] = {"budget": budget, "located_target": gated["target"], "located_net": _net(gated)}
    random = _find(summary, "random", "sft", budget, conditional=True)
    if random is not None:
        out.update(_versus_random(gated, random))
    out.update(
        unconditional_net=_net(located),
        net_gain_over_unconditional=_net(gated) - _net(located),
        net_gain_over_unconditional_interval=_net_difference(gated, located),
    )
    return out


def verdicts(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget: located vs random (target, side, separated intervals, intervals of the differences),
    located vs matched LoRA and vs the prompting row (target minus side, with its interval), sparse DPO /
    SFT->DPO where they were trained at that budget, and under ``conditional`` the same adapters gated by the steering condition."""
    out = []
    budgets = list(dict.fromkeys(r.get("budget") for r in summary if r.get("adapter") == "located"))
    for budget in budgets:
        located = _find(summary, "located", "sft", budget)
        if located is None:
            continue
        verdict: dict[str, Any] = {"budget": budget, "located_target": located["target"], "located_net": _net(located)}
        random = _find(summary, "random", "sft", budget)
        if random is not None:
            verdict.update(_versus_random(located, random))
        lora = _find(summary, "lora_matched", "sft", budget)
        if lora is not None:
            verdict.update(
                lora_net=_net(lora),
                net_gain_over_matched_lora=_net(located) - _net(lora),
                net_gain_interval=_net_difference(located, lora),
            )
        verdict.update(_preference_methods(summary, located, budget))
        verdict.update(_versus_prompt(summary, located))
        gated = _find(summary, "located", "sft", budget, conditional=True)
        if gated is not None:
            verdict["conditional"] = _conditional(summary, gated, located, budget)
        out.append(verdict)
    return out
