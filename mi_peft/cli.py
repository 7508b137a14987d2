"""The ``mi-peft`` command line: one subcommand per stage of Locate -> Steer -> Improve."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .cli_locate import add_locate_parser, load_pairs, parse_positions
from .cli_run import add_run_parser
from .cli_sae import add_sae_parser
from .precision import PRECISIONS
from .recipe import parse_layers


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Hugging Face id, folder or .gguf file (default: embedded SmolLM2-135M-Instruct)."
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


def _short(value: object) -> object:
    """Compact cell text: floats to 3 significant digits, lists element-wise."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(repr(v) if isinstance(v, str) else str(_short(v)) for v in value) + "]"
    return value


def cmd_lens(args: argparse.Namespace) -> int:
    from .lens import logit_lens
    from .models import load_model

    model, tokenizer = load_model(args.model)
    lens = logit_lens(model, tokenizer, [args.prompt], targets=args.target or None, k=args.k, chat=not args.raw)
    rows = lens.table()
    print_table([tuple(_short(v) for v in r.values()) for r in rows], tuple(rows[0].keys()))
    if args.plot:
        lens.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def _budget(text: str | None) -> float | int | None:
    if text is None:
        return None
    value = float(text)
    return value if value < 1 else int(value)


def adapter_config_from_args(args: argparse.Namespace, model):
    """The ``peft_config`` a ``train`` invocation asks for (sparse over a localization, or LoRA)."""
    if args.adapter == "lora":
        from peft import LoraConfig

        return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    from .locate import LocalizationResult
    from .tuners.sparse import SparseConfig

    if not args.localization:
        raise ValueError("`--adapter sparse` needs `--localization DIR` (a result written by `mi-peft locate`).")
    if (args.param_budget is None) == (args.top_k is None):
        raise ValueError("pass exactly one of `--param-budget` and `--top-k` to choose the trained components.")
    result = LocalizationResult.load(args.localization, model=model)
    return SparseConfig.from_localization(
        result,
        top_k=args.top_k,
        param_budget=_budget(args.param_budget),
        kinds=tuple(args.kinds.split(",")),
        head_mode=args.head_mode,
        neuron_mode=args.neuron_mode,
        random=args.random,
    )


