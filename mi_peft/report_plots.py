"""The PNG plots of a run report: steering sweep, training losses, per-variant metrics and the budget Pareto plot.

Kept apart from the markdown of :mod:`mi_peft.report`, which calls :func:`write_plots` once per report and
links the paths it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .locate.result import KINDS as LOCALIZATION_KINDS  # noqa: E402
from .scoring import is_missing  # noqa: E402


def write_plots(out: Path, results: dict[str, Any], localization: Any | None, labels: tuple[str, str]) -> list[Path]:
    """Draw every plot of a run under ``out/plots``; return their paths relative to ``out``, in report order.

    ``localization`` draws the score plots; ``None`` keeps those already there (a report refreshed from
    ``results.json`` alone). The Pareto plot needs located rows at more than one budget.
    """
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = _localization_plots(plots, localization)
    written.append(_plot_sweep(plots / "steering_sweep.png", results["steering"], labels))
    if any(results["losses"].values()):
        written.append(_plot_losses(plots / "training_loss.png", results["losses"]))
    written.append(_plot_bars(plots / "metrics.png", results["variants"], labels))
    if len({r.get("budget") for r in results["variants"] if r.get("adapter") == "located"}) > 1:
        written.append(_plot_pareto(plots / "budget_pareto.png", results["variants"], labels))
    return [path.relative_to(out) for path in written]


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


def _localization_plots(plots: Path, localization: Any) -> list[Path]:
    """The localization's plots, drawn anew; without a localization (``None``), the ones an earlier write left."""
    if localization is not None:
        return localization.plot(plots)
    return [plots / f"{kind}.png" for kind in LOCALIZATION_KINDS if (plots / f"{kind}.png").is_file()]
