"""Training-step cost, peak memory and generation speed of mi-peft adapters, measured side by side in one run.

Run: ``.venv/bin/python benchmarks/adapters.py [--rounds 2] [--steps 6] [--quick] [--model PATH]``

Every number is a ratio to a baseline measured in the same run, so the ratios hold on any machine.
Training: one step is forward + loss + backward (+ AdamW step) on ``--batch-size`` x ``--seq-len``
tokens of WikiText-2; the unit is the FROZEN model's forward + backward (input embeddings made to
require grad, so the backward runs through every layer and computes no weight gradient). Variants
are timed in ``--rounds`` rounds; each round rebuilds every variant from the same base weights,
takes one untimed warm-up step per variant, then ``--steps`` timed steps in which every variant
steps in turn (order reversed every step); a variant's time is the median of all its timed steps. Peak RSS is read in a forked child
process per variant that holds only the imported libraries when it starts: it loads the model,
attaches the adapter, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports
``VmHWM`` after two training steps (one child at a time). Generation: greedy, batch 1,
``--new-tokens`` tokens with a KV cache, all models decoding in lockstep (one token each in turn);
decode tokens/s is one over the median decode-step time, as a ratio to the base model. The
steering vectors are random unit vectors (seed 0) times ``--alpha``, the same for mi-peft and the
peer libraries.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

from mi_peft import LocalizationResult, SparseConfig, SteeringConfig, load_model, spec_for
from mi_peft.components import head_parameters, neuron_parameters
from mi_peft.tuners.steering.condition import SteeringCondition

TEXT = Path(__file__).resolve().parent.parent / "recipes" / "data" / "general" / "wikitext2_test_excerpt.txt"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Variant:
    """One way to train: what is trainable, which components a sparse adapter selects, in which precision.

    Sparse selections read random localization scores; ``where="spread"`` forces the top score into
    layer 0 (the backward must reach the bottom, the costly case), ``"upper"`` scores only the upper
    third of the layers (a located-like selection: the backward pass can stop there).
    """

    name: str
    kind: str  # frozen | sparse | lora | full
    kinds: tuple[str, ...] = ()
    head_mode: str = "out"
    neuron_mode: str = "out"
    budget: float = 0.0  # fraction of the model's parameters (at least one component)
    top_frac: float = 0.0  # or: this fraction of all heads (bias mode costs too little for a budget)
    where: str = "spread"
    bf16: bool = False

    def as_bf16(self) -> Variant:
        return Variant(**{**self.__dict__, "name": self.name + " (bf16)", "bf16": True})


FROZEN = Variant("frozen forward+backward", "frozen")
NEURONS = Variant("sparse neurons `out`", "sparse", ("neurons",), neuron_mode="out", budget=0.0013)
QKVO = Variant("sparse heads `qkvo`", "sparse", ("heads",), head_mode="qkvo", budget=0.0011)
BIAS = Variant("sparse heads `bias` (10% of heads)", "sparse", ("heads",), head_mode="bias", top_frac=0.1)
LORA = Variant("LoRA r=8 all linear", "lora")
FULL = Variant("full fine-tuning", "full")
TABLE = (FROZEN, NEURONS, QKVO, BIAS, LORA, FULL)
UPPER = tuple(Variant(v.name + ", upper layers", v.kind, v.kinds, v.head_mode, v.neuron_mode, v.budget, where="upper")
              for v in (NEURONS, QKVO))  # fmt: skip
BF16 = (LORA.as_bf16(),)  # the sparse bf16 ratio comes from the loss comparison


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per variant and round")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--loss-steps", type=int, default=20, help="steps of the float32-vs-bf16 loss comparison")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (the recipes' default)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per generation")
    parser.add_argument("--gen-rounds", type=int, default=2, help="generation rounds (all models in lockstep)")
    parser.add_argument("--alpha", type=float, default=4.0, help="steering strength (times a unit vector)")
    parser.add_argument("--steer-layers", type=int, default=15, help="number of steered layers (middle of the stack)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared machine)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 1 round, 2 steps, short sequences")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.gen_rounds, args.steps, args.loss_steps, args.new_tokens = 1, 1, 2, 3, 8
        args.batch_size, args.seq_len = 2, 32
    return args


# ---- data and models ---------------------------------------------------------------------------


def text_batches(tok, n: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """``n`` distinct batches of full-length WikiText-2 windows (no padding, so every step costs the same)."""
    ids = tok(TEXT.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"][0]
    need = n * batch_size * seq_len
    ids = ids.repeat(need // ids.numel() + 1)[:need].view(n, batch_size, seq_len)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]


def localizations(model) -> dict[str, LocalizationResult]:
    """Random head and neuron scores (seed 0): spread (top score in layer 0) and upper-third-only versions."""
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(0)
    raw = {
        "heads": torch.rand(spec.n_layers, spec.n_heads, generator=gen),
        "neurons": torch.rand(spec.n_layers, spec.n_neurons, generator=gen),
    }
    spread = {k: v.clone() for k, v in raw.items()}
    for scores in spread.values():
        scores[0, 0] = 2.0  # the best-ranked component sits in layer 0
    upper = {k: v.clone() for k, v in raw.items()}
    for scores in upper.values():
        scores[: upper_layer(spec.n_layers)] = float("nan")  # never selected
    return {
        where: LocalizationResult.from_model(model, scores, method=f"benchmark: random scores, {where}")
        for where, scores in (("spread", spread), ("upper", upper))
    }


def upper_layer(n_layers: int) -> int:
    """First layer of the upper third: the stand-in for a located selection that leaves the lower layers alone."""
    return min(n_layers - 1, 2 * n_layers // 3)


def sparse_config(variant: Variant, result: LocalizationResult) -> SparseConfig:
    """The variant's selection through the public API; a budget buys at least one component (tiny models)."""
    spec = result.spec
    modes = dict(head_mode=variant.head_mode, neuron_mode=variant.neuron_mode, kinds=variant.kinds)
    if variant.top_frac:
        return SparseConfig.from_localization(result, top_k=max(1, int(variant.top_frac * spec.n_layers * spec.n_heads)),
                                              **modes)  # fmt: skip
    one = (
        head_parameters(spec, variant.head_mode)
        if variant.kinds == ("heads",)
        else neuron_parameters(spec, variant.neuron_mode)
    )
    budget = max(int(variant.budget * result.n_model_parameters), one)
    return SparseConfig.from_localization(result, param_budget=budget, **modes)


