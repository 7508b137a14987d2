"""Views of a :class:`LocalizationResult`: a table of ranked scores, PNG plots, agreement of two results.

Kept apart from the result's data and selection logic; the result's ``to_frame``, ``plot`` and
``compare`` methods call these functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import check_positive
from ._select import _order, _spearman

if TYPE_CHECKING:
    from .result import LocalizationResult


def result_frame(result: LocalizationResult) -> Any:
    """Rows ``kind, layer, index, score, rank`` as a pandas DataFrame, or a list of dicts without pandas.

    ``rank`` is 0 for each kind's highest ``|score|`` and None when unscored; ``index`` is None
    for residual rows. Rows are sorted by kind, then rank. pandas is optional.
    """
    cols: dict[str, list] = {"kind": [], "layer": [], "index": [], "score": [], "rank": []}
    for kind, scores in result.scores.items():
        flat = scores.flatten()
        width = 1 if kind == "residual" else scores.shape[1]
        ordered = _order(flat)
        rows = torch.cat([ordered, torch.isnan(flat).nonzero().squeeze(1)])
        cols["kind"] += [kind] * rows.numel()
        cols["layer"] += (rows // width).tolist()
        cols["index"] += [None] * rows.numel() if kind == "residual" else (rows % width).tolist()
        cols["score"] += flat[rows].tolist()
        cols["rank"] += list(range(ordered.numel())) + [None] * (rows.numel() - ordered.numel())
    try:
        import pandas as pd
    except ImportError:
        return [dict(zip(cols, row, strict=True)) for row in zip(*cols.values(), strict=True)]
    return pd.DataFrame(cols).astype({"index": "Int64", "rank": "Int64"})


def plot_result(result: LocalizationResult, path: str | os.PathLike, top_n: int = 30) -> list[Path]:
    """Write PNGs into folder ``path``: head heatmap, top-``top_n`` neurons and SAE latents by ``|score|``, residual curve."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; `plot` writes several PNGs, pass a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{result.method}" + (f" ({result.metric})" if result.metric else "")
    written = []
    for kind, scores in result.scores.items():
        fig = Figure(figsize=(7, 5) if kind != "residual" else (7, 3.5), layout="constrained")
        ax = fig.add_subplot()
        if kind == "heads":
            vmax = float(scores.nan_to_num().abs().max()) or 1.0
            cmap = colormaps["RdBu_r"].with_extremes(bad="lightgrey")  # grey: not scored
            image = ax.imshow(scores.numpy(), aspect="auto", cmap=cmap, vmin=-vmax, vmax=vmax, origin="lower")
            fig.colorbar(image, ax=ax, label="score (grey: not scored)")
            ax.set(xlabel="head", ylabel="layer", title=f"head scores: {title}")
        elif kind in ("neurons", "sae"):  # too many to show all: the top ones by |score|, as labelled bars
            best = result.top(kind, top_n)[::-1]
            values = [s for _, s in best]
            tag, what = ("N", "neurons") if kind == "neurons" else ("F", "SAE latents (L<layer>.F<latent>)")
            ax.barh([f"L{li}.{tag}{n}" for (li, n), _ in best], values, color=["C3" if v > 0 else "C0" for v in values])
            ax.set(xlabel="score", title=f"top {len(best)} {what} by |score|: {title}")
            ax.tick_params(axis="y", labelsize=7)
        else:
            ax.plot(range(scores.numel()), scores.numpy(), marker="o")
            ax.axhline(0.0, color="grey", linewidth=0.5)
            ax.set(xlabel="layer", ylabel="score", title=f"residual stream: {title}")
        written.append(folder / f"{kind}.png")
        fig.savefig(written[-1], dpi=110)
    return written


def compare_results(result: LocalizationResult, other: LocalizationResult, k: int = 10) -> dict[str, dict[str, float]]:
    """Agreement with ``other`` per common kind: ``{kind: {spearman, spearman_signed, overlap, overlap_fraction, k}}``.

    ``spearman`` correlates the ``|score|`` ranks (what ``select`` uses), ``spearman_signed`` the
    signed scores; ties get their average rank and entries NaN in either result are left out
    (NaN when fewer than two remain or one side is constant). ``overlap`` is the size of the
    intersection of both top-``k`` sets by ``|score|``.
    """
    check_positive(k, "k")
    common = [kind for kind in result.scores if kind in other.scores]
    if not common:
        raise ValueError(f"no common score kinds: this result has {result.kinds}, the other {other.kinds}.")
    out = {}
    for kind in common:
        a, b = result.scores[kind].flatten(), other.scores[kind].flatten()
        if result.scores[kind].shape != other.scores[kind].shape:
            raise ValueError(
                f"{kind} scores differ in shape: {tuple(result.scores[kind].shape)} vs {tuple(other.scores[kind].shape)}."
            )
        both = ~(torch.isnan(a) | torch.isnan(b))
        top_a, top_b = set(_order(a)[:k].tolist()), set(_order(b)[:k].tolist())
        kk = min(k, len(top_a), len(top_b))
        out[kind] = {
            "spearman": _spearman(a[both].abs(), b[both].abs()),
            "spearman_signed": _spearman(a[both], b[both]),
            "overlap": len(top_a & top_b),
            "overlap_fraction": len(top_a & top_b) / kk,
            "k": kk,
        }
    return out
