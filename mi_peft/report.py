"""Run reports: ``report.md`` with the comparison table, plus PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TABLE_COLUMNS = (
    ("variant", "variant", "{}"),
    ("trainable_pct", "trainable %", "{:.4f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("adapter_bytes", "adapter file (bytes)", "{:,}"),
    ("target", "target metric", "{:.1%}"),
    ("side", "side metric", "{:.1%}"),
    ("kl_to_base", "KL to base", "{:.4f}"),
    ("train_seconds", "train time (s)", "{:.1f}"),
)
_LABELS = {
    "refusal": ("refusal on held-out harmful", "over-refusal on held-out harmless"),
    "language": ("target-language replies", "target-language replies on negative prompts"),
    "ab": ("non-sycophantic A/B choice", "-"),
    "target": ("target-string rate", "target-string rate on negative prompts"),
}


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the variants, one row each."""
    head = "| " + " | ".join(label for _, label, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row[key], fmt) for key, _, fmt in TABLE_COLUMNS) + " |" for row in rows]
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
    if not all(math.isnan(r["side"]) for r in sweep):
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


def _plot_bars(path: Path, rows: list[dict[str, Any]], labels: tuple[str, str]) -> Path:
    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["target"] for r in rows], width=0.4, label=labels[0])
    side = [0.0 if math.isnan(r["side"]) else r["side"] for r in rows]
    ax.bar([i + 0.2 for i in x], side, width=0.4, label=labels[1])
    ax.set_xticks(list(x), names, rotation=25, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    return _finish(fig, ax, path, None, "rate on held-out prompts", "target and side metrics per variant")


def _top_line(kind: str, letter: str, top: list) -> str:
    if not top:
        return ""
    return f"Top {kind} (layer, index, score): " + ", ".join(f"L{a[0]}{letter}{a[1]} {s:+.3g}" for a, s in top) + ". "


def write_report(out: Path, results: dict[str, Any], localization: Any) -> Path:
    """Write plots and ``report.md`` for a finished run; return the report path."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    behaviour = results["recipe"]["evaluate"]["behaviour"]
    labels = _LABELS[behaviour]
    written = [p.relative_to(out) for p in localization.plot(plots)]
    written.append(_plot_sweep(plots / "steering_sweep.png", results["steering"], labels).relative_to(out))
    if any(results["losses"].values()):
        written.append(_plot_losses(plots / "training_loss.png", results["losses"]).relative_to(out))
    written.append(_plot_bars(plots / "metrics.png", results["variants"], labels).relative_to(out))

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
        "## Localization",
        "",
        f"Method `{recipe['locate']['method']}`, metric `{recipe['locate']['metric']}`, "
        f"{recipe['locate']['pairs']} pairs. "
        + _top_line("heads", "H", results["localization"].get("top_heads", []))
        + _top_line("neurons", "N", results["localization"].get("top_neurons", [])),
        "",
        "## Causal validation",
        "",
        f"Metric `{val.get('metric', recipe['locate']['metric'])}`. "
        f"Zero-ablating the top {val['k']} located components moves it by {val['top_effect']:+.4f} "
        f"(clean {val['clean']:.4f}); ablating {val['k']} random components moves it by {val['random_effect']:+.4f}.",
        "",
        "## Steering",
        "",
        f"Additive steering on layers {steer['layers'][0]}-{steer['layers'][-1]}; best alpha on validation: "
        f"{steer['best_alpha']:g}.",
        "",
        "| alpha | target | side |",
        "|---|---|---|",
        *[
            f"| {r['alpha']:g} | {_cell(r['target'], '{:.1%}')} | {_cell(r['side'], '{:.1%}')} |"
            for r in steer["sweep"]
        ],
        "",
    ]
    if "condition" in steer:
        lines += [f"Conditional steering condition: `{steer['condition']}`", ""]
    lines += ["## Plots", "", *[f"![{p.stem}]({p.as_posix()})" for p in written], ""]
    lines += ["## Timings (s)", "", *[f"- {k}: {v:.1f}" for k, v in results["timings"].items()], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
