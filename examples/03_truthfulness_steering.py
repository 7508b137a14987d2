"""Example 3: truthfulness steering. Does steering towards honest answers raise TruthfulQA binary accuracy?

1. Pairs from TruthfulQA (``examples/data/truthfulqa``, Apache-2.0): each training question followed by its
   best answer (honest, positive) vs its best incorrect answer (deceptive, negative), in the chat template.
2. Residual steering: the diff-in-means direction (``mi_peft.directions``) added at one layer, for several layers
   and alphas (in units of the diff-in-means norm there, including 1.5), as a ``SteeringConfig`` adapter.
3. ITI head steering: heads located with ``locate(..., method="probe")``, their mass-mean directions from
   ``head_directions``, steered with ``SteeringConfig.from_head_probes`` (alpha in units of each head's sigma).
4. Held-out accuracy on TruthfulQA's binary multiple choice: the best answer wins when its total
   log-likelihood after the question exceeds the best incorrect answer's (``continuation_logprobs``).

    python examples/03_truthfulness_steering.py       # embedded model: see examples/README.md for the wall time

Writes ``summary.md``, ``truthfulness.png`` and ``results.json`` under ``--out``; ``main(argv)`` returns the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import get_peft_model
from tqdm.auto import tqdm

from mi_peft import ContrastivePairs, SteeringConfig, directions, locate, spec_for
from mi_peft.evaluate import mc_accuracy
from mi_peft.models import load_model
from mi_peft.tuners.steering import head_directions

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "examples" / "data" / "truthfulqa" / "truthfulqa_binary.csv"
DEFAULT_OUT = REPO / "runs" / "examples" / "03_truthfulness_steering"


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        values = sorted({kind(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.") from err
    if not values:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}.")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=None, help="HF id or local folder (default: the embedded model)")
    add("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    add("--data", type=Path, default=DEFAULT_DATA, help="TruthfulQA csv (Question, Best Answer, Best Incorrect Answer)")
    add("--train", type=int, default=100, help="questions for the directions and the head probes")
    add("--test", type=int, default=100, help="held-out questions for the binary accuracy")
    add("--layers", default=None, help="comma-separated layers for residual steering (default: 3 at 1/3-2/3 depth)")
    add("--alphas", default="0.75,1.5,3", help="residual strengths in units of the diff-in-means norm")
    add("--iti-heads", type=int, default=16, help="heads steered by ITI (top by probe accuracy)")
    add("--iti-alphas", default="5,15", help="ITI strengths in units of each head's sigma")
    add("--seed", type=int, default=0, help="shuffle seed for the train/test split")
    add("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    args.alphas, args.iti_alphas = (
        _numbers(args.alphas, float, "alphas"),
        _numbers(args.iti_alphas, float, "iti-alphas"),
    )
    args.layers = None if args.layers is None else _numbers(args.layers, int, "layers")
    for name in ("train", "test", "iti_heads", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.train < 2:
        parser.error("--train must be at least 2 (the probes need two)")
    return args


def load_questions(path: Path, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test questions after a seeded shuffle."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Best Answer"].strip() and r["Best Incorrect Answer"].strip()]
    if n_train + n_test > len(rows):
        raise ValueError(f"--train {n_train} + --test {n_test} exceeds the {len(rows)} questions in {path}.")
    random.Random(seed).shuffle(rows)
    return rows[:n_train], rows[n_train : n_train + n_test]


def default_layers(n_layers: int) -> list[int]:
    return sorted({round(f * (n_layers - 1)) for f in (1 / 3, 1 / 2, 2 / 3)})


class Scorer:
    """Binary MC on held-out questions by ``mi_peft.evaluate.mc_accuracy``: accuracy, mean margin (best - incorrect)."""

    def __init__(self, tokenizer: Any, questions: list[dict], batch_size: int) -> None:
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.questions = [q["Question"] for q in questions]
        self.correct = [q["Best Answer"] for q in questions]
        self.incorrect = [q["Best Incorrect Answer"] for q in questions]

    def score(self, model: Any, config: SteeringConfig | None = None) -> dict[str, Any]:
        steered = model if config is None else get_peft_model(model, config)
        try:
            result = mc_accuracy(steered, self.tokenizer, self.questions, self.correct, self.incorrect, self.batch_size)
        finally:
            if config is not None:
                steered.unload()
        low, high = result.interval()
        return {"accuracy": result.accuracy, "correct": result.correct, "ci95": [low, high],
                "margin": result.mean_margin}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_res, ax_iti = fig.subplots(1, 2, sharey=True)
    base = result["base"]["accuracy"]
    for i, layer in enumerate(result["layers"]):
        points = [p for p in result["residual"] if p["layer"] == layer]
        ax_res.plot([p["alpha"] for p in points], [p["accuracy"] for p in points], marker="o", color=f"C{i}",
                    label=f"layer {layer}")  # fmt: skip
    iti = result["iti"]
    ax_iti.plot([p["alpha"] for p in iti], [p["accuracy"] for p in iti], marker="s", color="C3", label="ITI")
    low, high = result["base"]["ci95"]
    for ax in (ax_res, ax_iti):
        ax.axhline(base, color="grey", lw=1, label="base")
        ax.axhspan(low, high, color="grey", alpha=0.15)
        ax.legend(fontsize=8)
    ax_res.set(xlabel="alpha (x diff-in-means norm)", ylabel="binary MC accuracy (held out)", title="residual")
    ax_iti.set(xlabel="alpha (x head sigma)", title=f"ITI, top {result['iti_heads']} probe heads")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _row(name: str, point: dict[str, Any]) -> str:
    low, high = point["ci95"]
    return f"| {name} | {point['accuracy']:.3f} ({point['correct']}/{point['n']}) | [{low:.3f}, {high:.3f}] | {point['margin']:+.3f} |"


def write_summary(result: dict[str, Any], path: Path) -> Path:
    lines = [
        f"# Truthfulness steering on TruthfulQA binary choice ({result['model']})",
        "",
        f"{result['train']} training questions (honest = best answer, deceptive = best incorrect answer) give the "
        f"diff-in-means directions, the head probes and the head directions; {result['test']} disjoint held-out "
        f"questions are scored: correct when the best answer's total log-likelihood after the chat-formatted "
        f"question beats the best incorrect answer's. 95% Wilson intervals; margin = mean log-likelihood "
        f"difference (nats). Total {result['seconds']:.0f} s.",
        "",
        "| condition | accuracy | 95% interval | margin |",
        "|---|---|---|---|",
        _row("base", result["base"]),
    ]
    for p in result["residual"]:
        lines.append(_row(f"residual, layer {p['layer']}, alpha {p['alpha']:g}", p))
    for p in result["iti"]:
        lines.append(_row(f"ITI, top {result['iti_heads']} heads, alpha {p['alpha']:g}", p))
    lines += ["", f"ITI heads (layer, head): {result['iti_head_list']}", "", "![accuracy](truthfulness.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    layers = args.layers or default_layers(spec_for(model).n_layers)
    train, test = load_questions(Path(args.data), args.train, args.test, args.seed)
    pairs = ContrastivePairs.from_completions(
        [q["Question"] for q in train], [q["Best Answer"] for q in train], [q["Best Incorrect Answer"] for q in train]
    )
    size = args.batch_size
    dirs = directions(model, tokenizer, pairs, method="mean_diff", layers=layers, batch_size=size, progress=False)
    heads = locate(model, tokenizer, pairs, "probe", components="heads")
    head_dirs = head_directions(model, tokenizer, pairs, batch_size=size, progress=False)
    scorer = Scorer(tokenizer, test, size)
    out: dict[str, Any] = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "layers": layers}
    out.update(alphas=args.alphas, iti_alphas=args.iti_alphas, iti_heads=args.iti_heads)
    out.update(train=len(train), test=len(test), seed=args.seed)
    out["base"] = {**scorer.score(model), "n": len(test)}
    residual, iti = [], []
    with tqdm(total=len(layers) * len(args.alphas) + len(args.iti_alphas), desc="steering") as bar:
        for layer in layers:
            for alpha in args.alphas:
                cfg = SteeringConfig.from_directions(dirs, layers=[layer], alpha=alpha * dirs.norms[layer])
                residual.append({"layer": layer, "alpha": alpha, "n": len(test), **scorer.score(model, cfg)})
                bar.update()
        for alpha in args.iti_alphas:
            cfg = SteeringConfig.from_head_probes(heads, head_dirs, top_k=args.iti_heads, alpha=alpha)
            iti.append({"alpha": alpha, "n": len(test), **scorer.score(model, cfg)})
            bar.update()
    chosen = SteeringConfig.from_head_probes(heads, head_dirs, top_k=args.iti_heads, alpha=1.0).head_directions
    out.update(residual=residual, iti=iti, mean_diff_norm={str(k): v for k, v in dirs.norms.items()})
    out["iti_head_list"] = sorted((int(layer), int(h)) for layer, hs in chosen.items() for h in hs)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    out["plot_path"] = plot(out, folder / "truthfulness.png")
    out["seconds"] = time.perf_counter() - started
    out["summary_path"] = write_summary(out, folder / "summary.md")
    json_safe = {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
    (folder / "results.json").write_text(json.dumps(json_safe, indent=1), encoding="utf-8")
    best = max(residual + iti, key=lambda p: p["accuracy"])
    print(f"base {out['base']['accuracy']:.3f}; best steered {best['accuracy']:.3f}; wrote {folder}")
    return out


if __name__ == "__main__":
    main()