def build(variant: Variant, base, results: dict[str, LocalizationResult]):
    """A fresh copy of ``base`` set up for ``variant``, in train mode, and its trainable parameters."""
    model = copy.deepcopy(base)
    if variant.kind == "sparse":
        model = get_peft_model(model, sparse_config(variant, results[variant.where]))
    elif variant.kind == "lora":  # as mi_peft.variants builds the `lora` baseline
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    else:
        model.requires_grad_(variant.kind == "full")
        if variant.kind == "frozen":
            model.enable_input_require_grads()  # the backward reaches the embeddings; no weight gradient
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def train_step(model, opt, batch: dict[str, torch.Tensor], bf16: bool) -> float:
    """One step as a trainer takes it: autocast wraps only the forward (the backward follows its dtypes),
    weights, gradients and AdamW state stay float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def optimizer(params, lr: float):
    """AdamW over the trainable parameters; none for the frozen baseline (nothing to update)."""
    return torch.optim.AdamW(params, lr=lr) if any(p.requires_grad for p in params) else None


@contextlib.contextmanager
def floor_probe(model) -> Iterator[list[int]]:
    """Collects the decoder layers whose output requires grad during the forward it wraps.

    The lowest one is where the backward pass stops: read from the autograd graph, not assumed.
    """
    layers = spec_for(model).decoder_layers(model)
    reached: list[int] = []

    def hook(index: int):
        def record(_module, _inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                reached.append(index)

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield reached
    finally:
        for handle in handles:
            handle.remove()


# ---- training-step timing ----------------------------------------------------------------------


def prepare(variant: Variant, base, results, batch, args) -> tuple:
    """Build ``variant`` and take its untimed warm-up step, probing where its backward stops.

    Returns the model, its optimizer, and its trainable count and backward floor.
    """
    model, params = build(variant, base, results)
    opt = optimizer(params, args.lr)
    with floor_probe(model) as reached:
        train_step(model, opt, batch, variant.bf16)
    n = sum(p.numel() for p in params)
    n_layers = len(spec_for(model).decoder_layers(model))
    info = {"trainable": n, "share": n / results["spread"].n_model_parameters, "floor": min(reached, default=n_layers)}
    return model, opt, info


def timing_rounds(variants: list[Variant], base, results, batches, args) -> tuple[dict, dict]:
    """Step times per variant and round, and each variant's trainable count and backward floor.

    Each round builds every variant afresh; then each of the ``args.steps`` steps is taken by every
    variant in turn, the order reversed every step. Timing one variant's steps after another's let a
    shared machine's slow minutes land on one variant (the frozen baseline's median moved by 50%
    between runs); interleaving single steps gives every variant the same conditions.
    """
    times: dict[str, list[list[float]]] = {v.name: [] for v in variants}
    info: dict[str, dict] = {}
    bar = tqdm(
        total=args.rounds * len(variants) * (args.steps + 1), desc="training steps", unit="step", file=sys.stderr
    )
    for _ in range(args.rounds):
        live = {}
        for v in variants:
            model, opt, info[v.name] = prepare(v, base, results, batches[0], args)
            live[v.name] = (model, opt)
            bar.update()
        round_times: dict[str, list[float]] = {v.name: [] for v in variants}
        for i in range(args.steps):
            for v in variants if i % 2 == 0 else variants[::-1]:
                model, opt = live[v.name]
                start = time.perf_counter()
                train_step(model, opt, batches[(i + 1) % len(batches)], v.bf16)
                round_times[v.name].append(time.perf_counter() - start)
                bar.update()
        for name, step_times in round_times.items():
            times[name].append(step_times)
        del live
        gc.collect()
    bar.close()
    return times, info


# ---- peak RSS in forked children -----------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_child(variant: Variant, args: argparse.Namespace, conn) -> None:
    """Load, attach, reset the peak counter, take two steps, send the peak (MB)."""
    try:
        torch.set_num_threads(args.threads)
        base, tok = load_model(args.model)
        results = localizations(base)
        batches = text_batches(tok, 2, args.batch_size, args.seq_len)
        load_peak = _status_kb("VmHWM")
        model, params = build(variant, base, results)
        opt = optimizer(params, args.lr)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        for batch in batches:
            train_step(model, opt, batch, variant.bf16)
        conn.send({"steps": _status_kb("VmHWM") / 1024, "load": load_peak / 1024})
    except Exception as err:  # reported by the parent, which goes on
        conn.send({"error": f"{type(err).__name__}: {err}"})
    finally:
        conn.close()


def _start_child(ctx, variant: Variant, args: argparse.Namespace):
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_rss_child, args=(variant, args, send))
    child.start()
    send.close()
    return child, receive


def peak_rss(variants: list[Variant], args: argparse.Namespace) -> dict[str, dict]:
    """Each variant's peak RSS in its own forked child (forked before the parent loads any model).

    One child at a time: with two at once, repeated peaks of one variant spread over 7% instead of 2%.
    """
    if (
        args.no_rss
        or not Path("/proc/self/clear_refs").exists()
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        print("note: peak RSS not measured (--no-rss, or no Linux /proc/self/clear_refs or fork here)")
        return {}
    ctx = multiprocessing.get_context("fork")
    out = {}
    for variant in tqdm(variants, desc="peak RSS (child processes)", unit="variant", file=sys.stderr):
        child, receive = _start_child(ctx, variant, args)
        result = receive.recv() if receive.poll(600) else {"error": "no answer within 600 s"}
        child.join(10)
        if child.is_alive():
            child.terminate()
        if "error" in result:
            print(f"note: peak RSS of {variant.name} not measured: {result['error']}")
        else:
            out[variant.name] = result
    return out


# ---- float32 vs bf16 autocast: step time and loss ------------------------------------------------


def loss_comparison(variant: Variant, base, results, batches, held_out, args) -> dict:
    """Train two copies from the same start on the same batches, float32 and bf16 steps interleaved.

    Returns the step-time ratio (medians, warm-up step excluded) and the held-out loss of both after
    ``args.loss_steps`` steps, evaluated in float32 so only the training precision differs.
    """
    runs = {}
    for bf16 in (False, True):
        model, params = build(variant, base, results)
        runs[bf16] = (model, optimizer(params, args.lr), [])
    for i in tqdm(range(args.loss_steps), desc="float32 vs bf16 steps", unit="step", file=sys.stderr):
        for bf16, (model, opt, times) in runs.items():
            start = time.perf_counter()
            train_step(model, opt, batches[i % len(batches)], bf16)
            times.append(time.perf_counter() - start)
    after = {bf16: heldout_loss(model, held_out) for bf16, (model, _, _) in runs.items()}
    fp32_times, bf16_times = (runs[b][2][1:] or runs[b][2] for b in (False, True))
    return {
        "name": variant.name,
        "before": heldout_loss(base, held_out),
        "fp32": after[False],
        "bf16": after[True],
        "speedup": statistics.median(fp32_times) / statistics.median(bf16_times),
    }


def heldout_loss(model, batch: dict[str, torch.Tensor]) -> float:
    """Float32 loss without grad, so two runs differ only by how they were trained."""
    model.eval()
    with torch.no_grad():
        return float(model(**batch, labels=batch["input_ids"]).loss)


# ---- generation ----------------------------------------------------------------------------------


def steer_layers(n_layers: int, count: int) -> list[int]:
    """``count`` consecutive layers in the middle of the stack (all of them on a small model)."""
    count = min(count, n_layers)
    start = (n_layers - count) // 2
    return list(range(start, start + count))


def import_peer(name: str):
    """The peer library, or None after a printed note. repeng 0.4 names ``numpy.float_`` (gone in numpy 2)
    in annotations evaluated at import, so the alias exists only while it is imported."""
    import numpy as np

    added = "float_" not in np.__dict__
    if added:
        np.float_ = np.float64
    try:
        return importlib.import_module(name)
    except ImportError as err:
        print(f"note: peer `{name}` not measured: {err}. Install: .venv/bin/pip install --no-deps "
              "steering-vectors repeng, plus scikit-learn, which both import at import time.")  # fmt: skip
        return None
    finally:
        if added:
            del np.float_


def generation_models(base, layers: list[int], args) -> dict[str, torch.nn.Module]:
    """Base, mi-peft `add`, mi-peft conditional, and the installed peers: same layers, same vectors."""
    spec = spec_for(base)
    gen = torch.Generator().manual_seed(0)
    units = {layer: torch.nn.functional.normalize(torch.randn(spec.d_model, generator=gen), dim=0) for layer in layers}
    # threshold -1 on a cosine: every prompt passes, so the timing includes the check AND the steering
    always = SteeringCondition(direction=torch.randn(spec.d_model, generator=gen), layer=layers[0], threshold=-1.0)
    models = {"base model": base, "base model, second copy (noise control)": copy.deepcopy(base)}
    for name, condition in (("mi-peft steering `add`", None), ("mi-peft conditional steering", always)):
        config = SteeringConfig.from_directions(units, layers=layers, alpha=args.alpha, condition=condition)
        models[name] = get_peft_model(copy.deepcopy(base), config).eval()
    scaled = {layer: args.alpha * unit for layer, unit in units.items()}
    sv = import_peer("steering_vectors")
    if sv is not None:
        models["steering-vectors (peer)"] = copy.deepcopy(base)
        sv.SteeringVector(scaled, "decoder_block").patch_activations(models["steering-vectors (peer)"])
    repeng = import_peer("repeng")
    if repeng is not None:
        control = repeng.ControlModel(copy.deepcopy(base), layers)
        vector = repeng.ControlVector(
            model_type=base.config.model_type, directions={k: v.numpy() for k, v in scaled.items()}
        )
        control.set_control(vector, coeff=1.0)
        models["repeng (peer)"] = control
    return models


def lockstep_decode(models: dict, prompt: dict[str, torch.Tensor], n: int) -> tuple[dict, dict]:
    """Greedy decoding of ``n`` new tokens (KV cache, batch 1) by every model at once: one token per model in
    turn, the order reversed every step, so all models meet the same moments of contention.

    Timing whole ``generate`` calls one after another left a second copy of the base model 11% off the
    base on this shared machine; a token-by-token interleave cancels that drift. Returns each model's
    decode-step times (the first token comes from the untimed prompt forward) and its tokens.
    """
    names, state = list(models), {}
    with torch.no_grad():
        for name in names:
            out = models[name](**prompt, use_cache=True)
            state[name] = (out.past_key_values, out.logits[:, -1:].argmax(-1), prompt["attention_mask"])
        times: dict[str, list[float]] = {name: [] for name in names}
        tokens: dict[str, list[int]] = {name: [int(state[name][1])] for name in names}
        for step in range(n - 1):
            for name in names if step % 2 == 0 else names[::-1]:
                cache, token, mask = state[name]
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                start = time.perf_counter()
                out = models[name](input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                times[name].append(time.perf_counter() - start)
                tokens[name].append(int(token))
                state[name] = (out.past_key_values, token, mask)
    return times, tokens


def generation(models: dict, prompt: dict[str, torch.Tensor], args, pad_id: int) -> tuple[dict, dict]:
    """Decode-step times per model and round, and whether the lockstep loop produced the tokens that
    ``generate`` produces (first 8): the loop must drive every model (conditional, peers) the way ``generate`` does."""
    check = min(8, args.new_tokens)
    times: dict[str, list[list[float]]] = {name: [] for name in models}
    for _ in tqdm(range(args.gen_rounds), desc="generation rounds (lockstep)", unit="round", file=sys.stderr):
        round_times, tokens = lockstep_decode(models, prompt, args.new_tokens)
        for name, step_times in round_times.items():
            times[name].append(step_times)
    same = {}
    with torch.no_grad():
        for name, model in models.items():
            out = model.generate(**prompt, max_new_tokens=check, min_new_tokens=check, do_sample=False,
                                 pad_token_id=pad_id)  # fmt: skip
            same[name] = out[0, prompt["input_ids"].shape[1] :].tolist() == tokens[name][:check]
    return times, same


def logit_agreement(models: dict, prompt: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max |next-token logit difference| of each model from mi-peft `add`: the peers must steer the same."""
    with torch.no_grad():
        logits = {name: m(**prompt).logits[:, -1].float() for name, m in models.items()}
    ref = logits["mi-peft steering `add`"]
    return {name: float((value - ref).abs().max()) for name, value in logits.items()}


