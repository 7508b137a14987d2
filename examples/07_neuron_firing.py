"""Example 7: do the located language neurons fire where the model decides the language of its reply?

``recipes/language.yaml`` locates French neurons with LAPE (neurons that fire on French text and rarely on
English) and trains their output columns (``neuron_mode: out``). A down-projection column's gradient at a token
is the neuron's activation there, so a neuron that is silent at the last token of an English instruction, where
the first reply token and with it the reply's language is chosen, gets little training signal from that choice.
This example measures how often each selected set fires there:

1. Locate: LAPE on French vs English MGSM questions (``recipes/data/language``), as the recipe does.
2. Select the located neurons at the recipe's budget and ``--random-seeds`` random sets of the same size.
3. Firing share (LAPE's test, gate > 0: :func:`mi_peft.locate.magnitude.gate_open`) of each set at the last
   prompt token of held-out English instructions (chat template), on all their tokens, and on the French
   replies of the recipe's SFT rows.

    python examples/07_neuron_firing.py          # embedded model: about 2 min on 2 CPU cores
    python examples/07_neuron_firing.py --localization runs/language-gradient/localization  # any saved result

Writes ``summary.md``, ``firing.png`` and ``results.json`` under ``--out``; ``main(argv)`` returns the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mi_peft import ContrastivePairs, LocalizationResult, locate
from mi_peft.data import format_prompts, tokenize
from mi_peft.data_files import read_rows, read_texts
from mi_peft.locate.magnitude import gate_open
from mi_peft.models import load_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "recipes" / "data" / "language"
DEFAULT_OUT = REPO / "runs" / "examples" / "07_neuron_firing"
PLACES = ("instruction, last token", "instruction, all tokens", "French reply")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--pairs", type=int, default=64, help="French/English pairs used to locate")
    parser.add_argument("--prompts", type=int, default=64, help="held-out English instructions (and French replies)")
    parser.add_argument("--budget", type=float, default=0.0013, help="parameter budget of the selection (out mode)")
    parser.add_argument("--random-seeds", type=int, default=3, help="random sets of the same size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--localization", type=Path, default=None, help="a saved LocalizationResult to select from instead of LAPE"
    )
    args = parser.parse_args(argv)
    for name in ("pairs", "prompts", "random_seeds", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not 0 < args.budget < 1:
        parser.error(f"--budget is a fraction of the model's parameters in (0, 1), got {args.budget}")
    return args


def firing_shares(model: Any, tokenizer: Any, texts: list[str], positions: str, batch_size: int) -> torch.Tensor:
    """``[n_layers * n_neurons]``: share of the texts' tokens at ``positions`` where each neuron fires."""
    fired, tokens = 0.0, 0.0
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start : start + batch_size])
        open_, weight = gate_open(model, batch, positions)
        fired = fired + (open_ * weight[..., None]).sum((0, 1))
        tokens += float(weight.sum())
    return fired / tokens


def set_shares(shares: dict[str, torch.Tensor], components: Any, n_neurons: int) -> dict[str, float]:
    """Mean firing share of the neurons in ``components`` at each place."""
    flat = torch.tensor([layer * n_neurons + i for layer, idx in components.neurons.items() for i in idx])
    return {place: float(values[flat].mean()) for place, values in shares.items()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    if args.localization is None:
        pairs = ContrastivePairs.load(DATA).subset(args.pairs, seed=0)
        result = locate(model, tokenizer, pairs, method="lape", components=("neurons",), positions="all", progress=True)
    else:
        result = LocalizationResult.load(args.localization, model=model)  # refuses a result of another model
    instructions = read_texts(DATA / "instructions_test.json")[: args.prompts]
    replies = [row["completion"][-1]["content"] for row in read_rows(DATA / "sft_train.jsonl")][: args.prompts]
    prompts = format_prompts(tokenizer, instructions)
    shares = {
        PLACES[0]: firing_shares(model, tokenizer, prompts, "last", args.batch_size),
        PLACES[1]: firing_shares(model, tokenizer, prompts, "all", args.batch_size),
        PLACES[2]: firing_shares(model, tokenizer, replies, "all", args.batch_size),
    }
    n_neurons = result.spec.n_neurons
    located = result.select(param_budget=args.budget, kinds=("neurons",), neuron_mode="out")
    draws = [
        set_shares(shares, result.select(param_budget=args.budget, kinds=("neurons",), random=seed), n_neurons)
        for seed in range(args.random_seeds)
    ]
    return {
        "model": args.model or "embedded SmolLM2-135M-Instruct",
        "method": result.method,
        "pairs": result.extra.get("n_pairs", result.extra.get("n_prompts")),
        "prompts": len(instructions),
        "replies": len(replies),
        "budget": args.budget,
        "n_located": sum(map(len, located.neurons.values())),
        "located": set_shares(shares, located, n_neurons),
        "random": {place: statistics.fmean(d[place] for d in draws) for place in PLACES},
        "random_draws": draws,
        "all_neurons": {place: float(values.mean()) for place, values in shares.items()},
        "located_neurons": {str(layer): idx for layer, idx in located.neurons.items()},
        "seconds": time.perf_counter() - started,
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.27
    for i, (name, color) in enumerate((("located", "C3"), ("random", "C0"), ("all_neurons", "grey"))):
        xs = [j + (i - 1) * width for j in range(len(PLACES))]
        ax.bar(xs, [result[name][p] for p in PLACES], width, color=color, label=name.replace("_", " "))
    ax.set_xticks(range(len(PLACES)), PLACES)
    ax.set(ylabel="share of tokens where the neuron fires", title="gate > 0 (LAPE's firing test)")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_summary(result: dict[str, Any], path: Path) -> Path:
    lines = [
        f"# Where do the located language neurons fire? ({result['model']})",
        "",
        f"`{result['method']}` on {result['pairs']} pairs; {result['n_located']} located neurons at budget "
        f"{result['budget']} (output columns), vs {len(result['random_draws'])} random sets of the same size. "
        f"Firing share = share of tokens with gate > 0, on {result['prompts']} held-out English instructions and "
        f"{result['replies']} French SFT replies. Total {result['seconds']:.0f} s.",
        "",
        "| neurons | " + " | ".join(PLACES) + " |",
        "|---|" + "---|" * len(PLACES),
    ]
    for name in ("located", "random", "all_neurons"):
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{result[name][p]:.3f}" for p in PLACES) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure(args)
    write_summary(result, args.out / "summary.md")
    plot(result, args.out / "firing.png")
    (args.out / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    return result


if __name__ == "__main__":
    main()
