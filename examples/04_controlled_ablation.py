"""Example 4: controlled ablation. Do the located refusal components matter more than random ones, and at what cost?

1. Locate: attribution patching with the refusal metric on harmful vs harmless pairs (``recipes/data/refusal``),
   as ``recipes/refusal.yaml`` does, scoring every head and MLP neuron.
2. Zero-ablate the top-k located components for growing k (``mi_peft.capture.ablate``, the hooks the recipe's
   causal validation uses), and as a control k random components (the same number of heads and of neurons,
   drawn uniformly by ``LocalizationResult.select(random=seed)``).
3. Measure the behaviour metric drop (mean refusal metric on held-out harmful prompts, clean minus ablated:
   > 0 means less refusal) and the loss of general ability (WikiText-2 perplexity increase; optionally
   PIQA/BLiMP accuracy at the largest k).

By default components are ranked by their SIGNED score (``--rank signed``): the ones whose harmful-run
activation pushes the refusal metric up. Ranking by |score| (``--rank abs``, what ``select`` does) mixes
refusal-promoting and refusal-suppressing components, whose zero-ablation effects partly cancel.

    python examples/04_controlled_ablation.py              # embedded model: 8.6 min on 2 shared CPU cores
    python examples/04_controlled_ablation.py --ks 20 --random-seeds 1 --piqa 32 --blimp 1   # + PIQA/BLiMP

Writes ``summary.md``, ``ablation.png`` and ``results.json`` under ``--out``; ``main(argv)`` returns the numbers.
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
from tqdm.auto import tqdm

from mi_peft import ContrastivePairs, locate
from mi_peft.capture import ablate
from mi_peft.data import format_prompts, tokenize
from mi_peft.evaluate.general import blimp_accuracy, piqa_accuracy, text_perplexity
from mi_peft.locate import LocalizationResult
from mi_peft.locate.magnitude import keep_one
from mi_peft.metrics import get_metric
from mi_peft.models import load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "recipes" / "data" / "refusal"
DEFAULT_OUT = REPO / "runs" / "examples" / "04_controlled_ablation"
KINDS = ("heads", "neurons")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="refusal pairs folder (harmful/harmless)")
    parser.add_argument("--pairs", type=int, default=16, help="training pairs used to locate")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out harmful prompts for the metric")
    parser.add_argument("--ks", default="1,5,20", help="comma-separated numbers of components to ablate")
    parser.add_argument("--random-seeds", type=int, default=2, help="random control draws per k")
    parser.add_argument("--rank", choices=("signed", "abs"), default="signed", help="rank by signed score or |score|")
    parser.add_argument("--ppl-texts", type=int, default=4, help="WikiText-2 paragraphs (<= 128 tokens each)")
    parser.add_argument("--piqa", type=int, default=0, help="PIQA goals at clean and the largest k (0: skip)")
    parser.add_argument("--blimp", type=int, default=0, help="BLiMP pairs per phenomenon, same points (0: skip)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    args.ks = parse_ks(args.ks)
    for name in ("pairs", "eval_prompts", "random_seeds", "ppl_texts", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return args


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise ValueError(f"--ks must be comma-separated positive integers such as 1,2,5, got {text!r}.") from err
    if not ks or ks[0] < 1:
        raise ValueError(f"--ks must be comma-separated positive integers such as 1,2,5, got {text!r}.")
    return ks


def ranking(result: LocalizationResult, rank: str) -> LocalizationResult:
    """The located scores to rank by: signed (negative scores set to 0, so they rank last) or as they are."""
    if rank == "abs":
        return result
    scores = {k: result.scores[k].clamp_min(0) for k in KINDS}
    return LocalizationResult(scores=scores, spec=result.spec, method=result.method, metric=result.metric)


class Probe:
    """The two numbers measured under every ablation: behaviour metric and perplexity (plus optional PIQA/BLiMP)."""

    def __init__(self, model: Any, tokenizer: Any, prompts: list[str], args: argparse.Namespace) -> None:
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.metric = get_metric("refusal", tokenizer)
        texts = format_prompts(tokenizer, prompts)
        size = args.batch_size
        self.batches = [tokenize(tokenizer, texts[i : i + size]) for i in range(0, len(texts), size)]

    def behaviour(self) -> float:
        values = []
        with torch.no_grad():
            for batch in self.batches:
                values.append(self.metric(self.model(**batch, **keep_one(self.model)).logits, batch))
        return float(torch.cat(values).mean())

    def measure(self, general: bool = False) -> dict[str, float]:
        out = {"metric": self.behaviour()}
        out["perplexity"] = text_perplexity(self.model, self.tokenizer, n_texts=self.args.ppl_texts)
        if general and self.args.piqa > 0:
            out["piqa"] = piqa_accuracy(self.model, self.tokenizer, n=self.args.piqa).accuracy
        if general and self.args.blimp > 0:
            out["blimp"] = blimp_accuracy(self.model, self.tokenizer, n_per_phenomenon=self.args.blimp).accuracy
        return out

    def ablated(self, components: Any, general: bool = False) -> dict[str, float]:
        with ablate(self.model, heads=components.heads or None, neurons=components.neurons or None):
            return self.measure(general)


def _point(k: int, comps: Any, measured: dict[str, float], clean: dict[str, float]) -> dict[str, Any]:
    point = {"k": k, "heads": sum(map(len, comps.heads.values())), "neurons": sum(map(len, comps.neurons.values()))}
    point.update(measured)
    point["components"] = comps.to_dict()
    point["metric_drop"] = clean["metric"] - measured["metric"]
    point["ppl_increase"] = measured["perplexity"] - clean["perplexity"]
    for name in ("piqa", "blimp"):
        if name in measured:
            point[f"{name}_drop"] = clean[name] - measured[name]
    return point


def sweep(probe: Probe, ranked: LocalizationResult, args: argparse.Namespace, clean: dict[str, float]) -> dict:
    """Located and random ablations for every k: one progress step per measured condition."""
    located, random = [], []
    last = args.ks[-1]
    with tqdm(total=len(args.ks) * (1 + args.random_seeds), desc="ablations") as bar:
        for k in args.ks:
            comps = ranked.select(top_k=k, kinds=KINDS)
            located.append(_point(k, comps, probe.ablated(comps, general=k == last), clean))
            bar.update()
            draws = []
            for seed in range(args.random_seeds):
                control = ranked.select(top_k=k, kinds=KINDS, random=seed)
                draws.append(_point(k, control, probe.ablated(control, general=k == last and seed == 0), clean))
                bar.update()
            random.append(_mean_point(k, draws))
    return {"located": located, "random": random}


def _mean_point(k: int, draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over random draws of each number, keeping the draws themselves."""
    keys = [key for key in draws[0] if key not in ("k", "components") and all(key in d for d in draws)]
    point: dict[str, Any] = {"k": k, **{key: statistics.fmean(d[key] for d in draws) for key in keys}}
    point["draws"] = draws
    return point