# ---- report --------------------------------------------------------------------------------------


def median_of(rounds: list[list[float]]) -> float:
    return statistics.median(t for one in rounds for t in one)


def rounds_cell(rounds: list[list[float]], digits: int = 2) -> str:
    """The overall median, then each round's median: how much the rounds agree."""
    per = "/".join(f"{statistics.median(one):.{digits}f}" for one in rounds)
    return f"{median_of(rounds):.{digits}f} ({per})"


def header(argv: list[str] | None, args: argparse.Namespace) -> None:
    """Command, CPU model and bf16-relevant flags, threads and load: what the ratios were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")  # fmt: skip
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    command = " ".join(["benchmarks/adapters.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: `.venv/bin/python {command}`\n")
    print(f"CPU: {model}, {os.cpu_count()} cores; flags present: {', '.join(f for f in CPU_FLAGS if f in flags) or 'none'}"
          f" (absent: {', '.join(f for f in CPU_FLAGS if f not in flags) or 'none'}); torch {torch.__version__}, CPU "
          f"capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} torch thread(s); "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip


def training_table(variants: list[Variant], info: dict, times: dict, rss: dict, loss: dict) -> dict[str, float]:
    """The main table; returns each variant's median step time for the target checks.

    The bf16 speed-up comes from a variant's bf16 twin in the same rounds, or from the loss comparison.
    """
    med = {name: median_of(rounds) for name, rounds in times.items()}
    bf16 = {v.name: med[v.name] / med[v.as_bf16().name] for v in variants if v.as_bf16().name in med}
    bf16[loss["name"]] = loss["speedup"]
    frozen, lora = med[FROZEN.name], med[LORA.name]
    rss_frozen = rss.get(FROZEN.name, {}).get("steps")
    print("\n| variant | trainable | % of model | backward stops at layer | step s (per round) | vs frozen "
          "| vs LoRA r=8 | bf16 speed-up | peak RSS MB | RSS vs frozen |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        peak = rss.get(v.name, {}).get("steps")
        cells = [
            v.name,
            f"{info[v.name]['trainable']:,}",
            f"{100 * info[v.name]['share']:.4f}%",
            str(info[v.name]["floor"]),
            rounds_cell(times[v.name]),
            f"{med[v.name] / frozen:.2f}",
            f"{med[v.name] / lora:.2f}",
            f"{bf16[v.name]:.2f}x" if v.name in bf16 else "",
            "" if peak is None else f"{peak:,.0f}",
            "" if peak is None or rss_frozen is None else f"{peak / rss_frozen:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")
    if rss:
        load = max(r["load"] for r in rss.values())
        print(f"\nPeak RSS is the kernel's high-water mark over two training steps (counter reset after loading "
              f"and attaching; libraries + weights + activations + gradients + AdamW state). Loading alone peaked at "
              f"{load:,.0f} MB.")  # fmt: skip
    return med


def located_table(info: dict, med: dict) -> list[tuple[str, float]]:
    """Upper-layer selections against the same-size selection spread from layer 0; returns the ratios."""
    print("\n| selection (same size) | backward stops at layer | step s | vs spread from layer 0 | time saved |")
    print("|---|---|---|---|---|")
    out = []
    for spread, upper in zip((NEURONS, QKVO), UPPER, strict=True):
        for v in (spread, upper):
            ratio = med[v.name] / med[spread.name]
            print(f"| {v.name} | {info[v.name]['floor']} | {med[v.name]:.2f} | {ratio:.2f} | {1 - ratio:.0%} |")
        out.append((upper.name, med[upper.name] / med[spread.name]))
    return out


def generation_table(times: dict[str, list[list[float]]], agree: dict[str, float], same: dict) -> dict[str, float]:
    """Decode tokens/s = 1 / the median decode-step time, pooled over rounds; ratios to the base model."""
    speed = {name: 1 / median_of(rounds) for name, rounds in times.items()}
    print("\n| model | decode tokens/s (per round) | vs base | max abs next-token logit diff from mi-peft `add` "
          "| lockstep tokens = `generate` tokens |\n|---|---|---|---|---|")  # fmt: skip
    ratios = {}
    for name, rounds in times.items():
        ratios[name] = speed[name] / speed["base model"]
        per = "/".join(f"{1 / statistics.median(one):.1f}" for one in rounds)
        cells = [
            name,
            f"{speed[name]:.1f} ({per})",
            f"{ratios[name]:.3f}",
            f"{agree[name]:.2e}",
            "yes" if same[name] else "**no**",
        ]
        print("| " + " | ".join(cells) + " |")
    return ratios


def targets_table(med: dict, rss: dict, loss: dict, gen: dict[str, float]) -> list[tuple[str, float, str, bool]]:
    """Every target of issue #13 beside its measured value (printed, never asserted)."""
    rows = []
    for v in (NEURONS, QKVO, BIAS, *UPPER):
        rows.append((f"{v.name}: step vs frozen", med[v.name] / med[FROZEN.name], "<= 1.00"))
        rows.append((f"{v.name}: step vs LoRA r=8", med[v.name] / med[LORA.name], "<= 0.75"))
        if v.name in rss and FROZEN.name in rss:
            rows.append((f"{v.name}: peak RSS vs frozen", rss[v.name]["steps"] / rss[FROZEN.name]["steps"], "<= 1.05"))
    rows.append((f"{loss['name']}: bf16 speed-up (interleaved steps)", loss["speedup"], ">= 1.30"))
    what = f"held-out loss after the steps, bf16 vs float32 ({loss['bf16']:.4f} vs {loss['fp32']:.4f}), relative"
    rows.append((what, abs(loss["bf16"] - loss["fp32"]) / loss["fp32"], "<= 0.02"))
    for name, limit in (("mi-peft steering `add`", 0.99), ("mi-peft conditional steering", 0.97)):
        rows.append((f"{name}: tokens/s vs base", gen[name], f">= {limit:.2f}"))
    print("\n| target | measured | target | met |\n|---|---|---|---|")
    checked = []
    for what, value, target in rows:
        op, limit = target.split()
        met = value <= float(limit) if op == "<=" else value >= float(limit)
        checked.append((what, value, target, met))
        print(f"| {what} | {value:.3f} | {target} | {'yes' if met else '**no**'} |")
    return checked


