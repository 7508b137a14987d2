"""The truthfulness recipe: its data, the binary-choice scorer, its validation and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script, tiny_llama_with_real_tokenizer

from mi_peft.cli import main
from mi_peft.data import encode, format_prompts
from mi_peft.evaluate import mc_accuracy, mc_items
from mi_peft.recipe import load_recipe
from mi_peft.report import comparison_table

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DATA = RECIPES / "data" / "truthfulness"
GENERAL_TINY = {"piqa_n": 4, "blimp_n": 1, "ppl_texts": 2, "health_prompts": 2, "health_tokens": 4}


def _json(name: str) -> list[dict]:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def test_data_is_split_by_question_and_rebuilds_identically():
    build = load_script(DATA / "build.py")
    parts = build.build()
    assert parts["test_mc"] == _json("test_mc.json") and parts["pairs"] == _json("pairs.json")
    sft = [json.loads(line) for line in (DATA / "sft_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert parts["sft_train"] == sft
    test = {r["question"] for r in parts["test_mc"]}
    pairs = {r["question"] for r in parts["pairs"]}
    train = {r["prompt"][0]["content"] for r in sft}
    assert (len(test), len(pairs), len(train)) == (250, 160, 380)
    assert not (test & pairs or test & train or pairs & train)
    assert all(r["completion"][0]["role"] == "assistant" and r["completion"][0]["content"] for r in sft)
    mc_items(parts["test_mc"])  # every row has question, correct, incorrect
    for name in ("LICENSE", "SOURCE.md"):
        assert len((DATA / name).read_text(encoding="utf-8")) > 200, name
    assert "Apache License" in (DATA / "LICENSE").read_text(encoding="utf-8")


def test_shipped_recipe_loads_with_iti_and_head_bias():
    from mi_peft.variants import learning_rate, plan

    recipe = load_recipe("truthfulness")
    assert recipe.evaluate.behaviour == "mc" and recipe.locate.method == "probe"
    assert recipe.steer.iti_top_k == 18 and recipe.train.head_mode == "bias" and recipe.train.kinds == ("heads",)
    assert recipe.evaluate.n_test + recipe.steer.val_prompts <= len(_json("test_mc.json"))
    rates = {v.name: learning_rate(v, recipe) for v in plan(recipe)}
    tr = recipe.train
    assert rates == {
        "sparse located": tr.lr,
        "sparse random": tr.lr,
        "LoRA matched": tr.matched_lora_lr,
        "LoRA r=8": tr.lora_lr,
    }
    assert tr.matched_lora_lr != tr.lora_lr  # the matched LoRA has its own step size; LoRA r=8 keeps `lora_lr`
    default = load_recipe("refusal")  # without the field, every LoRA trains at `lora_lr` as before
    assert {learning_rate(v, default) for v in plan(default) if v.adapter.startswith("lora")} == {default.train.lora_lr}


def _hand_margin(model, tok, question: str, good: str, bad: str) -> float:
    """log p(good | chat-formatted question) - log p(bad | ...), summed token by token from one forward pass each."""
    context = format_prompts(tok, [question])[0]
    start = len(encode(tok, context.rstrip()))  # the scorer moves the context's trailing newline to the answer

    def total(answer: str) -> float:
        ids = encode(tok, context + answer)
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))

    return total(good) - total(bad)


def test_mc_scorer_matches_a_hand_computed_comparison(tmp_path):
    from mi_peft.models import load_model

    model, tok = load_model(str(tiny_llama_with_real_tokenizer(tmp_path / "tiny", layers=2)))
    rows = _json("test_mc.json")[:6]
    questions, good, bad = mc_items(rows)
    result = mc_accuracy(model, tok, questions, good, bad, batch_size=4)
    hand = [_hand_margin(model, tok, q, g, b) for q, g, b in zip(questions, good, bad, strict=True)]
    assert result.margins == pytest.approx(hand, abs=1e-4)
    assert result.correct == sum(m > 0 for m in hand) and result.n == 6 and result.accuracy == result.correct / 6
    assert result.interval()[0] <= result.accuracy <= result.interval()[1]
    swapped = mc_accuracy(model, tok, questions, bad, good, batch_size=4)  # right and wrong answers exchanged
    assert swapped.margins == pytest.approx([-m for m in hand], abs=1e-4) and swapped.correct == 6 - result.correct


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "truthfulness.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _absolute_copy() -> dict:
    raw = yaml.safe_load((RECIPES / "truthfulness.yaml").read_text())
    for key, value in raw["data"].items():
        if isinstance(value, str):
            raw["data"][key] = str(RECIPES / value)
    return raw


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r, bad: r["data"].update(test_positive=str(bad)), r"row 1 key 'incorrect' is missing"),
        (lambda r, bad: r["data"].update(test_negative=r["data"]["test_positive"]), "has no side prompts"),
        (lambda r, bad: r["locate"].update(method="attribution_patching"), "`steer.iti_top_k` steers the heads"),
        (lambda r, bad: r["locate"].update(components=["neurons"]), "with `heads` in `locate.components`"),
        (lambda r, bad: r["steer"].update(iti_top_k=0), "`steer.iti_top_k` must be a positive integer"),
        (lambda r, bad: r["steer"].update(iti_alphas=[]), "`steer.iti_alphas` must be a non-empty list"),
        (lambda r, bad: r["validate"].update(top_k=-1), r"`validate.top_k` must be an integer >= 0"),
    ],
)
def test_bad_truthfulness_recipes_name_the_problem(tmp_path, edit, message):
    bad = tmp_path / "bad_mc.json"
    rows = _json("test_mc.json")[:40]
    del rows[1]["incorrect"]
    bad.write_text(json.dumps(rows))
    raw = _absolute_copy()
    raw["evaluate"]["n_test"] = 30
    edit(raw, bad)
    with pytest.raises(ValueError, match=message):
        load_recipe(_write(tmp_path, raw))


@pytest.mark.slow
def test_recipe_runs_end_to_end_at_tiny_size(tmp_path):
    raw = _absolute_copy()
    raw["model"] = str(tiny_llama_with_real_tokenizer(tmp_path / "tiny", layers=4))
    raw["locate"].update(pairs=6, batch_size=4)
    raw["validate"].update(top_k=3, pairs=3)
    raw["steer"].update(layers="1", alphas=[0, 4], val_prompts=3, iti_top_k=8, iti_alphas=[0, 5])
    # 8 heads x 16-dim bias = 128 parameters = a rank-1 LoRA on one 64x64 o_proj (the matched LoRA)
    raw["train"].update(steps=1, batch_size=2, max_length=96, param_budget=128)
    raw["evaluate"].update(n_test=5, n_neutral=2, **GENERAL_TINY)
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, raw)), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [row["variant"] for row in results["variants"]]
    assert names[:3] == ["base", names[1], names[2]] and names[1].startswith("steering add (alpha=")
    assert names[2].startswith("ITI heads (top_k=8, alpha=")
    assert names[3:] == ["sparse located", "sparse random", "LoRA matched", "LoRA r=8"]
    for row in results["variants"]:
        assert 0.0 <= row["target_low"] <= row["target"] <= row["target_high"] <= 1.0, row["variant"]
        assert row["target_n"] == 5 and row["side"] is None and row["side_n"] == 0
        assert row["target"] * 5 == pytest.approx(round(row["target"] * 5))
        for key in ("kl_to_base", "piqa", "blimp", "perplexity", "distinct_2"):
            assert math.isfinite(row[key]), (row["variant"], key)
    rows = dict(zip(names, results["variants"], strict=True))
    located, rand, matched = rows["sparse located"], rows["sparse random"], rows["LoRA matched"]
    assert located["trainable_params"] == rand["trainable_params"] == matched["trainable_params"] == 128
    assert rows["LoRA r=8"]["trainable_params"] > 128 and rows["base"]["trainable_params"] == 0
    iti = results["steering"]["iti"]
    assert [r["alpha"] for r in iti["sweep"]] == [0.0, 5.0] and len(iti["heads"]) == 8
    assert names[2] == f"ITI heads (top_k=8, alpha={iti['best_alpha']:g})"
    top8 = {tuple(head) for head, _ in results["localization"]["top_heads"][:8]}
    assert {tuple(h) for h in iti["heads"]} == top8  # ITI steers the heads the probes rank best
    validation = results["validation"]
    assert validation["metric"] == "logprob (positive - negative)" and math.isfinite(validation["top_effect"])
    report = (out / "report.md").read_text()
    assert comparison_table(results["variants"]) in report and "| ITI alpha | target | side |" in report
    assert "correct answer more likely (binary choice)" in report
    assert (out / "adapters" / "steering_iti" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_skipped_validation_is_reported(tmp_path):
    raw = _absolute_copy()
    raw["model"] = str(tiny_llama_with_real_tokenizer(tmp_path / "tiny", layers=2))
    raw["locate"].update(pairs=4, batch_size=4)
    raw["validate"] = {"top_k": 0}
    raw["steer"] = {"layers": "1", "alphas": [0], "val_prompts": 2}
    raw["train"].update(steps=1, batch_size=2, max_length=96, param_budget=32, matched_lora=False, lora_baseline=False)
    raw["evaluate"] = {"behaviour": "mc", "n_test": 3, "n_neutral": 2, "general": False}
    out = tmp_path / "run"
    assert main(["run", str(_write(tmp_path, raw)), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["validation"] == {"k": 0, "skipped": "`validate.top_k: 0` in the recipe"}
    assert "Skipped (`validate.top_k: 0` in the recipe)" in (out / "report.md").read_text()
    assert "iti" not in results["steering"] and not any(r["variant"].startswith("ITI") for r in results["variants"])
