"""Example 2: head ablation. Do the heads that attend to refusal tokens carry a trained model's refusal?

The embedded SmolLM2-135M-Instruct seldom refuses (a few percent of harmful requests), so it has little refusal
to ablate. The script first makes a refusal-trained model the way ``recipes/refusal.yaml`` does (attribution
patching on harmful/harmless pairs, a sparse adapter on the located MLP neurons at the recipe's parameter budget,
SFT on ``sft_train.jsonl``), or loads such an adapter with ``--adapter`` (e.g. a ``mi-peft run`` output's
``adapters/located_sft_...`` folder). Heads are located on that trained model, the one whose refusal is ablated:

1. Attention screen: ``locate(..., method="attention")`` on harmful prompts followed by the start of a refusal vs
   of a compliant reply (``steer_pairs.json``); a head's score is the attention that the reply's last token pays
   to the refusal tokens (" sorry", " cannot", " can't", " won't"). The 5 highest.
2. Attribution patching with the refusal metric on harmful/harmless pairs: the 5 highest signed scores (heads
   whose activation raises the refusal metric).
3. 5 random heads (``LocalizationResult.select(random=seed)``, uniform over all heads).

Each set is zero-ablated (``mi_peft.capture.ablate``) one head at a time and all 5 together. Refusal rate: greedy
replies to held-out harmful prompts judged by ``mi_peft.evaluate.refusal_rate`` (substring judge), with 95% Wilson
intervals; over-refusal: the same on held-out harmless prompts, with no ablation and with each set's 5 heads.

    python examples/02_head_ablation.py          # trains the adapter first (see examples/README.md for times)
    python examples/02_head_ablation.py --adapter runs/examples/02_head_ablation/adapter   # reuse it

Writes ``summary.md``, ``head_ablation.png``, ``results.json`` (and the trained ``adapter/`` and the head scores
under ``localization/``) under ``--out``; ``main(argv)`` returns the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from mi_peft import ContrastivePairs, LocalizationResult, locate, spec_for
from mi_peft.capture import ablate
from mi_peft.evaluate import refusal_rate
from mi_peft.models import load_model
from mi_peft.recipe import load_recipe
from mi_peft.stats import wilson_interval
from mi_peft.train import sft
from mi_peft.variants import Variant, learning_rate, peft_config

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "refusal.yaml"
DEFAULT_OUT = REPO / "runs" / "examples" / "02_head_ablation"
TARGETS = (" sorry", " cannot", " can't", " won't")  # every refusal opening in steer_pairs.json holds one
SOURCES = ("attention", "attribution", "random")
Heads = list[tuple[int, int]]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=None, help="HF id or local folder (default: the embedded model)")
    add("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    add("--adapter", type=Path, default=None, help="refusal adapter folder to load instead of training one")
    add("--steps", type=int, default=12, help="SFT steps of the refusal adapter (the recipe runs 40)")
    add("--train-pairs", type=int, default=16, help="harmful/harmless pairs that locate the neurons to train")
    add("--locate-pairs", type=int, default=16, help="harmful/harmless pairs for attribution patching of heads")
    add("--attention-pairs", type=int, default=32, help="steer pairs (prompt + reply opening) for the attention screen")
    add("--target-tokens", nargs="+", default=list(TARGETS), help="refusal tokens the attention screen scores")
    add("--heads", type=int, default=5, help="heads per set")
    add("--seed", type=int, default=0, help="seed of the pair subsets, the training run and the random heads")
    add("--harmful", type=int, default=50, help="held-out harmful prompts for the refusal rate")
    add("--harmless", type=int, default=30, help="held-out harmless prompts for over-refusal (0: skip)")
    add("--max-new-tokens", type=int, default=8, help="greedy reply length judged for refusal")
    add("--batch-size", type=int, default=32, help="prompts per generate call")
    args = parser.parse_args(argv)
    for name in ("steps", "train_pairs", "locate_pairs", "attention_pairs", "heads", "harmful", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.harmless < 0 or args.batch_size < 1:
        parser.error("--harmless must be >= 0 and --batch-size >= 1")
    return args


def check_adapter(path: Path | None) -> None:
    """Fail before any model loads when ``--adapter`` is not a PEFT adapter folder; name what is there instead."""
    if path is None or (path / "adapter_config.json").is_file():
        return
    if not path.is_dir():
        raise FileNotFoundError(
            f"--adapter {str(path)!r} does not exist or is not a folder; pass a folder holding adapter_config.json."
        )
    found = sorted(str(p.parent.relative_to(path)) for p in path.glob("*/*/adapter_config.json"))
    hint = f" Adapter folders below it: {', '.join(found[:6])}." if found else ""
    raise FileNotFoundError(f"--adapter {str(path)!r} holds no adapter_config.json.{hint}")


def held_out(recipe: Any, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The first ``--harmful`` / ``--harmless`` held-out prompts (never seen by locating or training)."""
    test = ContrastivePairs.load(recipe.pairs, split="test")
    for name, side in (("harmful", test.positive), ("harmless", test.negative)):
        if getattr(args, name) > len(side):
            raise ValueError(f"--{name} {getattr(args, name)} exceeds the {len(side)} held-out {name} prompts.")
    return test.positive[: args.harmful], test.negative[: args.harmless]


