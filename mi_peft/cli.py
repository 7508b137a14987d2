"""The ``mi-peft`` command line: one subcommand per stage of Locate -> Steer -> Improve."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Hugging Face model id or local folder (default: embedded SmolLM2-135M-Instruct)."
    )


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """Print an aligned plain-text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("%"))
    except ValueError:
        return False
    return True


def cmd_info(args: argparse.Namespace) -> int:
    from .arch import spec_for
    from .components import HEAD_MODES, NEURON_MODES, head_parameters, neuron_parameters
    from .models import load_model

    model, _ = load_model(args.model)
    spec = spec_for(model)
    total = sum(p.numel() for p in model.parameters())
    print(f"model:           {args.model or 'embedded SmolLM2-135M-Instruct'} ({spec.model_type})")
    print(f"layers:          {spec.n_layers}")
    print(f"heads:           {spec.n_heads} per layer ({spec.n_heads * spec.n_layers} total), head_dim {spec.head_dim}")
    print(f"kv heads:        {spec.n_kv_heads} per layer (group size {spec.group_size})")
    print(f"neurons:         {spec.n_neurons} per layer ({spec.n_neurons * spec.n_layers} total)")
    print(f"d_model:         {spec.d_model}")
    print(f"total params:    {total:,}")
    print()
    rows = [("head", m, head_parameters(spec, m), f"{100 * head_parameters(spec, m) / total:.5f}%") for m in HEAD_MODES]
    rows += [
        ("neuron", m, neuron_parameters(spec, m), f"{100 * neuron_parameters(spec, m) / total:.5f}%")
        for m in NEURON_MODES
    ]
    print_table(rows, ("component", "mode", "params", "% of model"))
    return 0


def parse_layers(text: str | None) -> list[int] | None:
    """``"8-19"`` -> 8..19, ``"3,5,7"`` -> [3, 5, 7], ``None`` -> None."""
    if not text:
        return None
    layers: list[int] = []
    for part in text.split(","):
        start, _, stop = part.partition("-")
        try:
            layers.extend(range(int(start), int(stop) + 1) if stop else [int(start)])
        except ValueError as err:
            raise ValueError(f"cannot parse layers {text!r}; use e.g. '8-19' or '3,5,7'.") from err
    return layers


def _load_pairs(path: str, limit: int | None, seed: int):
    from .data import ContrastivePairs

    pairs = ContrastivePairs.load(path)
    return pairs.subset(limit, seed=seed) if limit and limit < len(pairs) else pairs


def cmd_locate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .locate import locate
    from .models import load_model

    model, tokenizer = load_model(args.model)
    pairs = _load_pairs(args.data, args.pairs, args.seed)
    result = locate(
        model,
        tokenizer,
        pairs,
        method=args.method,
        components=tuple(args.components.split(",")),
        metric=args.metric,
        positions=args.positions,
        batch_size=args.batch_size,
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


def cmd_lens(args: argparse.Namespace) -> int:
    from .lens import logit_lens
    from .models import load_model

    model, tokenizer = load_model(args.model)
    lens = logit_lens(model, tokenizer, [args.prompt], targets=args.target or None, k=args.k, chat=not args.raw)
    rows = lens.table()
    print_table([tuple(r.values()) for r in rows], tuple(rows[0].keys()))
    if args.plot:
        lens.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mi-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="Show the architecture map and per-component parameter counts.")
    _add_model_arg(info)
    info.set_defaults(func=cmd_info)

    loc = sub.add_parser("locate", help="Score heads, neurons and residual layers on contrastive data.")
    _add_model_arg(loc)
    loc.add_argument(
        "--data", required=True, help="Contrastive data: a folder (positive.json/negative.json), JSON, JSONL or CSV."
    )
    loc.add_argument("--method", default="attribution_patching", help="Localization method (see README).")
    loc.add_argument("--components", default="heads,neurons,residual", help="Comma-separated kinds to score.")
    loc.add_argument("--metric", default=None, help="Metric for gradient/causal methods (default: refusal).")
    loc.add_argument("--positions", default="last", help="Token positions: last, all or mean.")
    loc.add_argument("--pairs", type=int, default=None, help="Use a random subset of this many pairs.")
    loc.add_argument("--batch-size", type=int, default=8)
    loc.add_argument("--seed", type=int, default=0)
    loc.add_argument("--top", type=int, default=10, help="Rows to print per kind.")
    loc.add_argument("--out", required=True, help="Folder to write the result and its plots to.")
    loc.set_defaults(func=cmd_locate)

    lens = sub.add_parser("lens", help="Logit lens: decode every layer's residual stream.")
    _add_model_arg(lens)
    lens.add_argument("--prompt", required=True)
    lens.add_argument("--target", action="append", help="Target string to track (repeatable).")
    lens.add_argument("--k", type=int, default=5, help="Top tokens per layer.")
    lens.add_argument("--raw", action="store_true", help="Do not apply the chat template.")
    lens.add_argument("--plot", default=None, help="PNG path for the target-probability plot.")
    lens.set_defaults(func=cmd_lens)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mi-peft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