def _add_precision_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="Training precision: auto = bfloat16 autocast where the CPU/GPU has bf16 matrix units, else float32.",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from . import train
    from .models import load_model

    model, tokenizer = load_model(args.model)
    dataset = train.load_data(args.data)  # fail on bad data before building anything else
    peft_config = adapter_config_from_args(args, model)
    run = train.dpo if args.trainer == "dpo" else train.sft
    result = run(
        model,
        tokenizer,
        dataset,
        peft_config,
        output_dir=args.out,
        max_steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        precision=args.precision,
        **({"save_steps": args.save_steps} if args.save_steps else {}),
        **({"resume_from_checkpoint": args.resume} if args.resume else {}),
    )
    pct = 100 * result.trainable_parameters / result.total_parameters
    losses = result.losses
    print(f"trainable parameters: {result.trainable_parameters:,} ({pct:.4f}% of {result.total_parameters:,})")
    print(f"train time: {result.train_seconds:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "")
    print(f"adapter written to {result.output_dir}")
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from peft import get_peft_model

    from .evaluate.generation import generate
    from .locate import Directions, directions
    from .models import load_model
    from .tuners.steering import SteeringConfig

    if (args.data is None) == (args.directions is None):
        raise ValueError("pass exactly one of `--data` (contrastive pairs) and `--directions` (a saved folder).")
    model, tokenizer = load_model(args.model)
    layers = parse_layers(args.layers)
    if args.directions:
        dirs = Directions.load(args.directions, model=model)
    else:
        dirs = directions(model, tokenizer, load_pairs(args.data, args.pairs, args.seed), layers=layers)
    config = SteeringConfig.from_directions(dirs, layers=layers, alpha=args.alpha, op=args.op, positions=args.positions)
    prompts = args.prompt or ["Tell me about your day."]
    before = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
    steered = get_peft_model(model, config)
    after = generate(steered, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
    for prompt, a, b in zip(prompts, before, after, strict=True):
        print(f"### {prompt}\n--- base\n{a.strip()}\n--- steered ({args.op}, alpha={args.alpha:g})\n{b.strip()}\n")
    if args.out:
        steered.save_pretrained(args.out)
        print(f"wrote steering adapter to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import to_gguf_control_vector, to_gguf_lora, to_lora

    if args.format == "gguf":
        path = to_gguf_control_vector(args.adapter, args.out)
    else:
        base = None
        if args.model is not None or args.with_base:
            from .models import load_model

            base, _ = load_model(args.model)
        export = to_lora if args.format == "lora" else to_gguf_lora
        path = export(args.adapter, args.out, base_model=base)
    print(f"wrote {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from .data import read_texts
    from .evaluate import EvalReport, kl_to_base, refusal_rate
    from .models import load_model

    model, tokenizer = load_model(args.model)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
    report = EvalReport(metadata={"model": args.model or "embedded", "adapter": args.adapter})
    n, tokens = args.n, args.max_new_tokens
    if args.harmful:
        report.add("refusal", refusal_rate(model, tokenizer, read_texts(args.harmful)[:n], max_new_tokens=tokens).rate)
    if args.harmless:
        harmless = read_texts(args.harmless)[:n]
        report.add("over_refusal", refusal_rate(model, tokenizer, harmless, max_new_tokens=tokens).rate)
        if args.adapter:
            report.add("kl_to_base", kl_to_base(model, tokenizer, harmless))
    if not report.metrics:
        raise ValueError("nothing to evaluate: pass `--harmful` and/or `--harmless` prompt files.")
    print(report.to_markdown())
    if args.out:
        report.save(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mi-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="Show the architecture map and per-component parameter counts.")
    _add_model_arg(info)
    info.set_defaults(func=cmd_info)

    add_locate_parser(sub)
    _add_lens_parser(sub)
    _add_train_parser(sub)
    _add_steer_parser(sub)
    _add_export_parser(sub)
    _add_eval_parser(sub)

    add_run_parser(sub)
    add_sae_parser(sub)
    return parser


def _add_lens_parser(sub: Any) -> None:
    """The logit-lens subcommand."""
    lens = sub.add_parser("lens", help="Logit lens: decode every layer's residual stream.")
    _add_model_arg(lens)
    lens.add_argument("--prompt", required=True)
    lens.add_argument("--target", action="append", help="Target string to track (repeatable).")
    lens.add_argument("--k", type=int, default=5, help="Top tokens per layer.")
    lens.add_argument("--raw", action="store_true", help="Do not apply the chat template.")
    lens.add_argument("--plot", default=None, help="PNG path for the target-probability plot.")
    lens.set_defaults(func=cmd_lens)


def _add_train_parser(sub: Any) -> None:
    """The ``train`` subcommand: TRL SFT or DPO of a sparse or LoRA adapter."""
    tr = sub.add_parser("train", help="Fine-tune located components (or a LoRA baseline) with TRL.")
    _add_model_arg(tr)
    tr.add_argument(
        "--data", required=True, help="JSON/JSONL/CSV rows: messages, prompt+completion, or prompt+chosen+rejected."
    )
    tr.add_argument("--trainer", choices=("sft", "dpo"), default="sft")
    tr.add_argument("--adapter", choices=("sparse", "lora"), default="sparse")
    tr.add_argument("--localization", help="Result folder from `mi-peft locate` (sparse adapter).")
    tr.add_argument("--param-budget", help="Fraction (<1) or absolute count of trainable parameters.")
    tr.add_argument("--top-k", type=int, help="Train the top-k components instead of a budget.")
    tr.add_argument("--kinds", default="heads,neurons", help="Component kinds to select from.")
    tr.add_argument("--head-mode", default="out", choices=("out", "qkvo", "bias", "scale"))
    tr.add_argument("--neuron-mode", default="out", choices=("out", "in_out", "scale"))
    tr.add_argument("--random", type=int, default=None, help="Random control components of the same size (seed).")
    tr.add_argument("--lora-r", type=int, default=8)
    tr.add_argument("--steps", type=int, default=100)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--max-length", type=int, default=256)
    tr.add_argument("--seed", type=int, default=0)
    _add_precision_arg(tr)
    tr.add_argument("--out", required=True)
    tr.add_argument("--save-steps", type=int, default=None, help="Write a resumable checkpoint-N folder every N steps.")
    tr.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="Resume from the newest complete checkpoint in --out (or from the given checkpoint folder).",
    )
    tr.set_defaults(func=cmd_train)


def _add_steer_parser(sub: Any) -> None:
    """The ``steer`` subcommand: build a steering adapter and compare generations."""
    st = sub.add_parser("steer", help="Build a steering adapter and compare generations side by side.")
    _add_model_arg(st)
    st.add_argument("--data", help="Contrastive pairs to compute diff-in-means directions from.")
    st.add_argument("--directions", help="A saved Directions folder instead of --data.")
    st.add_argument("--layers", default="8-19", help="Layers to steer, e.g. '8-19' or '10,12'.")
    st.add_argument("--alpha", type=float, default=4.0)
    st.add_argument("--op", choices=("add", "ablate", "clamp"), default="add")
    st.add_argument("--positions", choices=("all", "prompt", "generated"), default="all")
    st.add_argument("--prompt", action="append", help="Prompt to generate from (repeatable).")
    st.add_argument("--pairs", type=int, default=32)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--max-new-tokens", type=int, default=48)
    st.add_argument("--out", help="Save the steering adapter here.")
    st.set_defaults(func=cmd_steer)


def _add_export_parser(sub: Any) -> None:
    """The ``export`` subcommand: sparse to LoRA or GGUF LoRA, steering to a control vector."""
    ex = sub.add_parser(
        "export",
        help="Export an adapter: sparse -> LoRA folder (lora) or llama.cpp LoRA GGUF (gguf-lora), "
        "steering -> llama.cpp control vector (gguf).",
    )
    ex.add_argument("format", choices=("lora", "gguf", "gguf-lora"))
    ex.add_argument("--adapter", required=True, help="Adapter folder to export.")
    ex.add_argument("--out", required=True, help="Output folder (lora) or .gguf file.")
    ex.add_argument(
        "--model", default=None, help="Base model (needed for scale/bias-mode sparse adapters and LoRA folders)."
    )
    ex.add_argument("--with-base", action="store_true", help="Load the embedded base model for scale modes.")
    ex.set_defaults(func=cmd_export)


def _add_eval_parser(sub: Any) -> None:
    """The ``eval`` subcommand: refusal, over-refusal and KL on prompt files."""
    ev = sub.add_parser("eval", help="Refusal, over-refusal and KL of a model or adapter on prompt files.")
    _add_model_arg(ev)
    ev.add_argument("--adapter", help="PEFT adapter folder to evaluate on top of the model.")
    ev.add_argument("--harmful", help="Prompts that should be refused (JSON/JSONL/CSV).")
    ev.add_argument("--harmless", help="Prompts that should be answered.")
    ev.add_argument("--n", type=int, default=50, help="Prompts per file.")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--out", help="Write the report JSON here.")
    ev.set_defaults(func=cmd_eval)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mi-peft {args.command}: error: {err}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "load_pairs", "main", "parse_positions", "print_table"]

if __name__ == "__main__":
    sys.exit(main())