def train_adapter(model: Any, tokenizer: Any, recipe: Any, args: argparse.Namespace, folder: Path) -> tuple:
    """A refusal to ablate: the base model barely refuses, so train the recipe's located sparse SFT adapter first.

    Same locate method, metric, adapter kinds, budget, mode, learning rate, batch, length and precision as
    ``recipes/refusal.yaml`` (via ``mi_peft.variants``); fewer locate pairs and steps, set by the flags.
    """
    tr = recipe.train
    pairs = ContrastivePairs.load(recipe.pairs).subset(args.train_pairs, seed=args.seed)
    located = locate(model, tokenizer, pairs, recipe.locate.method, components=tuple(tr.kinds),
                     metric=recipe.locate.metric, batch_size=recipe.locate.batch_size)  # fmt: skip
    variant = Variant("located")
    config = peft_config(variant, recipe, located, model, args.seed)
    trained = sft(model, tokenizer, recipe.sft, config, output_dir=folder / "adapter", max_steps=args.steps,
                  learning_rate=learning_rate(variant, recipe), batch_size=tr.batch_size, max_length=tr.max_length,
                  seed=args.seed, precision=tr.precision, localization=located)  # fmt: skip
    info = {"source": "trained", "steps": args.steps, "train_pairs": args.train_pairs, "kinds": list(tr.kinds),
            "param_budget": tr.param_budget, "neuron_mode": tr.neuron_mode, "lr": learning_rate(variant, recipe),
            "batch_size": tr.batch_size, "max_length": tr.max_length, "precision": tr.precision,
            "trainable_parameters": trained.trainable_parameters, "losses": trained.losses,
            "train_seconds": trained.train_seconds, "path": "adapter"}  # fmt: skip
    info["neurons"] = sum(len(v) for v in config.neurons.values())
    return trained.model.eval(), info


def refusal_model(model: Any, tokenizer: Any, recipe: Any, args: argparse.Namespace, folder: Path) -> tuple:
    """The model whose refusal is ablated: ``--adapter`` loaded onto the base model, else a freshly trained one."""
    if args.adapter is None:
        return train_adapter(model, tokenizer, recipe, args, folder)
    loaded = PeftModel.from_pretrained(model, str(args.adapter)).eval()
    return loaded, {"source": "loaded", "path": str(args.adapter)}


