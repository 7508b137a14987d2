"""``mi-peft run``: the command line of a whole recipe run (see :func:`mi_peft.pipeline.run_recipe`)."""

from __future__ import annotations

import argparse
from typing import Any

from .precision import PRECISIONS


def _budget_list(text: str) -> list[float]:
    """``"0.0003,0.0013"`` -> [0.0003, 0.0013]; whole numbers stay parameter counts."""
    try:
        return [float(part) if any(c in part for c in ".eE") else int(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"cannot read budgets {text!r}; give comma-separated fractions or counts, e.g. 0.0003,0.0013"
        ) from err


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run_recipe
    from .report import comparison_table

    results = run_recipe(
        args.recipe,
        out_dir=args.out,
        steps=args.steps,
        n_test=args.n_test,
        pairs=args.pairs,
        dpo_steps=args.dpo_steps,
        seeds=args.seeds,
        budgets=args.budgets,
        settings=[*args.settings, *([f"train.precision={args.precision}"] if args.precision else [])],
        resume=args.resume,
    )
    print()
    print(comparison_table(results["variants"]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report_refresh import refresh_report

    print(f"wrote {refresh_report(args.out)}")
    return 0


def add_run_parser(sub: Any) -> None:
    """Register ``mi-peft run`` and ``mi-peft report`` on the CLI's sub-parsers."""
    run = sub.add_parser("run", help="Run a whole recipe: locate, validate, steer, train, evaluate, report.")
    run.add_argument("recipe", help="A shipped recipe name (e.g. refusal) or a recipe YAML path.")
    run.add_argument("--out", help="Output folder (default runs/<recipe name>).")
    run.add_argument("--steps", type=int, help="Override the training steps (and the DPO steps, unless --dpo-steps).")
    run.add_argument("--dpo-steps", type=int, help="Override the DPO steps.")
    run.add_argument("--n-test", type=int, help="Held-out prompts per side.")
    run.add_argument("--pairs", type=int, help="Pairs used to locate (and cap on validation prompts).")
    run.add_argument("--seeds", type=int, help="Train every variant this many times (mean, std, pooled intervals).")
    run.add_argument(
        "--budgets",
        type=_budget_list,
        help="Budget sweep: comma-separated fractions or counts, e.g. 0.0001,0.0003,0.0013,0.005 "
        "(located, random and matched LoRA at each).",
    )
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="Training precision (train.precision): auto = bfloat16 autocast on CPUs/GPUs with bf16 matrix "
        "units, float32 elsewhere. Evaluation stays float32 unless evaluate.precision is set.",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="Continue a stopped run in the same --out folder: variants it finished under the same settings "
        "are read back, the rest are trained.",
    )
    run.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="Override one recipe field, e.g. --set evaluate.piqa_n=32 (repeatable).",
    )
    run.set_defaults(func=cmd_run)

    report = sub.add_parser(
        "report",
        help="Rewrite a finished run's report.md, plots and verdicts with this version's report code (no training).",
    )
    report.add_argument("out", help="The --out folder of a finished `mi-peft run` (holds results.json).")
    report.set_defaults(func=cmd_report)
