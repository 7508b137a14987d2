"""Cost of latent attribution patching through an SAE, in plain forward passes measured in the same run.

Run: ``.venv/bin/python benchmarks/sae_attribution.py [--pairs 32] [--width 4096] [--layer 15] [--sae FOLDER]``

The unit is ONE plain forward pass (``model(**batch)``, no grad, full logits) over BOTH sides of the
``--pairs`` pairs in batches of ``--batch-size``. Latent attribution patching over every latent of one
SAE (``locate(..., method="attribution_patching", sae=site)``) is timed on the same batches, interleaved
with the unit over ``--rounds`` rounds, and reported as a ratio of medians, so it holds on any machine.
Target (the SAE issue): <= 4 forward-pass equivalents on 32 pairs.

The SAE is a sae-lens JumpReLU SAE with sae-lens's own random initialisation (``--width`` latents at the
output of ``--layer``; threshold 0, so about half the latents fire: the dense worst case) unless ``--sae``
names a trained one. Its weights do not change the cost: encode, decode and their gradients are dense.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mi_peft import load_model, locate
from mi_peft import sae as msae
from mi_peft.arch import spec_for
from mi_peft.data import ContrastivePairs
from mi_peft.locate.magnitude import run_model
from mi_peft.metrics import refusal_metric
from mi_peft.sae.latents import attribution_patching, mean_diff

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data" / "refusal"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_forward(model, batches) -> None:
    """The unit: both sides of every pair, no grad, full logits."""
    with torch.no_grad():
        for pos, neg in batches:
            run_model(model, pos)
            run_model(model, neg)


def random_site(model, layer: int, width: int, seed: int) -> msae.SAESite:
    """A sae-lens JumpReLU SAE with sae-lens's own initialisation at ``layer``'s output."""
    lens = msae.require_sae_lens()
    torch.manual_seed(seed)
    sae = lens.JumpReLUSAE(lens.JumpReLUSAEConfig(d_in=spec_for(model).d_model, d_sae=width))
    sae.cfg.metadata.hook_name = msae.resid_hook_name(layer)
    return msae.attach(sae, model)


def cpu_line(threads: int) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    name = names[0] if names else platform.processor() or "unknown CPU"
    return (
        f"CPU: {name}, {os.cpu_count()} cores; torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {threads} torch thread(s)"
    )


def report(times: dict[str, list[float]], spec, site: msae.SAESite, setup: str) -> None:
    """The markdown table: medians, each round, and every cost in units of the plain forward."""
    med = {k: statistics.median(v) for k, v in times.items()}
    unit = med["unit"]
    print(f"\nembedded SmolLM2-135M-Instruct ({spec.n_layers} layers, d_model {spec.d_model}), {setup}\n")
    print("| measurement | wall time (median) | per round | forward-pass equivalents | target | met |")
    print("|---|---|---|---|---|---|")

    def row(name: str, key: str, target: str = "", met: bool | None = None) -> None:
        rounds = " / ".join(f"{t:.2f}" for t in times[key])
        ok = "" if met is None else ("yes" if met else "**no**")
        print(f"| {name} | {med[key]:.2f} s | {rounds} | {med[key] / unit:.2f} | {target} | {ok} |")

    row("plain forward over both sides of the pairs (the unit)", "unit")
    ratio = med["locate"] / unit
    row(f"`locate(..., method='attribution_patching', sae=site)`, ALL {site.d_sae} latents", "locate", "<= 4",
        ratio <= 4)  # fmt: skip
    row("the scoring function alone (`mi_peft.sae.latents.attribution_patching`)", "scoring")
    row("`mean_diff` over all latents (forwards stop after the SAE layer)", "mean_diff")
    print(
        f"\nlatent attribution patching: {ratio:.2f} forward-pass equivalents (both sides), "
        f"{2 * ratio:.2f} in one-side forwards (the unit of benchmarks/locate.py)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layer", type=int, default=None, help="SAE layer (default: the middle one)")
    parser.add_argument("--width", type=int, default=4096, help="latents of the random SAE")
    parser.add_argument("--sae", default=None, help="a trained SAE folder instead of the random one")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    model.eval()
    spec = spec_for(model)
    layer = spec.n_layers // 2 if args.layer is None else args.layer
    site = msae.load_sae(args.sae, model) if args.sae else random_site(model, layer, args.width, seed=0)
    pairs = ContrastivePairs.load(DATA).subset(args.pairs, seed=0)
    batches = list(pairs.batches(tok, batch_size=args.batch_size))
    metric = refusal_metric(tok)
    tokens = sum(int(p["attention_mask"].sum() + n["attention_mask"].sum()) for p, n in batches)
    load = os.getloadavg()[0]

    def say(what: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)

    def scoring() -> None:
        attribution_patching(model, batches, sites=[site], metric=metric)

    def whole_locate() -> None:
        locate(model, tok, pairs, method="attribution_patching", sae=site, metric=metric,
               batch_size=args.batch_size, progress=False)  # fmt: skip

    plain_forward(model, batches[:1])  # warm-up
    scoring()
    times: dict[str, list[float]] = {"unit": [], "scoring": [], "locate": [], "mean_diff": []}
    for r in range(args.rounds):
        say(f"round {r + 1}/{args.rounds}")
        times["unit"].append(timed(lambda: plain_forward(model, batches)))
        times["scoring"].append(timed(scoring))
        times["locate"].append(timed(whole_locate))
        times["mean_diff"].append(timed(lambda: mean_diff(model, batches, sites=[site])))
    setup = (
        f"{'trained SAE ' + Path(args.sae).name if args.sae else 'random-init sae-lens JumpReLU SAE (threshold 0)'}: "
        f"d_sae {site.d_sae} at layer {site.layer} ({site.hook_name}); {args.pairs} refusal pairs ({tokens} tokens), "
        f"batch {args.batch_size}, refusal metric at the last token, {args.rounds} interleaved rounds (medians); "
        f"load average {load:.1f} at start"
    )
    report(times, spec, site, setup)
    print(cpu_line(args.threads) + f"; load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
