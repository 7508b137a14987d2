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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mi-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="Show the architecture map and per-component parameter counts.")
    _add_model_arg(info)
    info.set_defaults(func=cmd_info)
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
