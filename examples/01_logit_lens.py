"""Example 1: at which layer does the model "know" the answer? (logit lens)

Each prompt has a known one-token answer ("The capital of France is" -> " Paris"). ``mi_peft.logit_lens``
decodes every layer's last-token residual stream through the final norm and the unembedding; per prompt
this script reports the answer's rank and probability at every layer, the first layer where the answer is
the top-1 token, the first where it is in the top 10, and the layer from which it stays top-1.

    python examples/01_logit_lens.py                       # embedded SmolLM2-135M-Instruct, 20 prompts
    python examples/01_logit_lens.py --model Qwen/Qwen2.5-0.5B --prompts 10 --out runs/lens-qwen

Writes ``summary.md``, ``lens.png`` and ``results.json`` under ``--out``; ``main(argv)`` returns the numbers.
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

from mi_peft import logit_lens
from mi_peft.models import load_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS_FILE = Path(__file__).resolve().with_name("01_logit_lens_prompts.json")
DEFAULT_OUT = REPO / "runs" / "examples" / "01_logit_lens"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF id or local folder (default: the embedded model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--prompts", type=int, default=None, help="use the first N prompts (default: all)")
    parser.add_argument("--prompts-file", type=Path, default=PROMPTS_FILE, help="JSON list of {prompt, answer}")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat template (default: raw text)")
    return parser.parse_args(argv)


def load_items(path: Path, n: int | None) -> list[dict[str, str]]:
    """``[{"prompt": ..., "answer": ...}]`` from ``path``; the first ``n`` when given."""
    items = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} must hold a non-empty JSON list of {{'prompt': ..., 'answer': ...}} objects.")
    bad = [i for i, r in enumerate(items) if not isinstance(r, dict) or not {"prompt", "answer"} <= set(r)]
    if bad:
        raise ValueError(f"{path}: items {bad[:5]} need both 'prompt' and 'answer' strings.")
    if n is not None and not 1 <= n <= len(items):
        raise ValueError(f"--prompts must be between 1 and {len(items)} (the prompts in {path}), got {n}.")
    return items[:n] if n is not None else items


def lens_curves(model: Any, tokenizer: Any, items: list[dict[str, str]], chat: bool) -> dict[str, Any]:
    """Per prompt and layer: the answer's rank and probability, the final top token, answer token counts."""
    ranks, probs, finals, n_tokens = [], [], [], []
    for item in tqdm(items, desc="logit lens", disable=len(items) < 4):
        lens = logit_lens(model, tokenizer, item["prompt"], targets=[item["answer"]], k=1, chat=chat)
        ranks.append(lens.target_ranks[0, :, 0])
        probs.append(lens.target_probs[0, :, 0])
        finals.append(lens.top_tokens[0][-1][0])
        n_tokens.append(len(tokenizer(item["answer"], add_special_tokens=False)["input_ids"]))
    return {"ranks": torch.stack(ranks), "probs": torch.stack(probs), "final_top": finals, "n_tokens": n_tokens}


def _first(flags: torch.Tensor) -> int | None:
    hits = flags.nonzero()
    return int(hits[0]) if len(hits) else None


def _settled(top1: torch.Tensor) -> int | None:
    """First layer from which the answer stays top-1 through the last layer (None if it is not top-1 at the end)."""
    if not top1[-1]:
        return None
    misses = (~top1).nonzero()
    return int(misses[-1]) + 1 if len(misses) else 0


def summarize(items: list[dict[str, str]], curves: dict[str, Any]) -> dict[str, Any]:
    """Per-prompt layers and the aggregate numbers reported in summary.md."""
    ranks, probs = curves["ranks"], curves["probs"]
    rows = []
    for i, item in enumerate(items):
        rows.append(
            {
                "prompt": item["prompt"],
                "answer": item["answer"],
                "answer_tokens": curves["n_tokens"][i],
                "final_top": curves["final_top"][i],
                "final_rank": int(ranks[i, -1]),
                "final_prob": float(probs[i, -1]),
                "first_top1": _first(ranks[i] == 0),
                "first_top10": _first(ranks[i] < 10),
                "settled_top1": _settled(ranks[i] == 0),
            }
        )
    correct = [r for r in rows if r["final_rank"] == 0]
    firsts = [r["first_top1"] for r in correct]
    tens = [r["first_top10"] for r in rows if r["first_top10"] is not None]
    return {
        "n_prompts": len(rows),
        "n_layers": int(ranks.shape[1]),
        "n_correct": len(correct),
        "median_first_top1": statistics.median(firsts) if firsts else None,
        "median_first_top10": statistics.median(tens) if tens else None,
        "mean_final_prob": float(probs[:, -1].mean()),
        "median_rank_by_layer": ranks.float().quantile(0.5, dim=0).tolist(),
        "mean_prob_by_layer": probs.mean(0).tolist(),
        "rows": rows,
    }


