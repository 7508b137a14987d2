"""examples/*.py at tiny size on a tiny random model folder: numbers are right, summary and plot are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_script, make_tiny, tiny_llama_with_real_tokenizer
from test_locate import one_thread  # noqa: F401  (autouse fixture: tiny models run single-threaded)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mi_peft.capture import ablate
from mi_peft.components import ComponentSet
from mi_peft.data import ContrastivePairs, format_prompts, tokenize
from mi_peft.locate import LocalizationResult
from mi_peft.metrics import COMPLIANCE_TOKENS, REFUSAL_TOKENS, get_metric
from mi_peft.models import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    """Import ``examples/<name>.py`` (its name starts with a digit, so not with ``import``)."""
    module = load_script(EXAMPLES / f"{name}.py")
    return module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny llama folder with a word-level tokenizer that knows the refusal metric's opener words."""
    path = tmp_path_factory.mktemp("tiny")
    make_tiny("llama").save_pretrained(path)
    words = ["<unk>", "<eos>", *REFUSAL_TOKENS, *COMPLIANCE_TOKENS]
    words += [f"w{i}" for i in range(96 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>").save_pretrained(path)
    return path


def _png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_logit_lens_example(tiny_dir, tmp_path):
    """Answers are the model's own first and second choices: final ranks must come out as 0 and 1."""
    model, tok = load_model(str(tiny_dir))
    prompts = ["w5 w6 w7", "w9 w10"]
    answers = []
    for rank, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = model(**tok(prompt, return_tensors="pt")).logits[0, -1]
        answers.append(tok.decode([int(logits.argsort(descending=True)[rank])]))
    items = tmp_path / "prompts.json"
    items.write_text(json.dumps([{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]))
    out = tmp_path / "lens"
    result = example("01_logit_lens").main(["--model", str(tiny_dir), "--out", str(out), "--prompts-file", str(items)])
    assert result["n_prompts"] == 2 and result["n_layers"] == 2
    assert [r["final_rank"] for r in result["rows"]] == [0, 1] and result["n_correct"] == 1
    ranks, probs = torch.tensor(result["ranks"]), torch.tensor(result["probs"])
    assert ranks.shape == probs.shape == (2, 2) and torch.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()
    first = result["rows"][0]
    assert first["first_top1"] in (0, 1) and first["settled_top1"] is not None and first["first_top10"] is not None
    assert result["rows"][1]["first_top1"] is None or result["rows"][1]["settled_top1"] is None
    summary = (out / "summary.md").read_text()
    assert "**1/2**" in summary and all(f"{r['final_prob']:.3f}" in summary for r in result["rows"])
    assert _png(out / "lens.png") and json.loads((out / "results.json").read_text())["n_correct"] == 1
    with pytest.raises(ValueError, match="--prompts must be between 1 and 2"):
        example("01_logit_lens").main(["--model", str(tiny_dir), "--prompts-file", str(items), "--prompts", "3"])


@pytest.fixture(scope="module")
def real_tok_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer: its chat template lets SFT run on the recipe's
    conversational rows and its real " sorry"/" cannot" tokens occur in the steer pairs. Weights are drawn 5x
    larger than the default (initializer_range 0.1), so greedy replies depend on the prompt and on the heads."""
    return tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("real_tok"), initializer_range=0.1)


@pytest.mark.slow
def test_head_ablation_example_at_tiny_size(real_tok_dir, tmp_path):
    from peft import PeftModel

    from mi_peft.evaluate import refusal_rate
    from mi_peft.locate import LocalizationResult
    from mi_peft.stats import wilson_interval

    module, out = example("02_head_ablation"), tmp_path / "heads"
    sizes = ["--model", str(real_tok_dir), "--train-pairs", "4", "--locate-pairs", "4", "--attention-pairs", "6"]
    sizes += ["--harmful", "6", "--batch-size", "4", "--seed", "3"]
    result = module.main([*sizes, "--out", str(out), "--steps", "2", "--harmless", "3"])
    adapter = result["adapter"]
    assert adapter["source"] == "trained" and len(adapter["losses"]) == 2 and all(map(math.isfinite, adapter["losses"]))
    assert adapter["neurons"] > 0 and adapter["trainable_parameters"] > 0

    # The top lists are the 5 highest signed scores of the saved rankings; the random draw is select(random=seed).
    saved = {m: LocalizationResult.load(out / "localization" / m) for m in ("attention", "attribution")}
    for source, ranking in saved.items():
        scores, heads = ranking.scores["heads"], [tuple(h) for h in result["heads"][source]]
        picked = [float(scores[h]) for h in heads]
        others = [float(scores[layer, h]) for layer in range(2) for h in range(4) if (layer, h) not in heads]
        assert len(set(heads)) == 5 and picked == sorted(picked, reverse=True) and min(picked) >= max(others)
        drawn = ranking.select(top_k=5, kinds=("heads",), random=3)
        assert sorted(result["heads"]["random"]) == sorted([la, h] for la, hs in drawn.heads.items() for h in hs)
        for heads_of, scores_of in zip(result["heads"].values(), result["head_scores"].values(), strict=True):
            column = 0 if source == "attention" else 1
            assert [s[column] for s in scores_of] == pytest.approx([float(scores[tuple(h)]) for h in heads_of])
    common = {tuple(h) for h in result["heads"]["attention"]} & {tuple(h) for h in result["heads"]["attribution"]}
    assert result["overlap"]["attention_attribution"] == sorted(list(h) for h in common)

    clean, sources = result["clean"], module.SOURCES
    rows = [p for s in sources for p in (*result["ablations"][s]["single"], result["ablations"][s]["all"])]
    assert len(rows) == 18 and [len(p["heads"]) for p in rows] == [1, 1, 1, 1, 1, 5] * 3
    for point in (clean, *rows):
        assert point["n"] == 6 and point["refusals"] == sum(point["flags"]) and point["rate"] == point["refusals"] / 6
        assert tuple(point["ci95"]) == pytest.approx(wilson_interval(point["refusals"], 6))
    for source in sources:
        entry = result["ablations"][source]
        assert [p["heads"] for p in entry["single"]] == [[h] for h in result["heads"][source]]
        assert entry["all"]["heads"] == result["heads"][source]
        for point in (*entry["single"], entry["all"]):
            assert point["change"] == pytest.approx(point["rate"] - clean["rate"])
            assert point["lost"] - point["gained"] == clean["refusals"] - point["refusals"]
    assert any(result["ablations"][s]["all"]["generations"] != clean["generations"] for s in sources)
    over = result["over_refusal"]
    assert over["none"]["n"] == 3 and all(over[s]["heads"] == result["heads"][s] for s in sources)

    # Independent re-measurement: the saved adapter on the base model, the attribution heads zero-ablated.
    base, tok = load_model(str(real_tok_dir))
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    heads: dict[int, list[int]] = {}
    for layer, head in result["heads"]["attribution"]:
        heads.setdefault(layer, []).append(head)
    harmful = ContrastivePairs.load(EXAMPLES.parent / "recipes" / "data" / "refusal", split="test").positive[:6]
    with ablate(model, heads=heads):
        again = refusal_rate(model, tok, harmful, max_new_tokens=8, batch_size=4)
    assert again.generations == result["ablations"]["attribution"]["all"]["generations"]

    summary = (out / "summary.md").read_text()
    assert summary.count("**all 5**") == 3 and f"top 5: {len(common)}/5" in summary
    for point in (clean, *rows, *over.values()):
        assert f"{point['rate']:.3f} ({point['refusals']}/{point['n']}) | [{point['ci95'][0]:.3f}" in summary
    assert _png(out / "head_ablation.png")
    assert json.loads((out / "results.json").read_text())["heads"] == result["heads"]

    # --adapter skips training and gives the same model: same heads, same replies.
    reuse = ["--out", str(tmp_path / "reuse"), "--adapter", str(out / "adapter"), "--harmless", "0"]
    reused = module.main([*sizes, *reuse])
    assert reused["adapter"]["source"] == "loaded" and reused["over_refusal"] is None
    assert reused["heads"] == result["heads"] and reused["clean"]["generations"] == clean["generations"]
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json. Adapter folders below it: heads/adapt"):
        module.main(["--adapter", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        module.main(["--adapter", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="exceeds the 150 held-out harmful prompts"):
        module.main(["--harmful", "151"])


def _refusal_metric_under(model, tok, prompts, components: dict) -> float:
    """Mean refusal metric of ``prompts`` with ``components`` zero-ablated, one prompt at a time."""
    metric, comps = get_metric("refusal", tok), ComponentSet.from_dict(components)
    heads = {int(k): v for k, v in comps.heads.items()} or None
    neurons = {int(k): v for k, v in comps.neurons.items()} or None
    values = []
    with torch.no_grad(), ablate(model, heads=heads, neurons=neurons):
        for text in format_prompts(tok, prompts):
            batch = tokenize(tok, [text])
            values.append(float(metric(model(**batch).logits, batch)[0]))
    return sum(values) / len(values)


def test_controlled_ablation_example(tiny_dir, tmp_path):
    out = tmp_path / "ablation"
    args = ["--model", str(tiny_dir), "--out", str(out), "--pairs", "6", "--eval-prompts", "5", "--ks", "2,1"]
    args += ["--random-seeds", "2", "--ppl-texts", "2", "--piqa", "4", "--blimp", "1", "--batch-size", "3"]
    result = example("04_controlled_ablation").main(args)
    assert result["ks"] == [1, 2] and len(result["located"]) == len(result["random"]) == 2
    for loc, rnd in zip(result["located"], result["random"], strict=True):
        assert loc["heads"] + loc["neurons"] == loc["k"] and len(rnd["draws"]) == 2
        for draw in rnd["draws"]:  # the control has as many heads and neurons as the located set
            assert (draw["heads"], draw["neurons"]) == (loc["heads"], loc["neurons"])
        for point in (loc, rnd, *rnd["draws"]):
            assert all(math.isfinite(point[key]) for key in ("metric", "perplexity", "metric_drop", "ppl_increase"))
    clean = result["clean"]
    assert {"metric", "perplexity", "piqa", "blimp"} <= set(clean) and 0 <= result["located"][-1]["piqa"] <= 1
    assert "blimp" in result["random"][-1]["draws"][0] and "piqa" not in result["located"][0]

    # The reported numbers match an independent re-measurement with the recorded components ablated.
    model, tok = load_model(str(tiny_dir))
    held_out = ContrastivePairs.load(EXAMPLES.parent / "recipes" / "data" / "refusal", split="test").positive[:5]
    assert _refusal_metric_under(model, tok, held_out, {}) == pytest.approx(clean["metric"], abs=1e-4)
    for point in (result["located"][-1], result["random"][0]["draws"][1]):
        ablated = _refusal_metric_under(model, tok, held_out, point["components"])
        assert ablated == pytest.approx(point["metric"], abs=1e-4)
        assert point["metric_drop"] == pytest.approx(clean["metric"] - ablated, abs=1e-4)

    summary = (out / "summary.md").read_text()
    for point in result["located"] + result["random"]:
        assert f"{point['metric_drop']:+.3f}" in summary and f"{point['ppl_increase']:+.2f}" in summary
    assert f"{clean['metric']:.3f}" in summary and "PIQA accuracy at k=2" in summary
    assert _png(out / "ablation.png") and json.loads((out / "results.json").read_text())["ks"] == [1, 2]
    with pytest.raises(ValueError, match="--ks must be comma-separated positive integers"):
        example("04_controlled_ablation").main(["--ks", "0,2"])


def test_steering_robustness_example(tiny_dir, tmp_path):
    from peft import get_peft_model

    from mi_peft import SteeringConfig, directions

    out = tmp_path / "robustness"
    args = ["--model", str(tiny_dir), "--out", str(out), "--pairs", "4", "--eval-prompts", "3", "--kl-texts", "2"]
    args += ["--kl-tokens", "16", "--layers", "1,0", "--alphas", "4,0", "--batch-size", "2"]
    module = example("05_steering_robustness")
    result = module.main(args)
    assert result["layers"] == [0, 1] and result["alphas"] == [0.0, 4.0] and result["methods"] == list(module.METHODS)
    for m in module.METHODS:
        effect, kl = torch.tensor(result["effect"][m]), torch.tensor(result["kl"][m])
        assert effect.shape == kl.shape == (2, 2) and torch.isfinite(effect).all() and torch.isfinite(kl).all()
        assert effect[:, 0].abs().max() < 1e-5 and kl[:, 0].abs().max() < 1e-5  # alpha 0: the base model
        assert (kl[:, 1] > 1e-6).all()  # a real push moves the next-token distribution
    for values in result["cosines"].values():
        assert len(values) == 2 and all(-1 - 1e-5 <= v <= 1 + 1e-5 for v in values)
    assert len(result["mean_diff_norm"]) == 2 and all(n > 0 for n in result["mean_diff_norm"])

    # One cell re-measured independently: the diff-in-means adapter at layer 1, alpha 4 x its norm.
    model, tok = load_model(str(tiny_dir))
    data = EXAMPLES.parent / "recipes" / "data" / "refusal"
    pairs = ContrastivePairs.load(data).subset(4)
    dirs = directions(model, tok, pairs, method="mean_diff", layers=[0, 1], progress=False)
    held_out = json.loads((data / "harmless_test.json").read_text())[:3]
    prompts = [item["instruction"] for item in held_out]
    base = _refusal_metric_under(model, tok, prompts, {})
    assert base == pytest.approx(result["base_metric"], abs=1e-4)
    steered = get_peft_model(model, SteeringConfig.from_directions(dirs, layers=[1], alpha=4 * dirs.norms[1]))
    try:
        value = _refusal_metric_under(steered, tok, prompts, {})
    finally:
        steered.unload()
    assert value - base == pytest.approx(result["effect"]["mean_diff"][1][1], abs=1e-4)

    summary = (out / "summary.md").read_text()
    for m in module.METHODS:
        for row_effect, row_kl in zip(result["effect"][m], result["kl"][m], strict=True):
            assert all(f"{e:+.3f} / {k:.3f}" in summary for e, k in zip(row_effect, row_kl, strict=True))
    assert f"{result['base_metric']:.3f}" in summary and "| alpha 0 | alpha 4 |" in summary
    assert _png(out / "robustness.png") and json.loads((out / "results.json").read_text())["layers"] == [0, 1]
    with pytest.raises(ValueError, match="--alphas must be comma-separated numbers"):
        module.main(["--alphas", "x"])


def test_truthfulness_steering_example(tiny_dir, tmp_path):
    from mi_peft.evaluate.general import continuation_logprobs

    out = tmp_path / "truthfulness"
    args = ["--model", str(tiny_dir), "--out", str(out), "--train", "4", "--test", "5", "--layers", "1"]
    args += ["--alphas", "1.5,0", "--iti-heads", "2", "--iti-alphas", "15", "--batch-size", "3"]
    module = example("03_truthfulness_steering")
    result = module.main(args)
    assert [(p["layer"], p["alpha"]) for p in result["residual"]] == [(1, 0.0), (1, 1.5)]
    assert [p["alpha"] for p in result["iti"]] == [15.0] and len(result["iti_head_list"]) == 2
    for point in (result["base"], *result["residual"], *result["iti"]):
        assert point["n"] == 5 and point["accuracy"] == point["correct"] / 5 and math.isfinite(point["margin"])
        assert point["ci95"][0] <= point["accuracy"] <= point["ci95"][1]
    zero = result["residual"][0]  # alpha 0 is the base model
    assert zero["correct"] == result["base"]["correct"] and zero["margin"] == pytest.approx(result["base"]["margin"])
    assert result["residual"][1]["margin"] != pytest.approx(result["base"]["margin"])

    # The base accuracy re-measured independently on the same held-out questions.
    model, tok = load_model(str(tiny_dir))
    _, test = module.load_questions(module.DEFAULT_DATA, 4, 5, 0)
    contexts = format_prompts(tok, [q["Question"] for q in test])
    good, _ = continuation_logprobs(model, tok, contexts, [q["Best Answer"] for q in test])
    bad, _ = continuation_logprobs(model, tok, contexts, [q["Best Incorrect Answer"] for q in test])
    assert sum(g > b for g, b in zip(good, bad, strict=True)) == result["base"]["correct"]

    summary = (out / "summary.md").read_text()
    for point in (result["base"], *result["residual"], *result["iti"]):
        assert f"{point['accuracy']:.3f} ({point['correct']}/5)" in summary and f"{point['margin']:+.3f}" in summary
    assert _png(out / "truthfulness.png") and json.loads((out / "results.json").read_text())["test"] == 5
    with pytest.raises(ValueError, match="exceeds the 790 questions"):
        module.main(["--model", str(tiny_dir), "--train", "700", "--test", "100"])


def test_neuron_firing_example_against_gates_by_hand(real_tok_dir, tmp_path):
    """Firing shares at the last prompt token match gates recomputed one unpadded prompt at a time."""
    from mi_peft.arch import spec_for
    from mi_peft.data_files import read_texts

    module, out = example("07_neuron_firing"), tmp_path / "firing"
    result = module.main(["--model", str(real_tok_dir), "--out", str(out), "--pairs", "6", "--prompts", "5"])
    model, tok = load_model(str(real_tok_dir))
    spec = spec_for(model)
    located = [(int(layer), i) for layer, idx in result["located_neurons"].items() for i in idx]
    assert result["n_located"] == len(located) > 0
    texts = format_prompts(tok, read_texts(module.DATA / "instructions_test.json")[:5])
    gates = []
    handles = [
        spec.layer_module(model, layer, spec.mlp_in[0]).register_forward_hook(
            lambda _m, _a, output: gates.append(output[0, -1, : spec.n_neurons])
        )
        for layer in range(spec.n_layers)
    ]
    fired = []
    for text in texts:
        with torch.no_grad():
            model(**tok(text, return_tensors="pt"))
        fired.append(torch.stack(gates[-spec.n_layers :]) > 0)  # [n_layers, n_neurons] at the last token
    for handle in handles:
        handle.remove()
    share = torch.stack(fired).float().mean(0)
    expected = float(torch.stack([share[layer, i] for layer, i in located]).mean())
    assert result["located"]["instruction, last token"] == pytest.approx(expected, abs=1e-6)
    assert result["all_neurons"]["instruction, last token"] == pytest.approx(float(share.mean()), abs=1e-6)
    for name in ("located", "random", "all_neurons"):
        assert all(0.0 <= result[name][place] <= 1.0 for place in module.PLACES)
    assert len(result["random_draws"]) == 3
    summary = (out / "summary.md").read_text()
    assert f"{expected:.3f}" in summary and _png(out / "firing.png")
    assert json.loads((out / "results.json").read_text())["n_located"] == len(located)
    with pytest.raises(SystemExit):
        module.main(["--model", str(real_tok_dir), "--budget", "2"])
    # --localization: the selection comes from a saved result (here neuron scores made up for the test)
    saved = LocalizationResult.from_model(model, {"neurons": torch.rand(spec.n_layers, spec.n_neurons)}, "custom")
    saved.save(tmp_path / "loc")
    again = module.main(
        ["--model", str(real_tok_dir), "--out", str(out), "--prompts", "5", "--localization", str(tmp_path / "loc")]
    )
    chosen = saved.select(param_budget=0.0013, kinds=("neurons",))
    assert again["method"] == "custom" and again["located_neurons"] == {str(k): v for k, v in chosen.neurons.items()}
    assert "`custom`" in (out / "summary.md").read_text()
