"""Run reports: ``report.md`` with the comparison table, plus PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ._io import write_text_atomically  # noqa: E402
from .locate.result import KINDS as LOCALIZATION_KINDS  # noqa: E402
from .scoring import is_missing  # noqa: E402

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


def _finish(fig, ax, path: Path, xlabel: str | None, ylabel: str, title: str) -> Path:
    """Label, save and close a figure."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sweep(path: Path, steering: dict[str, Any], labels: tuple[str, str]) -> Path:
    sweep = steering["sweep"]
    alphas = [r["alpha"] for r in sweep]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(alphas, [r["target"] for r in sweep], "o-", label=labels[0])
    if not all(is_missing(r.get("side")) for r in sweep):
        ax.plot(alphas, [r["side"] for r in sweep], "s--", label=labels[1])
    return _finish(
        fig, ax, path, "alpha (added to the residual stream)", "rate on validation prompts", "additive steering sweep"
    )


def _plot_losses(path: Path, losses: dict[str, list[float]]) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, values in losses.items():
        if values:
            ax.plot(range(1, len(values) + 1), values, label=name)
    return _finish(fig, ax, path, "logging step", "training loss", "training loss")


def _errors(rows: list[dict[str, Any]], key: str) -> list[list[float]]:
    """Asymmetric error bars from each row's Wilson interval (0 where a row has none)."""
    low = [r[key] - r[f"{key}_low"] if f"{key}_low" in r else 0.0 for r in rows]
    high = [r[f"{key}_high"] - r[key] if f"{key}_high" in r else 0.0 for r in rows]
    return [low, high]


def _plot_bars(path: Path, rows: list[dict[str, Any]], labels: tuple[str, str]) -> Path:
    names = [r["variant"] + (f" @{r['trainable_pct']:.3g}%" if r.get("budget") else "") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = range(len(rows))
    target = [r["target"] for r in rows]
    ax.bar([i - 0.2 for i in x], target, width=0.4, label=labels[0], yerr=_errors(rows, "target"), capsize=2)
    if not all(is_missing(r.get("side")) for r in rows):
        side = [0.0 if is_missing(r.get("side")) else r["side"] for r in rows]
        ax.bar([i + 0.2 for i in x], side, width=0.4, label=labels[1], yerr=_errors(rows, "side"), capsize=2)
    ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, None, "rate on held-out prompts (95% CI)", "target and side metrics per variant")


_SERIES = {
    "located": ("sparse located", "o-"),
    "random": ("sparse random", "s--"),
    "lora_matched": ("LoRA matched", "^:"),
}


def _plot_pareto(path: Path, rows: list[dict[str, Any]], labels: tuple[str, str]) -> Path:
    """Trainable % (log) against the target and side rates, one line per adapter kind, with Wilson bars."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for axis, key, label in zip(axes, ("target", "side"), labels, strict=True):
        for adapter, (name, style) in _SERIES.items():
            series = sorted(
                (
                    r
                    for r in rows
                    if r.get("adapter") == adapter and r.get("method") == "sft" and not r.get("conditional")
                ),
                key=lambda r: r["trainable_pct"],
            )
            if series and not all(is_missing(r.get(key)) for r in series):
                axis.errorbar(
                    [r["trainable_pct"] for r in series],
                    [r[key] for r in series],
                    yerr=_errors(series, key),
                    fmt=style,
                    capsize=3,
                    label=name,
                )
        axis.set_xscale("log")
        # ticks at the budgets (the first series' sizes; the others match within 10%): minor labels overlap
        first = next((a for a in _SERIES if any(r.get("adapter") == a for r in rows)), None)
        ticks = sorted({r["trainable_pct"] for r in rows if r.get("method") == "sft" and r.get("adapter") == first})
        axis.set_xticks(ticks, [f"{t:.2g}%" for t in ticks])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_ylim(0, 1)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("trainable parameters (% of model, log scale)")
    axes[0].set_ylabel("rate on held-out prompts (95% CI)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def _localization_plots(plots: Path, localization: Any) -> list[Path]:
    """The localization's plots, drawn anew; without a localization (``None``), the ones an earlier write left."""
    if localization is not None:
        return localization.plot(plots)
    return [plots / f"{kind}.png" for kind in LOCALIZATION_KINDS if (plots / f"{kind}.png").is_file()]


def write_report(out: Path, results: dict[str, Any], localization: Any | None) -> Path:
    """Write plots and ``report.md`` for a finished run; return the report path.

    ``localization`` (a :class:`~mi_peft.locate.LocalizationResult`) draws the score plots; ``None`` keeps
    those already in ``out/plots`` (a report refreshed from ``results.json`` alone).
    """
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    labels = _metric_labels(results["recipe"]["evaluate"])
    written = [p.relative_to(out) for p in _localization_plots(plots, localization)]
    written.append(_plot_sweep(plots / "steering_sweep.png", results["steering"], labels).relative_to(out))
    if any(results["losses"].values()):
        written.append(_plot_losses(plots / "training_loss.png", results["losses"]).relative_to(out))
    written.append(_plot_bars(plots / "metrics.png", results["variants"], labels).relative_to(out))
    if len({r.get("budget") for r in results["variants"] if r.get("adapter") == "located"}) > 1:
        written.append(_plot_pareto(plots / "budget_pareto.png", results["variants"], labels).relative_to(out))

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
    lines += ["## Plots", "", *[f"![{p.stem}]({p.as_posix()})" for p in written], ""]
    lines += ["## Timings (s)", "", *[f"- {k}: {v:.1f}" for k, v in results["timings"].items()], ""]
    lines += _environment_lines(results.get("environment"))
    path = out / "report.md"
    write_text_atomically(path, "\n".join(lines))
    return path


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
