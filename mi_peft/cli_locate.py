"""``mi-peft locate``: score components on contrastive data from the command line (see :func:`mi_peft.locate.locate`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml


def add_locate_parser(sub: Any) -> None:
    """The ``locate`` subcommand."""
    from .cli import _add_model_arg

    loc = sub.add_parser("locate", help="Score heads, neurons and residual layers on contrastive data.")
    _add_model_arg(loc)
    loc.add_argument(
        "--data", required=True, help="Contrastive data: a folder (positive.json/negative.json), JSON, JSONL or CSV."
    )
    loc.add_argument("--method", default="attribution_patching", help="Localization method (see README).")
    loc.add_argument(
        "--components", default=None, help="Comma-separated kinds to score (default: every kind the method scores)."
    )
    loc.add_argument("--metric", default=None, help="Metric for gradient/causal methods (default: refusal).")
    loc.add_argument(
        "--positions",
        default=None,
        help="Token positions: last, all, mean or indices like -3,-2,-1 (default: all for weight_gradient, else last).",
    )
    loc.add_argument("--pairs", type=int, default=None, help="Use a random subset of this many pairs.")
    loc.add_argument("--batch-size", type=int, default=8)
    loc.add_argument("--seed", type=int, default=0)
    loc.add_argument("--top", type=int, default=10, help="Rows to print per kind.")
    loc.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A method option, repeatable (YAML value), e.g. --option norm=l2 --option negative_weight=0.",
    )
    loc.add_argument("--out", required=True, help="Folder to write the result and its plots to.")
    loc.set_defaults(func=cmd_locate)


def parse_options(settings: Sequence[str]) -> dict[str, Any]:
    """``["norm=l2", "negative_weight=0"]`` -> ``{"norm": "l2", "negative_weight": 0}`` (YAML values)."""
    options: dict[str, Any] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"cannot read --option {setting!r}; write KEY=VALUE, e.g. --option norm=l2.")
        if key.strip() in options:
            raise ValueError(f"--option {key.strip()!r} is given twice; give each option once.")
        options[key.strip()] = yaml.safe_load(value)
    return options


def parse_positions(text: str):
    """``last``/``all``/``mean`` pass through; ``"-3,-2,-1"`` becomes a list of indices."""
    if text in ("last", "all", "mean"):
        return text
    try:
        return [int(p) for p in text.split(",")]
    except ValueError as err:
        raise ValueError(f"cannot parse positions {text!r}; use last, all, mean or indices like -3,-2,-1.") from err


def load_pairs(path: str, limit: int | None, seed: int):
    """Contrastive pairs from ``path``, a random ``limit`` of them when given."""
    from .data import ContrastivePairs

    pairs = ContrastivePairs.load(path)
    return pairs.subset(limit, seed=seed) if limit and limit < len(pairs) else pairs


def cmd_locate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .cli import print_table
    from .locate import locate
    from .models import load_model

    options = parse_options(args.option)  # a bad option fails before the model loads
    model, tokenizer = load_model(args.model)
    pairs = load_pairs(args.data, args.pairs, args.seed)
    result = locate(
        model,
        tokenizer,
        pairs,
        method=args.method,
        components=None if args.components is None else tuple(args.components.split(",")),
        metric=args.metric,
        positions=None if args.positions is None else parse_positions(args.positions),
        batch_size=args.batch_size,
        **options,
    )
    out = Path(args.out)
    result.save(out)
    plots = result.plot(out)
    for kind in result.scores:
        top = result.top(kind, args.top)
        rows = [(kind, addr[0], addr[1] if len(addr) > 1 else "-", f"{score:+.4g}") for addr, score in top]
        print(f"\ntop {args.top} {kind} by |score| ({result.method})")
        print_table(rows, ("kind", "layer", "index", "score"))
    print(f"\nwrote {out}/ ({', '.join(p.name for p in plots)})")
    return 0
