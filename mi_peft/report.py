"""Run reports: ``report.md`` with the comparison table and verdicts (plots come from :mod:`mi_peft.report_plots`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ._io import write_text_atomically
from .report_plots import write_plots
from .scoring import is_missing

TABLE_COLUMNS = (
    ("variant", "variant", "{}"),
    ("trainable_pct", "trainable %", "{:.4f}"),
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("seeds", "seeds", "{}"),
    ("target", "target [95% CI]", "rate"),
    ("side", "side [95% CI]", "rate"),
    ("kl_to_base", "KL to base", "{:.4f}"),
    ("piqa", "PIQA", "{:.1%}"),
    ("blimp", "BLiMP", "{:.1%}"),
    ("perplexity", "WikiText ppl", "{:.2f}"),
    ("degenerate", "degenerate", "{:.0%}"),
    ("duplicates", "duplicates", "{:.0%}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("openings", "shared openings", "{:.0%}"),
    ("margin", "DPO margin (held-out)", "{:+.2f}"),
    ("train_seconds", "train time (s)", "{:.1f}"),
)
_LABELS = {
    "refusal": ("refusal on held-out harmful", "over-refusal on held-out harmless"),
    "language": ("target-language replies", "target-language replies on negative prompts"),
    "ab": ("non-sycophantic A/B choice", "-"),
    "target": ("target-string rate", "target-string rate on negative prompts"),
    "mc": ("correct answer more likely (binary choice)", "-"),
}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if is_missing(value):
        return "-"
    if fmt != "rate":
        text = fmt.format(value)
    else:
        text = f"{value:.1%}"
        if not is_missing(row.get(f"{key}_std")):
            text += f" ±{row[f'{key}_std']:.1%}"
        if row.get(f"{key}_low") is not None:
            text += f" [{row[f'{key}_low']:.0%}, {row[f'{key}_high']:.0%}]"
    return text


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the variants, one row each; columns no row has a value for are left out."""
    columns = [c for c in TABLE_COLUMNS if any(_cell(r, c[0], c[2]) != "-" for r in rows)]
    head = "| " + " | ".join(label for _, label, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _interval_text(interval: Any) -> str:
    return "" if interval is None else f" [95% CI {interval[0]:+.1%}, {interval[1]:+.1%}]"


def _budget_verdict_line(v: dict[str, Any], label: str = "") -> str:
    text = f"- budget {v['budget']:g}{label}: located {v['located_target']:.1%}"
    if "random_target" in v:
        separated = {True: "intervals do not overlap", False: "intervals overlap", None: "no interval"}
        text += (
            f" vs random {v['random_target']:.1%} ({v['target_gain_over_random']:+.1%}"
            f"{_interval_text(v.get('target_gain_interval'))}, {separated[v['separated_from_random']]})"
        )
        if v.get("side_change_over_random") is not None:
            text += (
                f", side effect {v['side_change_over_random']:+.1%}{_interval_text(v.get('side_change_interval'))}"
                " vs random"
            )
    if "lora_net" in v:
        text += (
            f"; target minus side {v['located_net']:+.1%} vs matched LoRA {v['lora_net']:+.1%} "
            f"({v['net_gain_over_matched_lora']:+.1%}{_interval_text(v.get('net_gain_interval'))})"
        )
    if "prompt_net" in v:
        text += (
            f"; target minus side {v['located_net']:+.1%} vs the base model under the system prompt "
            f"{v['prompt_net']:+.1%} ({v['net_gain_over_prompt']:+.1%}{_interval_text(v.get('net_gain_over_prompt_interval'))})"
        )
    if "unconditional_net" in v:
        text += (
            f"; target minus side {v['located_net']:+.1%} vs the same adapter ungated {v['unconditional_net']:+.1%} "
            f"({v['net_gain_over_unconditional']:+.1%}{_interval_text(v.get('net_gain_over_unconditional_interval'))})"
        )
    return text + "."


def _preference_lines(v: dict[str, Any]) -> list[str]:
    lines = []
    if "dpo_gain_over_base" in v:
        side = "" if is_missing(v.get("dpo_side")) else f", side {v['dpo_side']:.1%}"
        lines.append(
            f"- budget {v['budget']:g}: sparse located DPO {v['dpo_target']:.1%}{side}: "
            f"{v['dpo_gain_over_base']:+.1%} from base{_interval_text(v.get('dpo_gain_interval'))}."
        )
    if "sft_dpo_net" in v:
        lines.append(
            f"- budget {v['budget']:g}: SFT->DPO target minus side {v['sft_dpo_net']:+.1%} vs SFT alone "
            f"{v['located_net']:+.1%} ({v['sft_dpo_net_gain_over_sft']:+.1%}"
            f"{_interval_text(v.get('sft_dpo_net_gain_interval'))})."
        )
    return lines


def _verdict_lines(verdicts: list[dict[str, Any]], seeds: int) -> list[str]:
    lines = [_budget_verdict_line(v) for v in verdicts]
    lines += [
        _budget_verdict_line(v["conditional"], ", gated by the condition") for v in verdicts if "conditional" in v
    ]
    lines += [line for v in verdicts for line in _preference_lines(v)]
    if lines:
        lines.append(
            f"\nRates pool {seeds} seed(s) x the held-out prompts for each 95% Wilson interval; ± is the standard "
            "deviation across seeds; the interval of a difference is Newcombe's (from the two Wilson intervals), that of a "
            "difference in target minus side the MOVER interval of the four rates (Zou & Donner 2008)."
        )
    return lines


def _top_line(kind: str, letter: str, top: list) -> str:
    if not top:
        return ""
    return f"Top {kind} (layer, index, score): " + ", ".join(f"L{a[0]}{letter}{a[1]} {s:+.3g}" for a, s in top) + ". "


def _validation_line(val: dict[str, Any], recipe: dict[str, Any]) -> str:
    if "skipped" in val:
        return f"Skipped ({val['skipped']}): no ablation was measured, so the localization is not causally checked."
    return (
        f"Metric `{val.get('metric', recipe['locate']['metric'])}`. "
        f"Zero-ablating the top {val['k']} located components moves it by {val['top_effect']:+.4f} "
        f"(clean {val['clean']:.4f}); ablating {val['k']} random components moves it by {val['random_effect']:+.4f}."
    )


def _alpha_table(label: str, sweep: list[dict[str, Any]]) -> list[str]:
    """A steering sweep as a markdown table: one row per strength with its validation target and side rates."""
    return [
        f"| {label} | target | side |",
        "|---|---|---|",
        *[f"| {r['alpha']:g} | {_cell(r, 'target', '{:.1%}')} | {_cell(r, 'side', '{:.1%}')} |" for r in sweep],
        "",
    ]


def _iti_lines(iti: dict[str, Any]) -> list[str]:
    """The ITI sweep: alpha is in units of each steered head's activation std along its direction."""
    heads = ", ".join(f"L{layer}H{head}" for layer, head in iti["heads"])
    return [
        f"ITI head steering of the top {iti['top_k']} probe heads ({heads}); alpha in units of each head's "
        f"activation std; best alpha on validation: {iti['best_alpha']:g}.",
        "",
        *_alpha_table("ITI alpha", iti["sweep"]),
    ]


def _sae_lines(sae: dict[str, Any]) -> list[str]:
    """The SAE row's latents, the SAE's reconstruction on held-out text and its alpha sweep."""
    rec = sae["reconstruction"]
    return [
        f"SAE steering: the top {len(sae['latents'])} latents by `mean_diff` on the steering pairs "
        f"({', '.join(map(str, sae['latents']))}) of a {sae['d_sae']}-latent SAE on layer {sae['layer']} "
        f"(held-out FVU {rec['fvu']:.3f}, L0 {rec['l0']:.1f}, dead {rec['dead_fraction']:.1%}, next-token loss "
        f"{rec['ce_increase']:+.3f} nats with the reconstruction); each adds alpha x its decoder row; "
        f"best alpha on validation: {sae['best_alpha']:g}.",
        "",
        *_alpha_table("SAE alpha", sae["sweep"]),
    ]


def _metric_labels(evaluate: dict[str, Any]) -> tuple[str, str]:
    """Target and side labels of the behaviour, with the number of distinct strings a reply needs if above 1."""
    target, side = _LABELS[evaluate["behaviour"]]
    hits = evaluate.get("target_min_hits", 1)
    if evaluate["behaviour"] == "target" and hits > 1:
        target = f"{target} (at least {hits} distinct target strings per reply)"
    return target, side


def _json_safe(value: Any) -> Any:
    """NaN (a metric that does not apply, e.g. no side prompts) becomes JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def results_json(results: dict[str, Any]) -> str:
    """The text of a run's ``results.json``: strict JSON, with NaN written as null."""
    return json.dumps(_json_safe(results), indent=2, default=str, allow_nan=False)


def write_report(out: Path, results: dict[str, Any], localization: Any | None) -> Path:
    """Write plots and ``report.md`` for a finished run; return the report path.

    ``localization`` (a :class:`~mi_peft.locate.LocalizationResult`) draws the score plots; ``None`` keeps
    those already in ``out/plots`` (a report refreshed from ``results.json`` alone).
    """
    labels = _metric_labels(results["recipe"]["evaluate"])
    written = write_plots(out, results, localization, labels)

    recipe, val, steer = results["recipe"], results["validation"], results["steering"]
    lines = [
        f"# mi-peft run: {recipe['name']}",
        "",
        recipe.get("description", ""),
        "",
        f"Target metric: **{labels[0]}**. Side metric: **{labels[1]}**. "
        "KL to base: mean next-token KL(base || variant) on neutral prompts.",
        "",
        "## Comparison on held-out prompts",
        "",
        comparison_table(results["variants"]),
        "",
        f"Held-out prompts: {results['variants'][0].get('target_n', '-')} for the target metric and "
        f"{results['variants'][0].get('side_n', '-')} for the side metric. General ability (PIQA, BLiMP, WikiText "
        "perplexity) and generation health (on generic instructions) come from `mi_peft.evaluate.general` and "
        "`mi_peft.evaluate.health`.",
        "",
        *_prompt_baseline_lines(recipe["evaluate"]),
        "## Located vs random vs matched LoRA",
        "",
        *_verdict_lines(results.get("verdicts", []), recipe["train"].get("seeds", 1)),
        "",
        "## Localization",
        "",
        f"Method `{recipe['locate']['method']}`, metric `{recipe['locate']['metric'] or 'none'}`, "
        f"{recipe['locate']['pairs']} pairs. "
        + _top_line("heads", "H", results["localization"].get("top_heads", []))
        + _top_line("neurons", "N", results["localization"].get("top_neurons", [])),
        "",
        "## Causal validation",
        "",
        _validation_line(val, recipe),
        "",
        "## Steering",
        "",
        f"Additive steering on layers {steer['layers'][0]}-{steer['layers'][-1]}; best alpha on validation: "
        f"{steer['best_alpha']:g}.",
        "",
        *_alpha_table("alpha", steer["sweep"]),
    ]
    lines += _steering_extra_lines(steer)
    lines += ["## Plots", "", *[f"![{p.stem}]({p.as_posix()})" for p in written], ""]
    lines += ["## Timings (s)", "", *[f"- {k}: {v:.1f}" for k, v in results["timings"].items()], ""]
    lines += _environment_lines(results.get("environment"))
    path = out / "report.md"
    write_text_atomically(path, "\n".join(lines))
    return path


def _prompt_baseline_lines(evaluate: dict[str, Any]) -> list[str]:
    """What the prompting row is: the base model asked under a system message (``evaluate.prompt_baseline``)."""
    system = evaluate.get("prompt_baseline")
    if not system:
        return []
    return [
        f'`base + system prompt`: the base model, no training, with the system message "{system}" before each '
        "held-out prompt and each generic instruction. KL and the log-likelihood columns (PIQA, BLiMP, perplexity) "
        "do not apply to a system message and are left blank.",
        "",
    ]


def _steering_extra_lines(steer: dict[str, Any]) -> list[str]:
    """The conditional-steering condition (with its held-out selection rates), ITI and SAE steering sections."""
    lines: list[str] = []
    if "condition" in steer:
        cond = steer["condition"]
        lines += [f"Conditional steering condition: `{cond}`", ""]
        if "held_out_tpr" in cond:
            lines += [
                f"On the held-out test prompts (used for no choice) the condition selects {cond['held_out_tpr']:.1%} "
                f"of the positive and {cond['held_out_fpr']:.1%} of the negative prompts; its calibration on the "
                f"validation pairs gave {cond['tpr']:.1%} and {cond['fpr']:.1%}.",
                "",
            ]
    if "iti" in steer:
        lines += _iti_lines(steer["iti"])
    if "sae" in steer:
        lines += _sae_lines(steer["sae"])
    return lines


def _environment_lines(env: dict[str, Any] | None) -> list[str]:
    """What the run ran on (``results.json`` holds the full record): versions, CPU class, precision, weights."""
    if not env:
        return []
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v is not None)
    machine = env["gpu"] or f"CPU ({env['cpu_capability']}, bf16 units: {env['cpu_bf16_flag'] or 'none'})"
    # a record from before the commit was kept has no `source_commit` key; None means an installed package
    source = (
        []
        if "source_commit" not in env
        else [f"- source: git commit `{env['source_commit'] or 'none (installed package)'}`"]
    )
    return [
        "## Environment",
        "",
        *source,
        f"- packages: python {env['python']}, {packages}",
        f"- machine: {machine}, {env['torch_threads']} torch threads; training precision {env['train_precision']}",
        f"- base weights sha256: `{env['weights_sha256'][:16]}`",
        "",
    ]
