"""``mi-peft sae train|locate|explain``: the command line of :mod:`mi_peft.sae` (needs ``pip install 'mi-peft[sae]'``).

``train`` fits an SAE on one layer's residual stream and prints its reconstruction report; the SAE is
cached (``$MI_PEFT_CACHE/sae``) as a normal sae-lens folder that ``locate`` and ``explain`` take as ``--sae``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _texts(path: str | None, text_key: str) -> list[str]:
    """Paragraphs of a ``.txt`` file (one per line, WikiText headings dropped) or texts of a JSON/JSONL/CSV file.

    Without a path: the WikiText-2 test excerpt shipped with the recipes (about 25,000 tokens).
    """
    from .data_files import read_texts
    from .evaluate.general import load_paragraphs

    if path is None or Path(path).suffix == ".txt":
        return load_paragraphs(path)
    return read_texts(path, text_key)


def cmd_sae_train(args: argparse.Namespace) -> int:
    from .arch import spec_for
    from .cli import print_table
    from .models import load_model
    from .sae import reconstruction_stats, train_sae

    model, tokenizer = load_model(args.model)
    texts, held = _texts(args.texts, args.text_key), args.eval_texts
    if held < 0 or len(texts) <= held:
        raise ValueError(
            f"{len(texts)} texts and --eval-texts {held}: pass at least one more text than the held-out ones "
            "(the last --eval-texts texts measure the reconstruction and are not trained on)."
        )
    layer = spec_for(model).n_layers // 2 if args.layer is None else args.layer
    train = texts[: len(texts) - held]
    site = train_sae(
        model, tokenizer, train, layer=layer, d_sae=args.width, k=args.k, tokens=args.tokens, epochs=args.epochs,
        batch=args.batch, lr=args.lr, context=args.context, seed=args.seed, cache=not args.no_cache, progress=True,
    )  # fmt: skip
    print(f"\n{site}, trained on {len(train)} texts")
    if held:
        s = reconstruction_stats(model, tokenizer, site, texts[len(texts) - held :], max_length=args.context)
        rows = [
            ("fraction of variance unexplained", f"{s.fvu:.4f}"),
            ("L0 (active latents per token)", f"{s.l0:.1f}"),
            ("dead latents (never fire here)", f"{100 * s.dead_fraction:.1f}%"),
            ("next-token loss, clean (nats)", f"{s.ce_clean:.4f}"),
            ("next-token loss, SAE spliced in", f"{s.ce_sae:.4f}"),
            ("next-token loss increase", f"{s.ce_increase:+.4f}"),
        ]
        print(f"\nreconstruction on {s.n_tokens} tokens of {held} held-out texts")
        print_table(rows, ("measure", "value"))
    if args.out:
        site.sae.save_model(args.out)
        print(f"\nsaved to {args.out}")
    print(f"\ncached in {site.path}" if site.path else "\nnot cached (--no-cache)")
    return 0


def cmd_sae_locate(args: argparse.Namespace) -> int:
    from .cli import load_pairs, parse_positions, print_table
    from .locate import latent_stats, locate
    from .models import load_model
    from .sae import load_sae

    model, tokenizer = load_model(args.model)
    site = load_sae(args.sae, model)
    pairs = load_pairs(args.data, args.pairs, args.seed)
    result = locate(
        model, tokenizer, pairs, method=args.method, sae=site, metric=args.metric,
        positions=parse_positions(args.positions), batch_size=args.batch_size,
    )  # fmt: skip
    out = Path(args.out)
    result.save(out)
    plots = result.plot(out)
    stats = latent_stats(result, site.layer)
    rows = [
        (
            layer,
            latent,
            f"{score:+.4g}",
            f"{stats['mean_positive'][latent]:.3g}",
            f"{stats['mean_negative'][latent]:.3g}",
        )
        for (layer, latent), score in result.top("sae", args.top, sign=args.sign)
    ]
    print(f"\ntop {args.top} latents by {'|score|' if args.sign == 'abs' else args.sign + ' score'} ({result.method})")
    print_table(rows, ("layer", "latent", "score", "mean act. positive", "mean act. negative"))
    print(f"\nwrote {out}/ ({', '.join(p.name for p in plots)})")
    return 0


def cmd_sae_explain(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sae import explain_latents, load_sae

    model, tokenizer = load_model(args.model)
    site = load_sae(args.sae, model)
    try:
        latents = [int(part) for part in args.latents.split(",")]
    except ValueError as err:
        raise ValueError(f"cannot read --latents {args.latents!r}; give comma-separated indices like 12,907") from err
    texts = _texts(args.texts, args.text_key)
    for explanation in explain_latents(model, tokenizer, site, latents, texts, n_examples=args.n_examples):
        print(explanation.render() + "\n")
    return 0


def _common(parser: argparse.ArgumentParser, texts: bool = True) -> None:
    parser.add_argument("--model", default=None, help="Hugging Face id or folder (default: the embedded model).")
    if texts:
        parser.add_argument(
            "--texts", help="A .txt file (a paragraph per line) or JSON/JSONL/CSV texts; default: the shipped "
            "WikiText-2 excerpt (e.g. ../shared/data/text/wikitext-2/valid.txt for more)."
        )  # fmt: skip
        parser.add_argument("--text-key", default="text", help="Column of JSON/JSONL/CSV rows holding the text.")


def add_sae_parser(sub: Any) -> None:
    """Register ``mi-peft sae train|locate|explain`` on the CLI's sub-parsers."""
    sae = sub.add_parser("sae", help="Sparse autoencoders: train one on a layer, locate latents, explain latents.")
    cmds = sae.add_subparsers(dest="sae_command", required=True)
    tr = cmds.add_parser("train", help="Train (or load from the cache) a BatchTopK SAE; print its reconstruction.")
    _common(tr)
    add = tr.add_argument
    add("--layer", type=int, default=None, help="Decoder layer whose output the SAE reads (default: the middle one).")
    add("--width", type=int, default=4096, help="Latents (d_sae).")
    add("--tokens", type=int, default=200_000, help="Residual-stream activations to train on.")
    add("--k", type=int, default=32, help="Mean active latents per token (BatchTopK).")
    add("--epochs", type=int, default=2, help="Passes over the activations.")
    add("--batch", type=int, default=1024, help="Activations per training step.")
    add("--lr", type=float, default=1e-3)
    add("--context", type=int, default=128, help="Tokens per training chunk (and per measured text).")
    add("--seed", type=int, default=0)
    add("--eval-texts", type=int, default=24, help="Last texts held out to measure the reconstruction (0: skip).")
    add("--no-cache", action="store_true", help="Retrain even if the cache holds this SAE; do not cache it.")
    add("--out", help="Also save the SAE (a sae-lens folder) here.")
    tr.set_defaults(func=cmd_sae_train)

    loc = cmds.add_parser("locate", help="Score every latent of an SAE on contrastive pairs; save result and plots.")
    _common(loc, texts=False)
    add = loc.add_argument
    add("--sae", required=True, help="SAE folder (sae-lens format, e.g. printed by `mi-peft sae train`).")
    add("--data", required=True, help="Contrastive pairs: a folder (positive.json/negative.json), JSON, JSONL or CSV.")
    add("--method", default="mean_diff", choices=("mean_diff", "activation_stats", "attribution_patching"))
    add("--metric", default=None, help="Metric for attribution_patching (default: refusal).")
    add("--positions", default="last", help="last, all, mean or indices like -3,-2,-1.")
    add("--pairs", type=int, default=None, help="Use a random subset of this many pairs.")
    add("--batch-size", type=int, default=8)
    add("--seed", type=int, default=0)
    add("--top", type=int, default=10, help="Latents to print.")
    add("--sign", choices=("abs", "positive", "negative"), default="abs", help="Rank by |score|, highest or lowest.")
    add("--out", required=True, help="Folder for the LocalizationResult and its plot.")
    loc.set_defaults(func=cmd_sae_locate)

    ex = cmds.add_parser("explain", help="Top tokens, contexts and promoted tokens of chosen latents.")
    _common(ex)
    ex.add_argument("--sae", required=True, help="SAE folder (sae-lens format).")
    ex.add_argument("--latents", required=True, help="Comma-separated latent indices, e.g. 12,907.")
    ex.add_argument("--n-examples", type=int, default=5, help="Contexts per latent.")
    ex.set_defaults(func=cmd_sae_explain)