def plot(result: dict[str, Any], path: Path) -> Path:
    """Metric drop against perplexity increase (one point per k), and each against k."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_trade, ax_metric, ax_ppl = fig.subplots(1, 3)
    for name, color in (("located", "C3"), ("random", "C0")):
        points = result[name]
        ks = [p["k"] for p in points]
        drops, ppl = [p["metric_drop"] for p in points], [p["ppl_increase"] for p in points]
        ax_trade.plot(ppl, drops, marker="o", color=color, label=name)
        for k, x, y in zip(ks, ppl, drops, strict=True):
            ax_trade.annotate(f"k={k}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax_metric.plot(ks, drops, marker="o", color=color, label=name)
        ax_ppl.plot(ks, ppl, marker="o", color=color, label=name)
        if name == "random":
            for p in points:
                ax_trade.scatter([d["ppl_increase"] for d in p["draws"]], [d["metric_drop"] for d in p["draws"]],
                                 s=10, color=color, alpha=0.4)  # fmt: skip
    ax_trade.set(xlabel="perplexity increase (WikiText-2)", ylabel="refusal metric drop", title="drop vs cost")
    ax_metric.set(xscale="log", xlabel="k ablated", ylabel="refusal metric drop", title="behaviour")
    ax_ppl.set(xscale="log", xlabel="k ablated", ylabel="perplexity increase", title="general ability")
    for ax in (ax_trade, ax_metric, ax_ppl):
        ax.axhline(0, color="grey", lw=0.6)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_summary(result: dict[str, Any], path: Path) -> Path:
    clean, n_draws = result["clean"], result["random_seeds"]
    lines = [
        f"# Controlled ablation of refusal components ({result['model']})",
        "",
        f"Located by attribution patching (refusal metric) on {result['pairs']} harmful/harmless pairs, ranked by "
        f"{result['rank']} score; zero-ablated top-k vs k random components (mean of {n_draws} "
        f"draw{'s' if n_draws > 1 else ''}, same number "
        f"of heads and neurons). Metric: mean refusal metric on {result['eval_prompts']} held-out harmful prompts, "
        f"clean **{clean['metric']:.3f}**; drop = clean - ablated (> 0: less refusal). Perplexity: "
        f"{result['ppl_texts']} WikiText-2 paragraphs, clean **{clean['perplexity']:.2f}**. "
        f"Total {result['seconds']:.0f} s (locate {result['locate_seconds']:.0f} s).",
        "",
        "| k | heads + neurons | located: metric drop | located: ppl increase | random: metric drop | "
        "random: ppl increase | random draws (drop / ppl) |",
        "|---|---|---|---|---|---|---|",
    ]
    for loc, rnd in zip(result["located"], result["random"], strict=True):
        draws = ", ".join(f"{d['metric_drop']:+.3f} / {d['ppl_increase']:+.2f}" for d in rnd["draws"])
        lines.append(
            f"| {loc['k']} | {loc['heads']} + {loc['neurons']} | {loc['metric_drop']:+.3f} | "
            f"{loc['ppl_increase']:+.2f} | {rnd['metric_drop']:+.3f} | {rnd['ppl_increase']:+.2f} | {draws} |"
        )
    for name, label in (("piqa", "PIQA"), ("blimp", "BLiMP")):
        if name in clean:
            loc, rnd = result["located"][-1], result["random"][-1]["draws"][0]
            lines.append(
                f"\n{label} accuracy at k={loc['k']}: clean {clean[name]:.3f}, located {loc[name]:.3f}, "
                f"random (draw 0) {rnd[name]:.3f}."
            )
    lines += ["", "![metric drop vs perplexity increase](ablation.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    pairs = ContrastivePairs.load(args.data).subset(args.pairs)
    held_out = ContrastivePairs.load(args.data, split="test").positive
    if args.eval_prompts > len(held_out):
        raise ValueError(f"--eval-prompts {args.eval_prompts} exceeds the {len(held_out)} held-out harmful prompts.")
    result = locate(model, tokenizer, pairs, "attribution_patching", components=KINDS, metric="refusal")
    locate_seconds = time.perf_counter() - started
    probe = Probe(model, tokenizer, held_out[: args.eval_prompts], args)
    clean = probe.measure(general=True)
    out = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "clean": clean, "ks": args.ks}
    out.update({name: getattr(args, name) for name in ("pairs", "eval_prompts", "random_seeds", "rank", "ppl_texts")})
    out.update(sweep(probe, ranking(result, args.rank), args, clean))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    out["plot_path"] = plot(out, folder / "ablation.png")
    out["seconds"], out["locate_seconds"] = time.perf_counter() - started, locate_seconds
    out["summary_path"] = write_summary(out, folder / "summary.md")
    json_safe = {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
    (folder / "results.json").write_text(json.dumps(json_safe, indent=1), encoding="utf-8")
    top, rnd = out["located"][-1], out["random"][-1]
    print(f"k={top['k']}: located drop {top['metric_drop']:+.3f} (ppl {top['ppl_increase']:+.2f}), "
          f"random {rnd['metric_drop']:+.3f} (ppl {rnd['ppl_increase']:+.2f}); wrote {folder}")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
