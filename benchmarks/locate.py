"""Cost and agreement of the localization methods on the embedded model, measured in one run.

Run: ``.venv/bin/python benchmarks/locate.py [--pairs 32] [--neuron-sample 512]``

The unit is ONE plain forward pass (``model(**batch)``, no grad) over one side of the pairs (the
``--pairs`` prompts in batches of ``--batch-size``). Every other cost is given in these units,
measured in the same process right after the unit, so the ratios hold on any machine.
Numbers marked "extrapolated" are measured on a sample and scaled linearly to the full count.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mi_peft import capture, load_model
from mi_peft.arch import spec_for
from mi_peft.data import ContrastivePairs
from mi_peft.locate.causal import _SplitRun, _sweep, activation_patching
from mi_peft.locate.gradient import LogitsPlan, attribution_patching
from mi_peft.locate.magnitude import collect, position_index, run_model
from mi_peft.metrics import refusal_metric

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data" / "refusal"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def plain_forward(model, batches, side: int) -> None:
    with torch.no_grad():
        for pair in batches:
            run_model(model, pair[side])


def one_head_per_forward(model, batches, metric, heads: list[tuple[int, int]]) -> torch.Tensor:
    """The unbatched baseline: a full forward over every negative batch per head, patched with capture.patch."""
    effects = torch.zeros(len(heads))
    with torch.no_grad():
        for pos, neg in batches:
            with capture.record(model, heads=True, attention_mask=pos["attention_mask"]) as cache:
                run_model(model, pos)
            clean = metric(run_model(model, neg).logits, neg)
            for i, (layer, head) in enumerate(heads):
                with capture.patch(model, cache, heads={layer: [head]}, attention_mask=neg["attention_mask"]):
                    effects[i] += (metric(run_model(model, neg).logits, neg) - clean).sum()
    return effects / sum(p["input_ids"].shape[0] for p, _ in batches)


def batched_no_prefix(model, batches, metric, flat_heads: torch.Tensor, max_batch: int) -> None:
    """Batching over components without prefix reuse (every chunk reruns the whole prompt)."""
    spec, plan = spec_for(model), LogitsPlan(model, metric)
    with torch.no_grad():
        for pos, neg in batches:
            a_pos, _, out = collect(model, pos, ("heads",), "last")
            plan.observe(out.logits, pos)
            run = _SplitRun(model, neg, position_index("last", neg["attention_mask"]), plan, reuse_prefix=False)
            clean = run.metric(1)
            src = a_pos["heads"]
            _sweep(spec, run, "heads", flat_heads, lambda b, c, s=src: s[b, :, c], clean, max_batch, _NoBar())


class _NoBar:
    def update(self, _n: int) -> None:
        pass


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> int:
    ta = set(a.flatten().abs().topk(k).indices.tolist())
    return len(ta & set(b.flatten().abs().topk(k).indices.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=128, help="rows per forward in exact patching")
    parser.add_argument("--neuron-sample", type=int, default=512)
    parser.add_argument("--head-sample", type=int, default=9, help="heads patched one per forward (baseline)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared machine)")
    args = parser.parse_args()
    if args.pairs < 32 or args.neuron_sample < 512:
        print("note: targets are defined for --pairs >= 32 and --neuron-sample >= 512")
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    model.eval()
    spec = spec_for(model)
    pairs = ContrastivePairs.load(DATA).subset(args.pairs, seed=0)
    batches = list(pairs.batches(tok, batch_size=args.batch_size))
    metric = refusal_metric(tok)
    n_heads, n_neurons = spec.n_layers * spec.n_heads, spec.n_layers * spec.n_neurons
    tokens = sum(int(p["attention_mask"].sum() + n["attention_mask"].sum()) for p, n in batches)
    load = os.getloadavg()[0]

    def say(what: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)

    plain_forward(model, batches[:1], 0)  # warm-up
    say("unit: plain forwards")
    unit = statistics.median(timed(lambda side=side: plain_forward(model, batches, side))[0] for side in (0, 1, 0, 1))
    say("attribution patching")
    t_attr, (attr, _) = timed(lambda: attribution_patching(model, batches, metric=metric))
    say("exact patching: heads")
    t_heads, (exact, _) = timed(lambda: activation_patching(model, batches, metric=metric, components=("heads",)))
    say("exact patching: sampled neurons")
    t_neurons, _ = timed(
        lambda: activation_patching(
            model, batches, metric=metric, components=("neurons",), neuron_sample=args.neuron_sample, seed=0
        )
    )
    sample = random.Random(0).sample([(layer, h) for layer in range(spec.n_layers) for h in range(spec.n_heads)], 9)
    sample = sample[: args.head_sample]
    say("baseline: one head per forward")
    t_single, single = timed(lambda: one_head_per_forward(model, batches, metric, sample))
    agree = max(abs(float(single[i]) - float(exact["heads"][l_, h_])) for i, (l_, h_) in enumerate(sample))
    chunk = max(1, args.max_batch // args.batch_size)
    flat = torch.randperm(n_heads, generator=torch.Generator().manual_seed(0))[:chunk]
    say("batched without prefix reuse")
    t_noprefix, _ = timed(lambda: batched_no_prefix(model, batches, metric, flat, args.max_batch))

    t_single_all = t_single / len(sample) * n_heads
    t_noprefix_all = t_noprefix / len(flat) * n_heads
    t_neurons_all = t_neurons / args.neuron_sample * n_neurons
    rho = spearman(attr["heads"], exact["heads"])
    overlap = top_overlap(attr["heads"], exact["heads"])
    speedup = t_single_all / t_heads

    def row(name: str, seconds: float | None, value: str, target: str = "", met: bool | None = None) -> str:
        secs = "" if seconds is None else f"{seconds:.1f} s"
        ok = "" if met is None else ("yes" if met else "**no**")
        return f"| {name} | {secs} | {value} | {target} | {ok} |"

    print(
        f"\nembedded SmolLM2-135M-Instruct, {args.pairs} refusal pairs ({tokens} tokens), batch {args.batch_size}, "
        f"max_batch {args.max_batch}, torch threads {torch.get_num_threads()}, load average {load:.1f} at start\n"
    )
    print("| measurement | wall time | cost (forward units) | target | met |\n|---|---|---|---|---|")
    print(row("plain forward over one side (the unit)", unit, "1.00"))
    print(row("attribution patching, ALL 270 heads + 46080 neurons + 30 residual", t_attr, f"{t_attr / unit:.2f}",
              "<= 4", t_attr / unit <= 4))  # fmt: skip
    print(row("exact patching, all 270 heads (batched + prefix reuse)", t_heads, f"{t_heads / unit:.2f}"))
    print(row(f"exact patching, {args.neuron_sample} sampled neurons", t_neurons, f"{t_neurons / unit:.2f}"))
    print(row("exact patching, all 46080 neurons (extrapolated)", t_neurons_all, f"{t_neurons_all / unit:.1f}"))
    print(row(f"exact patching one head per forward ({len(sample)} heads, extrapolated to 270)", t_single_all,
              f"{t_single_all / unit:.1f}"))  # fmt: skip
    print(row(f"batched without prefix reuse ({len(flat)} heads, extrapolated to 270)", t_noprefix_all,
              f"{t_noprefix_all / unit:.1f}"))  # fmt: skip
    print(row("speedup: batched exact heads vs one head per forward", None, f"{speedup:.1f}x", ">= 5x", speedup >= 5))
    print(row("Spearman(attribution, exact) over 270 heads", None, f"{rho:.3f}", ">= 0.9", rho >= 0.9))
    print(row("top-10 heads overlap (attribution vs exact)", None, f"{overlap}/10", ">= 8/10", overlap >= 8))
    rho_abs = spearman(attr["heads"].abs(), exact["heads"].abs())
    print(f"\nSpearman of |scores| (the ranking `select` uses): {rho_abs:.3f}")
    print(f"baseline vs batched exact scores on the sampled heads: max |difference| {agree:.2e}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