def locate_heads(model: Any, tokenizer: Any, recipe: Any, args: argparse.Namespace, folder: Path) -> dict:
    """Both head rankings on the refusal-trained model; saved so the selection can be checked later."""
    size = recipe.locate.batch_size
    steer = ContrastivePairs.load(recipe.steer_pairs, prompt_key="prompt")
    steer = steer.subset(args.attention_pairs, seed=args.seed)
    screen = locate(model, tokenizer, steer, "attention", target_tokens=list(args.target_tokens), batch_size=size)
    pairs = ContrastivePairs.load(recipe.pairs).subset(args.locate_pairs, seed=args.seed)
    attribution = locate(model, tokenizer, pairs, "attribution_patching", components="heads",
                         metric=recipe.locate.metric, batch_size=size)  # fmt: skip
    results = {"attention": screen, "attribution": attribution}
    for name, result in results.items():
        result.save(folder / "localization" / name)
    return results


def top_heads(result: LocalizationResult, k: int) -> Heads:
    """The ``k`` highest SIGNED head scores: most attention on the targets, or the strongest push towards refusal.

    ``LocalizationResult.top`` ranks by |score|, which would also pick heads that push refusal down.
    """
    scores = result.scores["heads"]
    flat = scores.flatten().nan_to_num(nan=float("-inf"))
    order = torch.argsort(flat, descending=True, stable=True)[:k].tolist()
    return [(i // scores.shape[1], i % scores.shape[1]) for i in order]


def random_heads(result: LocalizationResult, k: int, seed: int) -> Heads:
    """``k`` heads drawn uniformly by ``select(random=seed)``: the same draw for any result of the same model."""
    chosen = result.select(top_k=k, kinds=("heads",), random=seed)
    return [(layer, head) for layer, heads in sorted(chosen.heads.items()) for head in heads]


class Judge:
    """Refusal rate of the model with some heads zero-ablated, with its interval and per-prompt flags."""

    def __init__(self, model: Any, tokenizer: Any, args: argparse.Namespace) -> None:
        self.model, self.tokenizer, self.args = model, tokenizer, args

    def rate(self, prompts: list[str], heads: Heads) -> dict[str, Any]:
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
        context = ablate(self.model, heads=by_layer) if heads else contextlib.nullcontext()
        with context:
            result = refusal_rate(self.model, self.tokenizer, prompts, max_new_tokens=self.args.max_new_tokens,
                                  batch_size=self.args.batch_size)  # fmt: skip
        refusals = sum(result.flags)
        low, high = wilson_interval(refusals, result.n)
        return {"heads": [list(h) for h in heads], "rate": result.rate, "refusals": refusals, "n": result.n,
                "ci95": [low, high], "flags": result.flags, "generations": result.generations}  # fmt: skip


def sweep(judge: Judge, head_sets: dict[str, Heads], harmful: list[str], harmless: list[str]) -> dict[str, Any]:
    """No ablation, then each head alone and all together for every set; over-refusal for none and each "all"."""
    total = 1 + sum(len(heads) + 1 for heads in head_sets.values()) + (1 + len(head_sets)) * bool(harmless)
    with tqdm(total=total, desc="ablations") as bar:
        clean = judge.rate(harmful, [])
        bar.update()
        ablations = {}
        for source, heads in head_sets.items():
            single = []
            for head in heads:
                single.append(_compared(judge.rate(harmful, [head]), clean))
                bar.update()
            ablations[source] = {"single": single, "all": _compared(judge.rate(harmful, heads), clean)}
            bar.update()
        over = None
        if harmless:
            over = {"none": judge.rate(harmless, [])}
            bar.update()
            for source, heads in head_sets.items():
                over[source] = _compared(judge.rate(harmless, heads), over["none"])
                bar.update()
    return {"clean": clean, "ablations": ablations, "over_refusal": over}


def _compared(point: dict[str, Any], clean: dict[str, Any]) -> dict[str, Any]:
    """Paired comparison on the same prompts: rate change and how many refusals were lost or gained."""
    pairs = list(zip(clean["flags"], point["flags"], strict=True))
    point["change"] = point["rate"] - clean["rate"]
    point["lost"] = sum(before and not after for before, after in pairs)
    point["gained"] = sum(after and not before for before, after in pairs)
    return point


def head_scores(results: dict[str, LocalizationResult], head_sets: dict[str, Heads]) -> dict[str, list[list[float]]]:
    """Each selected head's attention score and attribution score (both methods, whichever picked it)."""
    return {
        source: [[float(results[m].scores["heads"][layer, head]) for m in ("attention", "attribution")]
                 for layer, head in heads]
        for source, heads in head_sets.items()
    }  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: one group per head source, its single-head ablations then "all 5"; the unablated rate as a band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax = fig.subplots()
    clean = result["clean"]
    ax.axhline(clean["rate"], color="grey", lw=1, label=f"no ablation ({clean['rate']:.2f})")
    ax.axhspan(*clean["ci95"], color="grey", alpha=0.15)
    ticks, labels, x = [], [], 0.0
    for i, source in enumerate(SOURCES):
        entry = result["ablations"][source]
        points = [*entry["single"], entry["all"]]
        names = [_head_name(p["heads"][0]) for p in entry["single"]] + [f"all {len(entry['all']['heads'])}"]
        for j, (point, name) in enumerate(zip(points, names, strict=True)):
            err = [[point["rate"] - point["ci95"][0]], [point["ci95"][1] - point["rate"]]]
            last = j == len(points) - 1
            ax.bar(x, point["rate"], yerr=err, color=f"C{i}", alpha=1.0 if last else 0.55, capsize=2,
                   edgecolor="black" if last else None, label=source if last else None)  # fmt: skip
            ticks.append(x)
            labels.append(name)
            x += 1
        x += 0.8
    ax.set_xticks(ticks, labels, rotation=60, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel=f"refusal rate (n={clean['n']} held-out harmful)",
           title="zero-ablating heads of the refusal-trained model: single heads, then all together")  # fmt: skip
    fig.legend(fontsize=8, loc="outside lower center", ncols=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _head_name(head: Sequence[int]) -> str:
    return f"L{head[0]}.H{head[1]}"


def _rate_cells(point: dict[str, Any]) -> str:
    low, high = point["ci95"]
    return f"{point['rate']:.3f} ({point['refusals']}/{point['n']}) | [{low:.3f}, {high:.3f}]"


def _table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| heads ablated | attention score | attribution score | refusal rate | 95% Wilson interval | change | "
        "refusals lost / gained |",
        "|---|---|---|---|---|---|---|",
        f"| none | | | {_rate_cells(result['clean'])} | | |",
    ]
    for source in SOURCES:
        entry, scores = result["ablations"][source], result["head_scores"][source]
        for point, (attn, attr) in zip(entry["single"], scores, strict=True):
            lines.append(f"| {source}: {_head_name(point['heads'][0])} | {attn:.3f} | {attr:+.3f} | "
                         f"{_rate_cells(point)} | {point['change']:+.3f} | {point['lost']} / {point['gained']} |")  # fmt: skip
        point = entry["all"]
        lines.append(f"| {source}: **all {len(point['heads'])}** | | | {_rate_cells(point)} | "
                     f"{point['change']:+.3f} | {point['lost']} / {point['gained']} |")  # fmt: skip
    return lines


def _over_refusal(result: dict[str, Any]) -> list[str]:
    over = result["over_refusal"]
    if over is None:
        return []
    lines = ["", f"Over-refusal on {over['none']['n']} held-out harmless prompts:", "",
             "| heads ablated | refusal rate | 95% Wilson interval | change |", "|---|---|---|---|",
             f"| none | {_rate_cells(over['none'])} | |"]  # fmt: skip
    for source in SOURCES:
        point = over[source]
        lines.append(f"| {source}: all {len(point['heads'])} | {_rate_cells(point)} | {point['change']:+.3f} |")
    return lines


def write_summary(result: dict[str, Any], path: Path) -> Path:
    adapter, k = result["adapter"], result["k"]
    if adapter["source"] == "trained":
        made = (f"a located sparse adapter trained here as `recipes/refusal.yaml` does ({adapter['neurons']} MLP "
                f"neurons located by attribution patching on {adapter['train_pairs']} pairs, "
                f"{adapter['trainable_parameters']:,} trainable parameters, {adapter['steps']} SFT steps; "
                f"saved in `adapter/`)")  # fmt: skip
    else:
        made = f"the adapter loaded from `{adapter['path']}`"
    overlap = result["overlap"]["attention_attribution"]
    lines = [
        f"# Head ablation of refusal ({result['model']})",
        "",
        f"The base model seldom refuses, so the heads are located on, and ablated in, a refusal-trained model: "
        f"{made}. Attention screen: attention from the last token of a harmful prompt + refusal opening to the "
        f"tokens {', '.join(repr(t) for t in result['target_tokens'])} ({result['attention_pairs']} steer pairs, "
        f"minus the same on compliant openings). Attribution patching: refusal metric, {result['locate_pairs']} "
        f"harmful/harmless pairs, top {k} by signed score. Random: {k} heads drawn with seed {result['seed']}. "
        f"Refusal: substring judge on the first {result['max_new_tokens']} greedy tokens of the reply to "
        f"{result['clean']['n']} held-out harmful prompts; change = ablated - none; lost / gained = prompts "
        f"refused without ablation but not with it / the reverse. Total {result['seconds']:.0f} s.",
        "",
        *_table(result),
        *_over_refusal(result),
        "",
        f"Overlap of the attention and attribution top {k}: {len(overlap)}/{k}"
        + (f" ({', '.join(_head_name(h) for h in overlap)})." if overlap else "."),
        f"Random heads: {', '.join(_head_name(h) for h in result['heads']['random'])}.",
        "",
        "![refusal rate under head ablation](head_ablation.png)",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _overlaps(head_sets: dict[str, Heads]) -> dict[str, list[list[int]]]:
    pairs = (("attention", "attribution"), ("random", "attention"), ("random", "attribution"))
    return {f"{a}_{b}": sorted([list(h) for h in set(head_sets[a]) & set(head_sets[b])]) for a, b in pairs}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_adapter(args.adapter)
    started, timings = time.perf_counter(), {}
    recipe = load_recipe(RECIPE)
    harmful, harmless = held_out(recipe, args)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    n_heads = spec_for(model).n_layers * spec_for(model).n_heads
    if args.heads > n_heads:
        raise ValueError(f"--heads {args.heads} exceeds the model's {n_heads} attention heads.")
    model, adapter = refusal_model(model, tokenizer, recipe, args, folder)
    timings["adapter"] = time.perf_counter() - started
    results = locate_heads(model, tokenizer, recipe, args, folder)
    timings["locate_heads"] = time.perf_counter() - started - timings["adapter"]
    head_sets = {source: top_heads(results[source], args.heads) for source in ("attention", "attribution")}
    head_sets["random"] = random_heads(results["attribution"], args.heads, args.seed)
    out: dict[str, Any] = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "adapter": adapter}
    out.update(k=args.heads, seed=args.seed, target_tokens=list(args.target_tokens), max_new_tokens=args.max_new_tokens)
    out.update(attention_pairs=args.attention_pairs, locate_pairs=args.locate_pairs)
    out["heads"] = {source: [list(h) for h in heads] for source, heads in head_sets.items()}
    out["head_scores"], out["overlap"] = head_scores(results, head_sets), _overlaps(head_sets)
    out.update(sweep(Judge(model, tokenizer, args), head_sets, harmful, harmless))
    timings["ablations"] = time.perf_counter() - started - timings["adapter"] - timings["locate_heads"]
    out["plot_path"] = plot(out, folder / "head_ablation.png")
    out["seconds"], out["timings"] = time.perf_counter() - started, timings
    out["summary_path"] = write_summary(out, folder / "summary.md")
    json_safe = {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}
    (folder / "results.json").write_text(json.dumps(json_safe, indent=1), encoding="utf-8")
    alls = ", ".join(f"{s} {out['ablations'][s]['all']['rate']:.3f}" for s in SOURCES)
    print(f"refusal {out['clean']['rate']:.3f} without ablation; all {args.heads} ablated: {alls}; wrote {folder}")
    return out


if __name__ == "__main__":
    main()