# ---- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's thread count for the benchmark and restore it, so a test process keeps its own setting."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run(argv: list[str] | None = None) -> dict:
    """Measure everything, print the markdown report, and return the numbers (for tests)."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return measure_and_report(argv, args)


def measure_and_report(argv: list[str] | None, args: argparse.Namespace) -> dict:
    """Every phase in order (peak RSS first, before this process loads a model), then the report."""
    started = time.perf_counter()
    header(argv, args)
    variants = [*TABLE, *UPPER, *BF16]
    rss = peak_rss([*TABLE, *UPPER], args)  # first: the children must not inherit a loaded model
    base, tok = load_model(args.model)
    results = localizations(base)
    batches = text_batches(tok, max(args.loss_steps, args.steps + 1) + 1, args.batch_size, args.seq_len)
    held_out, batches = batches[-1], batches[:-1]
    times, info = timing_rounds(variants, base, results, batches, args)
    loss = loss_comparison(UPPER[0], base, results, batches, held_out, args)
    layers = steer_layers(spec_for(base).n_layers, args.steer_layers)
    models = generation_models(base, layers, args)
    prompt = {k: v[:1, :16] for k, v in held_out.items()}
    decode, same = generation(models, prompt, args, tok.pad_token_id)
    print(f"\n### Training step, batch {args.batch_size} x {args.seq_len} tokens, AdamW, medians of {args.steps} "
          f"steps x {args.rounds} interleaved round(s)")  # fmt: skip
    med = training_table([*TABLE, *UPPER], info, times, rss, loss)
    print("\n### Located-like selection: the backward stops at the lowest selected layer")
    located = located_table(info, med)
    print(f"\n### bf16 autocast vs float32: {loss['name']}, {args.loss_steps} interleaved steps from the same start")
    print(f"\nheld-out loss before {loss['before']:.4f}; after: float32 {loss['fp32']:.4f}, bf16 autocast "
          f"{loss['bf16']:.4f}; step speed-up {loss['speedup']:.2f}x")  # fmt: skip
    print(f"\n### Generation, batch 1, greedy, {args.new_tokens} new tokens, {args.gen_rounds} round(s) in lockstep")
    print(f"\nsteered layers {layers[0]}-{layers[-1]} ({len(layers)} layers), alpha {args.alpha} x the same random "
          "unit vectors in every library; conditional: threshold -1 on a cosine, so every prompt is steered")  # fmt: skip
    agreement = logit_agreement(models, prompt)
    gen = generation_table(decode, agreement, same)
    print("\n### Targets (issue #13; printed, not asserted)")
    targets = targets_table(med, rss, loss, gen)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nload average at end {os.getloadavg()[0]:.1f}; wall time of the whole run {minutes:.1f} min")
    return {"median_step": med, "rss": rss, "info": info, "located": located, "loss": loss, "generation": gen,
            "agreement": agreement, "targets": targets}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