def plot(curves: dict[str, Any], path: Path) -> Path:
    """Answer rank (log scale) and probability across layers: one thin line per prompt, median/mean bold."""
    from matplotlib.figure import Figure

    ranks, probs = curves["ranks"].float(), curves["probs"]
    layers = list(range(ranks.shape[1]))
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_rank, ax_prob = fig.subplots(1, 2)
    for i in range(ranks.shape[0]):
        ax_rank.plot(layers, (ranks[i] + 1).numpy(), color="grey", alpha=0.35, lw=0.8)
        ax_prob.plot(layers, probs[i].numpy(), color="grey", alpha=0.35, lw=0.8)
    ax_rank.plot(layers, (ranks.quantile(0.5, dim=0) + 1).numpy(), color="C0", lw=2.5, marker="o", ms=3, label="median")
    ax_prob.plot(layers, probs.mean(0).numpy(), color="C1", lw=2.5, marker="o", ms=3, label="mean")
    ax_rank.set(yscale="log", xlabel="layer", ylabel="answer rank + 1 (1 = top-1)", title="rank of the answer")
    ax_prob.set(xlabel="layer", ylabel="p(answer)", ylim=(0, 1.02), title="probability of the answer")
    ax_rank.invert_yaxis()
    for ax in (ax_rank, ax_prob):
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _every(n_layers: int, step: int = 5) -> list[int]:
    """Layers shown in the summary's by-layer table: every ``step``-th and the last."""
    return sorted({*range(0, n_layers, step), n_layers - 1})


def write_summary(result: dict[str, Any], path: Path) -> Path:
    def show(value: Any) -> str:
        return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    lines = [
        f"# Logit lens: where does {result['model']} know the answer?",
        "",
        f"{result['n_prompts']} prompts, {result['n_layers']} layers (0 = first decoder layer), "
        f"{result['seconds']:.1f} s. Rank 0 = the layer's top-1 token.",
        "",
        f"- answer top-1 at the last layer: **{result['n_correct']}/{result['n_prompts']}**",
        f"- median first top-1 layer (prompts answered correctly): **{show(result['median_first_top1'])}**",
        f"- median first top-10 layer (all prompts that reach it): **{show(result['median_first_top10'])}**",
        f"- mean p(answer) at the last layer: **{result['mean_final_prob']:.3f}**",
        "",
        "| layer | " + " | ".join(str(layer) for layer in _every(result["n_layers"])) + " |",
        "|---|" + "---|" * len(_every(result["n_layers"])),
        "| median rank | "
        + " | ".join(f"{result['median_rank_by_layer'][i]:g}" for i in _every(result["n_layers"]))
        + " |",
        "| mean p(answer) | "
        + " | ".join(f"{result['mean_prob_by_layer'][i]:.2g}" for i in _every(result["n_layers"]))
        + " |",
        "",
        "| prompt | answer | first top-1 | stays top-1 from | first top-10 | final rank | final p | model's top token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        note = "" if r["answer_tokens"] == 1 else f" ({r['answer_tokens']} tokens: first scored)"
        lines.append(
            f"| {r['prompt']} | {r['answer']!r}{note} | {show(r['first_top1'])} | {show(r['settled_top1'])} | "
            f"{show(r['first_top10'])} | {r['final_rank']} | {r['final_prob']:.3f} | {r['final_top']!r} |"
        )
    lines += ["", f"![answer rank and probability by layer]({result['plot_path'].name})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    items = load_items(args.prompts_file, args.prompts)
    model, tokenizer = load_model(args.model)
    curves = lens_curves(model, tokenizer, items, chat=args.chat)
    result = summarize(items, curves)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["model"] = args.model or "SmolLM2-135M-Instruct (embedded)"
    result["plot_path"] = plot(curves, out / "lens.png")
    result["seconds"] = time.perf_counter() - started
    result["summary_path"] = write_summary(result, out / "summary.md")
    result["ranks"], result["probs"] = curves["ranks"].tolist(), curves["probs"].tolist()
    json_safe = {k: str(v) if isinstance(v, Path) else v for k, v in result.items()}
    (out / "results.json").write_text(json.dumps(json_safe, indent=1), encoding="utf-8")
    print(f"{result['n_correct']}/{result['n_prompts']} answers top-1 at the last layer; wrote {out}")
    return result


if __name__ == "__main__":
    main()
