"""Example 5: steering robustness. Does the refusal steering vector depend on how it was found, where and how hard?

1. Find the refusal direction from harmful/harmless training pairs (``recipes/data/refusal``) three ways with
   ``mi_peft.directions``: diff-in-means (``mean_diff``), first principal component of the paired differences
   (``pca``) and a logistic-regression probe (``probe``), at several layers.
2. Steer with each as a zero-training PEFT adapter (``SteeringConfig.from_directions``, op ``add`` at one layer)
   for several strengths. For a fair comparison every method adds a vector of the same L2 norm at a layer:
   alpha x the diff-in-means norm there (alpha 0 is the unsteered model, a check).
3. Effect: shift of the mean refusal metric (``mi_peft.metrics``) on held-out harmless prompts (the ``_test``
   file): > 0 means the steered model leans towards refusing. Side effect: mean next-token KL(base || steered)
   over every position of a few WikiText-2 paragraphs (the shipped excerpt), in nats.

    python examples/05_steering_robustness.py          # embedded model: see examples/README.md for the wall time

Writes ``summary.md``, ``robustness.png`` (one heatmap per method: layer x alpha, colour = effect, KL annotated)
and ``results.json`` under ``--out``; ``main(argv)`` returns the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from tqdm.auto import tqdm

from mi_peft import ContrastivePairs, SteeringConfig, directions, spec_for
from mi_peft.data import format_prompts, read_texts, tokenize
from mi_peft.evaluate.general import load_paragraphs
from mi_peft.metrics import get_metric
from mi_peft.models import load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "recipes" / "data" / "refusal"
DEFAULT_TEXTS = REPO / "recipes" / "data" / "general" / "wikitext2_test_excerpt.txt"
DEFAULT_OUT = REPO / "runs" / "examples" / "05_steering_robustness"
METHODS = ("mean_diff", "pca", "probe")


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.") from err
    if not values:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.")
    return sorted(set(values))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=None, help="HF id or local folder (default: the embedded model)")
    add("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    add("--data", type=Path, default=DEFAULT_DATA, help="refusal pairs folder (harmful/harmless, *_test.json)")
    add("--pairs", type=int, default=64, help="training pairs the directions are found from")
    add("--eval-prompts", type=int, default=32, help="held-out harmless prompts for the refusal metric")
    add("--kl-texts", type=int, default=8, help="WikiText paragraphs for the KL side effect")
    add("--kl-tokens", type=int, default=64, help="tokens per KL paragraph (the last ones)")
    add("--layers", default=None, help="comma-separated layers (default: 5 from 15%% to 85%% depth)")
    add("--alphas", default="0,1,2,4", help="comma-separated strengths in units of the diff-in-means norm")
    add("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    args.alphas = _numbers(args.alphas, float, "alphas")
    if args.layers is not None:
        args.layers = _numbers(args.layers, int, "layers")
    for name in ("pairs", "eval_prompts", "kl_texts", "kl_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (the probe needs two)")
    return args


def default_layers(n_layers: int) -> list[int]:
    """Five layers from 15% to 85% depth (all layers when the model has five or fewer)."""
    if n_layers <= 5:
        return list(range(n_layers))
    return sorted({round(f * (n_layers - 1)) for f in (0.15, 0.325, 0.5, 0.675, 0.85)})


class Probe:
    """Effect (refusal metric on held-out harmless prompts) and side effect (KL to base on WikiText)."""

    def __init__(self, model: Any, tokenizer: Any, prompts: list[str], texts: list[str], args: argparse.Namespace):
        self.model, self.metric, size = model, get_metric("refusal", tokenizer), args.batch_size
        chat = format_prompts(tokenizer, prompts)
        self.prompt_batches = [tokenize(tokenizer, chat[i : i + size]) for i in range(0, len(chat), size)]
        self.text_batches = [
            tokenize(tokenizer, texts[i : i + size], args.kl_tokens) for i in range(0, len(texts), size)
        ]
        self.base_metric, self.base_logprobs = self._metric(model), self._logprobs(model)

    def _metric(self, model: Any) -> float:
        values = []
        with torch.no_grad():
            for batch in self.prompt_batches:
                values.append(self.metric(model(**batch, logits_to_keep=1).logits, batch).float())
        return float(torch.cat(values).mean())

    def _logprobs(self, model: Any) -> list[torch.Tensor]:
        with torch.no_grad():
            return [torch.log_softmax(model(**batch).logits.float(), -1) for batch in self.text_batches]

    def _kl(self, model: Any) -> float:
        """Mean over real (unpadded) positions of KL(base || steered) of the next-token distribution."""
        total, count = 0.0, 0
        for base, batch, steered in zip(self.base_logprobs, self.text_batches, self._logprobs(model), strict=True):
            kl = (base.exp() * (base - steered)).sum(-1)
            mask = batch["attention_mask"].bool()
            total, count = total + float(kl[mask].sum()), count + int(mask.sum())
        return total / count

    def steered(self, config: SteeringConfig) -> dict[str, float]:
        model = get_peft_model(self.model, config)
        try:
            metric = self._metric(model)
            return {"metric": metric, "effect": metric - self.base_metric, "kl": self._kl(model)}
        finally:
            model.unload()


def find_directions(model: Any, tokenizer: Any, pairs: Any, layers: list[int], batch_size: int) -> dict[str, Any]:
    return {m: directions(model, tokenizer, pairs, method=m, layers=layers, batch_size=batch_size, progress=False)
            for m in METHODS}  # fmt: skip


def cosines(dirs: dict[str, Any], layers: list[int]) -> dict[str, list[float]]:
    """Per layer, cosine of the PCA and probe directions with diff-in-means (all unit vectors)."""
    return {
        f"{m}_vs_mean_diff": [float(dirs[m][layer] @ dirs["mean_diff"][layer]) for layer in layers] for m in METHODS[1:]
    }


def sweep(probe: Probe, dirs: dict[str, Any], layers: list[int], alphas: list[float]) -> dict[str, Any]:
    """effect[method][i_layer][i_alpha] and kl[...] the same shape, plus the alpha in absolute units."""
    effect = {m: [[0.0] * len(alphas) for _ in layers] for m in METHODS}
    kl = {m: [[0.0] * len(alphas) for _ in layers] for m in METHODS}
    scale = [dirs["mean_diff"].norms[layer] for layer in layers]
    with tqdm(total=len(METHODS) * len(layers) * len(alphas), desc="steering") as bar:
        for m in METHODS:
            for i, layer in enumerate(layers):
                for j, alpha in enumerate(alphas):
                    cfg = SteeringConfig.from_directions(dirs[m], layers=[layer], alpha=alpha * scale[i])
                    got = probe.steered(cfg)
                    effect[m][i][j], kl[m][i][j] = got["effect"], got["kl"]
                    bar.update()
    return {"effect": effect, "kl": kl, "mean_diff_norm": scale}


def plot(result: dict[str, Any], path: Path) -> Path:
    """One heatmap per method: rows layers, columns alphas, colour = effect, text = effect / KL."""
    from matplotlib.figure import Figure

    layers, alphas = result["layers"], result["alphas"]
    values = torch.tensor([result["effect"][m] for m in METHODS])
    limit = max(float(values.abs().max()), 1e-6)
    fig = Figure(figsize=(4.2 * len(METHODS) + 1, 0.7 * len(layers) + 2), layout="constrained")
    axes = fig.subplots(1, len(METHODS), sharey=True)
    for ax, m in zip(axes, METHODS, strict=True):
        image = ax.imshow(values[METHODS.index(m)].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        for i in range(len(layers)):
            for j in range(len(alphas)):
                value = result["effect"][m][i][j]
                text = f"{value:+.2f}\nKL {result['kl'][m][i][j]:.2f}"
                color = "white" if abs(value) > 0.6 * limit else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
        ax.set(title=m, xlabel="alpha (x diff-in-means norm)", xticks=range(len(alphas)), yticks=range(len(layers)))
        ax.set_xticklabels([f"{a:g}" for a in alphas])
        ax.set_yticklabels([str(layer) for layer in layers])
    axes[0].set_ylabel("layer steered")
    fig.colorbar(image, ax=list(axes), label="refusal metric shift (harmless prompts)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_summary(result: dict[str, Any], path: Path) -> Path:
    layers, alphas = result["layers"], result["alphas"]
    lines = [
        f"# Steering robustness: refusal direction by method, layer and strength ({result['model']})",
        "",
        f"Directions from {result['pairs']} harmful/harmless training pairs; steering = PEFT `SteeringConfig` "
        f"(op add, one layer, all positions) with the same L2 norm for every method: alpha x the diff-in-means "
        f"norm at that layer. Effect: refusal metric shift on {result['eval_prompts']} held-out harmless prompts "
        f"(base **{result['base_metric']:.3f}**; > 0: towards refusal). Side effect: mean next-token KL(base || "
        f"steered) in nats over {result['kl_texts']} WikiText-2 paragraphs (<= {result['kl_tokens']} tokens). "
        f"Total {result['seconds']:.0f} s (directions {result['directions_seconds']:.0f} s).",
        "",
        "Cells: effect / KL.",
        "",
        "| method | layer | diff-in-means norm | " + " | ".join(f"alpha {a:g}" for a in alphas) + " |",
        "|---|---|---|" + "---|" * len(alphas),
    ]
    for m in METHODS:
        for i, layer in enumerate(layers):
            cells = " | ".join(
                f"{result['effect'][m][i][j]:+.3f} / {result['kl'][m][i][j]:.3f}" for j in range(len(alphas))
            )
            lines.append(f"| {m} | {layer} | {result['mean_diff_norm'][i]:.2f} | {cells} |")
    lines += [
        "",
        "Cosine with the diff-in-means direction per layer:",
        "",
        "| direction | " + " | ".join(f"layer {layer}" for layer in layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for name, values in result["cosines"].items():
        lines.append(f"| {name.split('_vs_')[0]} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "![effect heatmaps](robustness.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    layers = args.layers or default_layers(spec_for(model).n_layers)
    pairs = ContrastivePairs.load(args.data).subset(args.pairs)
    held_out = read_texts(args.data / "harmless_test.json", "instruction")
    if args.eval_prompts > len(held_out):
        raise ValueError(f"--eval-prompts {args.eval_prompts} exceeds the {len(held_out)} held-out harmless prompts.")
    texts = load_paragraphs(DEFAULT_TEXTS)[: args.kl_texts]
    dirs = find_directions(model, tokenizer, pairs, layers, args.batch_size)
    directions_seconds = time.perf_counter() - started
    probe = Probe(model, tokenizer, held_out[: args.eval_prompts], texts, args)
    out: dict[str, Any] = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "methods": list(METHODS)}
    out.update(layers=layers, alphas=args.alphas, base_metric=probe.base_metric, cosines=cosines(dirs, layers))
    out.update({name: getattr(args, name) for name in ("pairs", "eval_prompts", "kl_texts", "kl_tokens")})
    out.update(sweep(probe, dirs, layers, args.alphas))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    out["plot_path"] = plot(out, folder / "robustness.png")
    out["seconds"], out["directions_seconds"] = time.perf_counter() - started, directions_seconds
    out["summary_path"] = write_summary(out, folder / "summary.md")
    json_safe = {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
    (folder / "results.json").write_text(json.dumps(json_safe, indent=1), encoding="utf-8")
    best = max((out["effect"][m][i][-1], m, layer) for m in METHODS for i, layer in enumerate(layers))
    print(f"largest effect at alpha {args.alphas[-1]:g}: {best[0]:+.3f} ({best[1]}, layer {best[2]}); wrote {folder}")
    return out


if __name__ == "__main__":
    main()
