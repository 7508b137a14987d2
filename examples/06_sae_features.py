"""Example 6: SAE features for refusal: train an SAE, locate refusal latents, explain them, steer with them.

1. Train a BatchTopK sparse autoencoder (sae-lens's trainer) on one middle layer's residual stream, on
   WikiText-2 (``../shared/data/text/wikitext-2``) mixed with chat-formatted recipe prompts; cached, so a
   rerun loads it. Report its reconstruction: fraction of variance unexplained, L0, dead latents, and the
   next-token loss increase when the reconstruction replaces the activation.
2. Locate latents that fire more on harmful than on harmless prompts (``recipes/data/refusal``): the ``"sae"``
   kind of ``mi_peft.locate`` (``method="mean_diff"``; ``--method attribution_patching`` for the gradient estimate).
3. Explain the top five: tokens and contexts that activate them most, tokens their decoder rows promote.
4. Steer with them as a PEFT adapter (add their decoder rows; or clamp them) and compare with diff-in-means
   steering of the same norm at the same layer: the refusal metric on held-out harmless prompts (target)
   and the next-token loss on WikiText (side effect).

    python examples/06_sae_features.py                      # embedded SmolLM2-135M-Instruct, sized for 2 CPU cores
    python examples/06_sae_features.py --model Qwen/Qwen2.5-0.5B-Instruct --tokens 200000 --width 8192

Writes ``summary.md``, ``sae_features.png`` and ``results.json`` under ``--out``; ``main(argv)`` returns the numbers.
Needs ``pip install 'mi-peft[sae]'``.
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

from mi_peft import ContrastivePairs, SteeringConfig, directions, locate, sae, spec_for
from mi_peft.data import format_prompts, read_texts, tokenize
from mi_peft.evaluate.general import load_paragraphs
from mi_peft.metrics import get_metric
from mi_peft.models import load_model

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = SHARED / "text" / "wikitext-2"
EXCERPT = REPO / "recipes" / "data" / "general" / "wikitext2_test_excerpt.txt"
REFUSAL = REPO / "recipes" / "data" / "refusal"
DEFAULT_OUT = REPO / "runs" / "examples" / "06_sae_features"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=None, help="HF id or local folder (default: the embedded model)")
    add("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    add("--layer", type=int, default=None, help="decoder layer the SAE reads (default: the middle one)")
    add("--width", type=int, default=2048, help="SAE latents (d_sae)")
    add("--k", type=int, default=32, help="mean active latents per token (BatchTopK)")
    add("--tokens", type=int, default=40_000, help="residual-stream activations to train on")
    add("--epochs", type=int, default=3, help="passes over the activations")
    add("--lr", type=float, default=3e-3, help="SAE learning rate (Adam)")
    add("--pairs", type=int, default=32, help="refusal pairs used to locate latents")
    add("--method", default="mean_diff", choices=sorted(sae.SAE_METHODS), help="how latents are scored")
    add("--eval-prompts", type=int, default=16, help="held-out harmless prompts for the steering metric")
    add(
        "--eval-texts", type=int, default=24, help="WikiText test paragraphs for reconstruction (first 4: side effects)"
    )
    add("--multipliers", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="steering norm in diff-in-means units")
    add("--no-cache", action="store_true", help="retrain the SAE even if a cached one exists")
    return parser.parse_args(argv)


def load_corpus() -> tuple[list[str], list[str], str]:
    """(train paragraphs, eval paragraphs, source): WikiText-2 valid/test, else the shipped test excerpt."""
    if (WIKITEXT / "valid.txt").is_file() and (WIKITEXT / "test.txt").is_file():
        return load_paragraphs(WIKITEXT / "valid.txt"), load_paragraphs(WIKITEXT / "test.txt"), str(WIKITEXT)
    paragraphs = load_paragraphs(EXCERPT)
    half = len(paragraphs) // 2
    return paragraphs[:half], paragraphs[half:], f"{EXCERPT} ({WIKITEXT} missing)"


def mean_metric(model: Any, tokenizer: Any, prompts: list[str], metric: Any) -> float:
    """Mean refusal metric over chat-formatted ``prompts`` (last-token logits)."""
    values = []
    for start in range(0, len(prompts), 8):
        batch = tokenize(tokenizer, prompts[start : start + 8])
        with torch.no_grad():
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}, logits_to_keep=1).logits
        values.append(metric(logits, batch).float().cpu())
    return float(torch.cat(values).mean())


def mean_loss(model: Any, tokenizer: Any, texts: list[str], max_length: int = 128) -> float:
    """Mean next-token loss (nats) over ``texts`` cut to their last ``max_length`` tokens."""
    total, count = 0.0, 0
    for start in range(0, len(texts), 4):
        batch = {k: v.to(model.device) for k, v in tokenize(tokenizer, texts[start : start + 4], max_length).items()}
        with torch.no_grad():
            logits = model(**batch).logits[:, :-1].float()
        mask = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).flatten()
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none"
        )
        total, count = total + float((nll * mask).sum()), count + int(mask.sum())
    return total / max(count, 1)


def measure(model: Any, config: Any, data: dict[str, Any]) -> dict[str, float]:
    """Target metric and side-effect loss with ``config`` applied (``None``: the base model); unloads after."""
    steered = model if config is None else get_peft_model(model, config)
    try:
        return {
            "metric": mean_metric(steered, data["tokenizer"], data["prompts"], data["metric"]),
            "loss": mean_loss(steered, data["tokenizer"], data["texts"]),
        }
    finally:
        if config is not None:
            steered.unload()


def steering_table(
    model: Any, site: Any, result: Any, top: list[int], data: dict[str, Any], pairs: Any, m: list[float]
):
    """Rows (method, multiplier, metric shift, loss increase) for SAE add, SAE clamp and diff-in-means."""
    layer = site.layer
    dim = directions(model, data["tokenizer"], pairs, layers=[layer], progress=False)
    dim_norm = dim.norms[layer]
    weights = result.scores["sae"][layer, top].clamp_min(0)
    mean_positive = sae.latent_stats(result, layer)["mean_positive"]
    rows_of = site.sae.W_dec[torch.tensor(top, device=site.sae.W_dec.device)].detach().float().cpu()
    sae_vec = weights @ rows_of
    cosine = float(torch.nn.functional.cosine_similarity(sae_vec, dim.vectors[layer].float(), dim=0))
    base = measure(model, None, data)
    rows = []
    for mult in m:
        scale = mult * dim_norm / float(sae_vec.norm())
        configs = {
            "SAE add (top-5 latents)": sae.SAESteeringConfig.from_sae(
                site, top, op="add", alpha=(weights * scale).tolist()
            ),
            "SAE clamp (top-5 latents)": sae.SAESteeringConfig.from_sae(
                site, top, op="clamp", value=[mult * float(mean_positive[i]) for i in top]
            ),
            "diff-in-means": SteeringConfig.from_directions(dim, layers=[layer], alpha=mult * dim_norm),
        }
        for name, config in configs.items():
            got = measure(model, config, data)
            rows.append(
                {
                    "method": name,
                    "multiplier": mult,
                    "metric_shift": got["metric"] - base["metric"],
                    "loss_increase": got["loss"] - base["loss"],
                }
            )
    return {"base": base, "rows": rows, "cosine_sae_vs_dim": cosine, "dim_norm": dim_norm}


def plot(result: Any, steer: dict[str, Any], path: Path) -> Path:
    """Latent scores (top 30) and, per multiplier, metric shift and loss increase of each steering method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), layout="constrained")
    ax_lat, ax_metric, ax_loss = fig.subplots(1, 3)
    top = result.top("sae", 30, sign="positive")
    ax_lat.bar(range(len(top)), [s for _, s in top], color="C0")
    ax_lat.set(xlabel="rank (latent ids in summary.md)", ylabel=f"{result.method} score", title="top latents")
    for i, name in enumerate(dict.fromkeys(r["method"] for r in steer["rows"])):
        mine = [r for r in steer["rows"] if r["method"] == name]
        mults = [r["multiplier"] for r in mine]
        ax_metric.plot(mults, [r["metric_shift"] for r in mine], marker="o", color=f"C{i + 1}", label=name)
        ax_loss.plot(mults, [r["loss_increase"] for r in mine], marker="o", color=f"C{i + 1}", label=name)
    ax_metric.set(xlabel="multiplier (x diff-in-means norm)", ylabel="refusal metric shift", title="target: harmless")
    ax_loss.set(xlabel="multiplier", ylabel="next-token loss increase (nats)", title="side effect: WikiText")
    for ax in (ax_metric, ax_loss):
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_summary(result: dict[str, Any], explanations: list[Any], path: Path) -> Path:
    s, st = result["stats"], result["steering"]
    lines = [
        f"# SAE features for refusal on {result['model']}",
        "",
        f"SAE: BatchTopK (saved as JumpReLU), layer {result['layer']}, d_sae={result['width']}, k={result['k']}, "
        f"{result['tokens']} activations x {result['epochs']} epochs, "
        f"{result['n_train_texts']} training texts ({result['corpus']} + chat prompts), {result['seconds']:.0f} s total.",
        "",
        f"- on {s['n_tokens']} held-out WikiText tokens: fraction of variance unexplained **{s['fvu']:.3f}**, "
        f"L0 **{s['l0']:.1f}**, latents that never fire {100 * s['dead_fraction']:.1f}% (dead in the last training "
        f"window: {_percent(result['dead_fraction_training'])}), next-token loss {s['ce_clean']:.3f} -> "
        f"{s['ce_sae']:.3f} (**{s['ce_increase']:+.3f}** nats) with the reconstruction spliced in",
        f"- time per stage (s): {', '.join(f'{k} {v:g}' for k, v in result['times'].items())}",
        f"- base refusal metric on {result['n_eval_prompts']} held-out harmless prompts: {st['base']['metric']:.3f}; "
        f"cosine(top-5 SAE vector, diff-in-means) = {st['cosine_sae_vs_dim']:.3f}",
        "",
        "## Steering (same L2 norm for SAE add and diff-in-means; clamp sets the latents to multiplier x their "
        "mean on harmful prompts)",
        "",
        "| method | multiplier | refusal metric shift | loss increase (nats) |",
        "|---|---|---|---|",
    ]
    for r in st["rows"]:
        lines.append(f"| {r['method']} | {r['multiplier']:g} | {r['metric_shift']:+.3f} | {r['loss_increase']:+.3f} |")
    lines += ["", f"## Top {len(explanations)} latents (harmful > harmless, `{result['locate_method']}` scores)", ""]
    for e, (_, score) in zip(explanations, result["top"], strict=True):
        lines += [f"score {score:+.3f}: " + e.render(), ""]
    lines += [f"![latent scores and steering]({Path(result['plot_path']).name})", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def prepare(args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Corpus, pairs and held-out prompts, formatted for the model."""
    train_par, eval_par, source = load_corpus()
    pairs = ContrastivePairs.load(REFUSAL)
    chat_prompts = format_prompts(tokenizer, pairs.positive + pairs.negative)
    harmless = format_prompts(tokenizer, read_texts(REFUSAL / "harmless_test.json", "instruction"))
    harmful = format_prompts(tokenizer, read_texts(REFUSAL / "harmful_test.json", "instruction"))
    return {
        "train_texts": train_par + chat_prompts,
        "eval_texts": eval_par[: args.eval_texts],
        "explain_texts": eval_par[:64] + harmful[:32] + harmless[:32],
        "pairs": pairs.subset(min(args.pairs, len(pairs))),
        "prompts": harmless[: args.eval_prompts],
        "source": source,
    }


def timed(times: dict[str, float], name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, recording its wall time under ``name``."""
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = round(time.perf_counter() - began, 1)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started, times = time.perf_counter(), {}
    model, tokenizer = load_model(args.model)
    layer = spec_for(model).n_layers // 2 if args.layer is None else args.layer
    d = prepare(args, tokenizer)
    settings = dict(layer=layer, d_sae=args.width, k=args.k, tokens=args.tokens, epochs=args.epochs, lr=args.lr)
    site = timed(times, "train (or load) SAE", sae.train_sae, model, tokenizer, d["train_texts"], **settings,
                 cache=not args.no_cache)  # fmt: skip
    stats = timed(times, "reconstruction", sae.reconstruction_stats, model, tokenizer, site, d["eval_texts"])
    metric = get_metric("refusal", tokenizer)
    scored = timed(times, "locate", locate, model, tokenizer, d["pairs"], method=args.method, sae=site, progress=False,
                   **({"metric": metric} if args.method == "attribution_patching" else {}))  # fmt: skip
    top = scored.top("sae", 5, sign="positive")
    latents = [latent for (_, latent), _ in top]
    explanations = timed(times, "explain", sae.explain_latents, model, tokenizer, site, latents, d["explain_texts"],
                         progress=False)  # fmt: skip
    data = {"tokenizer": tokenizer, "prompts": d["prompts"], "texts": d["eval_texts"][:4]}
    data["metric"] = metric
    steer = timed(times, "steer", steering_table, model, site, scored, latents, data, d["pairs"], args.multipliers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scored.save(out / "latent_scores")
    dead_train = site.sae.cfg.metadata.get("num_dead_features")
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)", **settings, "width": args.width,
        "corpus": d["source"], "n_train_texts": len(d["train_texts"]), "n_eval_prompts": len(d["prompts"]),
        "n_pairs": len(d["pairs"]), "locate_method": args.method, "stats": stats.to_dict(),
        "dead_fraction_training": None if dead_train is None else dead_train / site.d_sae,
        "top": top, "explanations": [e.to_dict() for e in explanations], "steering": steer, "times": times,
    }  # fmt: skip
    result["plot_path"] = str(plot(scored, steer, out / "sae_features.png"))
    result["seconds"] = time.perf_counter() - started
    result["summary_path"] = str(write_summary(result, explanations, out / "summary.md"))
    (out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"SAE FVU {stats.fvu:.3f}, L0 {stats.l0:.1f}; top latents {latents}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
