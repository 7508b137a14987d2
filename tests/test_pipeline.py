"""End-to-end `mi-peft run` on a short setting of the refusal recipe (embedded model)."""

import json
import math
from pathlib import Path

import peft
import pytest
import yaml
from conftest import tiny_llama_with_real_tokenizer

from mi_peft.cli import main
from mi_peft.locate import LocalizationResult
from mi_peft.precision import resolve_precision
from mi_peft.report import comparison_table

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "refusal"

GENERAL_TINY = {"piqa_n": 4, "blimp_n": 1, "ppl_texts": 2, "health_prompts": 2, "health_tokens": 4, "dpo_held_out": 4}
SHORT = {
    "name": "refusal-short",
    "data": {
        "pairs": str(DATA),
        "test_positive": str(DATA / "harmful_test.json"),
        "test_negative": str(DATA / "harmless_test.json"),
        "sft": str(DATA / "sft_train.jsonl"),
        "dpo": str(DATA / "dpo_train.jsonl"),
        "steer_pairs": str(DATA / "steer_pairs.json"),
    },
    "locate": {"pairs": 4, "batch_size": 4},
    "validate": {"top_k": 3, "pairs": 2},
    "steer": {"layers": "8-10", "alphas": [0, 4], "val_prompts": 2, "conditional": True},
    "train": {"steps": 1, "batch_size": 2, "max_length": 96, "param_budget": 0.0005},
    "evaluate": {"n_test": 2, "max_new_tokens": 6, "n_neutral": 2, **GENERAL_TINY},
}


@pytest.mark.slow
def test_run_writes_consistent_report(tmp_path, capsys):
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump(SHORT))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--dpo-steps", "2"]) == 0
    for name in ("report.md", "results.json", "plots/heads.png", "plots/steering_sweep.png", "plots/metrics.png"):
        assert (out / name).is_file(), name
    assert (out / "localization" / "scores.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"]["train"]["dpo_steps"] == 2 and results["recipe"]["train"]["steps"] == 1
    assert len(results["losses"]["sparse located DPO"]) == 2
    names = [row["variant"] for row in results["variants"]]
    assert names[0] == "base" and "sparse located" in names and "sparse random" in names and "LoRA r=8" in names
    assert "sparse located DPO" in names and any(n.startswith("conditional steering (alpha=") for n in names)
    assert "LoRA matched" in names
    for row in results["variants"]:
        for key in ("target", "side", "kl_to_base", "trainable_pct", "train_seconds", "piqa", "blimp", "perplexity"):
            assert math.isfinite(row[key]), (row["variant"], key)
        assert 0.0 <= row["target"] <= 1.0 and 0.0 <= row["side"] <= 1.0
        assert 0.0 <= row["degenerate"] <= 1.0 and 0.0 < row["distinct_2"] <= 1.0
        assert row["piqa_n"] == 4 and row["blimp_n"] == 67 and row["target_n"] == 2
        assert 0.0 <= row["target_low"] <= row["target"] <= row["target_high"] <= 1.0, row["variant"]
    matched = results["variants"][names.index("LoRA matched")]
    located = results["variants"][names.index("sparse located")]
    lora = results["variants"][names.index("LoRA r=8")]
    assert 0 < located["trainable_params"] <= 0.0005 * 134_515_008 < lora["trainable_params"]
    assert abs(matched["trainable_params"] / located["trainable_params"] - 1) <= 0.1
    dpo_row = results["variants"][names.index("sparse located DPO")]
    assert math.isfinite(dpo_row["margin"]) and math.isfinite(results["variants"][0]["margin"])
    assert "Located vs random vs matched LoRA" in (out / "report.md").read_text()
    assert located["adapter_bytes"] > 0 and results["variants"][0]["trainable_params"] == 0
    assert comparison_table(results["variants"]) in (out / "report.md").read_text()
    assert comparison_table(results["variants"]) in capsys.readouterr().out
    env = results["environment"]  # what the numbers ran on, so two reports can be compared
    assert env["train_precision"] == resolve_precision("auto") and env["packages"]["peft"] == peft.__version__
    assert f"base weights sha256: `{env['weights_sha256'][:16]}`" in (out / "report.md").read_text()


RECIPES = DATA.parents[1]
TINY = {
    "locate": {"pairs": 4, "batch_size": 4},
    "validate": {"top_k": 3, "pairs": 2},
    "steer": {"layers": "8-9", "val_prompts": 2},
    "train": {"steps": 1, "batch_size": 2, "param_budget": 0.0005},
    "evaluate": {"n_test": 2, "max_new_tokens": 4, "n_neutral": 2, **GENERAL_TINY},
}


COST = "{texts: %s, n_texts: 4, penalty: 2.0, max_length: 32}" % (RECIPES / "data" / "general" / "wikitext2_valid.txt")


def _tiny_copy(name: str, tmp_path: Path) -> Path:
    """The shipped recipe with absolute data paths and every size cut to a few items."""
    raw = yaml.safe_load((RECIPES / name).read_text())
    for key, value in raw["data"].items():
        if isinstance(value, str):
            raw["data"][key] = str(RECIPES / value)
    for section, values in TINY.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["steer"]["alphas"] = raw["steer"]["alphas"][:2]
    if raw["locate"].get("cost"):
        cost = raw["locate"]["cost"]
        raw["locate"]["cost"] = {**cost, "texts": str(RECIPES / cost["texts"]), "n_texts": 4, "max_length": 32}
    if "sae" in raw["steer"]:  # a small SAE: the recipe's own trains on 40,000 activations
        sae = raw["steer"]["sae"]
        raw["steer"]["sae"] = {**sae, "d_sae": 256, "k": 8, "tokens": 2048, "epochs": 1, "alphas": sae["alphas"][:2]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["language.yaml", "language_gradient.yaml", "refusal_gradient.yaml", "sycophancy.yaml", "sentiment.yaml"]
)
def test_every_shipped_recipe_runs(tmp_path, name):
    out = tmp_path / "run"
    options = {
        "language_gradient.yaml": ["--set", "locate.options={norm: l2, negative_weight: 0}"],
        "refusal_gradient.yaml": [
            "--set",
            "train.layers=3-5",
            "--set",
            "data.dpo=null",
            "--set",
            f"locate.cost={COST}",
        ],
    }.get(name, [])
    assert main(["run", str(_tiny_copy(name, tmp_path)), "--out", str(out), *options]) == 0
    if name == "refusal_gradient.yaml":  # DPO rows (TRL conversational) as triples; every budgeted variant in 3-5
        localization, cost = (LocalizationResult.load(out / name) for name in ("localization", "localization_cost"))
        assert localization.method == "weight_gradient" and cost.method == "slice_fisher"
        assert cost.extra["n_texts"] == 4 and localization.extra["cost"]["penalty"] == 2.0
        assert localization.extra["cost"]["data_hash"] == cost.data_hash
        for variant in ("located", "random", "lora_matched"):
            config = json.loads((out / "adapters" / f"{variant}_sft_b0.0005_s0" / "adapter_config.json").read_text())
            layers = {int(k) for k in (config.get("neurons") or {})} | {int(k) for k in (config.get("heads") or {})}
            layers |= {int(m.split(".")[2]) for m in config.get("target_modules") or []}
            assert layers and layers <= {3, 4, 5}, (variant, layers)
    if name == "language_gradient.yaml":  # the recipe's method options reach locate() and are recorded
        localization = LocalizationResult.load(out / "localization")
        assert localization.method == "weight_gradient" and localization.extra["positions"] == "all"
        assert localization.extra["options"] == {"norm": "l2", "negative_weight": 0}
        assert "metric_negative" not in localization.extra
    results = json.loads((out / "results.json").read_text())
    names = [row["variant"] for row in results["variants"]]
    prompted = name != "sycophancy.yaml"  # the others ask a prompting row under their `evaluate.prompt_baseline`
    assert names[0] == "base" and (names[1] == "base + system prompt") == prompted
    assert names[1 + prompted].startswith("steering add")
    assert {"sparse located", "sparse random", "LoRA r=8"} <= set(names)
    assert ("sparse located DPO" in names) == (name == "sycophancy.yaml")
    assert any(n.startswith("SAE latents add") for n in names) == (name == "sentiment.yaml")
    for row in results["variants"]:
        assert 0.0 <= row["target"] <= 1.0, row
        assert row["side"] is None or 0.0 <= row["side"] <= 1.0, row
        if row["adapter"] == "prompt":  # a system message is no weight change: no KL, no log-likelihood columns
            assert row["kl_to_base"] is None and "piqa" not in row and 0.0 <= row["degenerate"] <= 1.0, row
        else:
            assert row["kl_to_base"] is not None and row["kl_to_base"] >= 0.0, row
    assert math.isfinite(results["validation"]["top_effect"])
    assert comparison_table(results["variants"]) in (out / "report.md").read_text()


@pytest.mark.slow
def test_budget_sweep_with_seeds_at_tiny_size(tmp_path):
    """`--budgets` and `--seeds`: located, random and matched LoRA at each budget, seeds pooled, Pareto plot."""
    raw = {**SHORT, "model": str(tiny_llama_with_real_tokenizer(tmp_path / "tiny")), "name": "sweep"}
    raw["steer"] = {"layers": "0-1", "alphas": [0, 2], "val_prompts": 2}
    raw["train"] = {**SHORT["train"], "kinds": ["neurons"]}
    raw["data"] = {k: v for k, v in SHORT["data"].items() if k != "dpo"}
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--budgets", "0.0002,0.0006", "--seeds", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * (2 * 3 + 1)  # 2 seeds x (2 budgets x located/random/matched + LoRA r=8)
    trained = [r for r in results["variants"] if r["adapter"] in ("located", "random", "lora_matched")]
    assert sorted({r["budget"] for r in trained}) == [0.0002, 0.0006]
    for row in trained:
        assert row["seeds"] == 2 and row["target_n"] == 4  # 2 prompts x 2 seeds pooled
        assert 0.0 <= row["target_low"] <= row["target"] <= row["target_high"] <= 1.0
    small, large = (
        next(r for r in trained if r["adapter"] == "located" and r["budget"] == b) for b in (0.0002, 0.0006)
    )
    assert small["trainable_params"] < large["trainable_params"]
    located_runs = [r for r in results["runs"] if r["adapter"] == "located" and r["budget"] == 0.0002]
    assert len({r["trainable_params"] for r in located_runs}) == 1  # the located selection does not change with seed
    assert [v["budget"] for v in results["verdicts"]] == [0.0002, 0.0006]
    assert (out / "plots" / "budget_pareto.png").read_bytes()[:4] == b"\x89PNG"

    # `mi-peft report` re-derives the verdicts and rewrites the same report from results.json alone
    written = (out / "report.md").read_text()
    (out / "report.md").unlink()
    stripped = {k: v for k, v in results.items() if k != "verdicts"}
    (out / "results.json").write_text(json.dumps(stripped))
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == written
    assert json.loads((out / "results.json").read_text())["verdicts"] == results["verdicts"]
    # a copy without the saved localization (as under docs/results) keeps the score plots it has
    import shutil

    shutil.rmtree(out / "localization")
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == written and "![neurons](plots/neurons.png)" in written


@pytest.mark.slow
def test_conditional_rows_gate_the_trained_adapters_with_the_steering_condition(tmp_path):
    """`train.conditional`: located and random are scored again, gated by the calibrated condition, untrained."""
    raw = {**SHORT, "model": str(tiny_llama_with_real_tokenizer(tmp_path / "tiny")), "name": "gated"}
    raw["steer"] = {"layers": "0-1", "alphas": [0, 2], "val_prompts": 2, "conditional": True}
    raw["train"] = {**SHORT["train"], "kinds": ["neurons"], "conditional": True, "matched_lora": False}
    raw["train"]["lora_baseline"] = False
    raw["data"] = {k: v for k, v in SHORT["data"].items() if k != "dpo"}
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [r["variant"] for r in results["runs"]]
    assert names == ["sparse located", "sparse random", "sparse located, conditional", "sparse random, conditional"]
    by_name = {r["variant"]: r for r in results["runs"]}
    for adapter in ("located", "random"):
        trained, gated = by_name[f"sparse {adapter}"], by_name[f"sparse {adapter}, conditional"]
        assert gated["conditional"] is True and "conditional" not in trained
        assert gated["trainable_params"] == trained["trainable_params"] > 0
        assert gated["train_seconds"] == trained["train_seconds"]  # the same training, not a second one
        (folder,) = (out / "adapters").glob(f"{adapter}_sft_b*_cond_s0")
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert {k: saved["condition"][k] for k in ("layer", "comparator")} == {
            k: results["steering"]["condition"][k] for k in ("layer", "comparator")
        }
        assert math.isclose(saved["condition"]["threshold"], results["steering"]["condition"]["threshold"])
    held_out = results["steering"]["condition"]
    n = 2  # evaluate.n_test prompts of each class
    assert held_out["held_out_tpr"] * n in (0, 1, 2) and held_out["held_out_fpr"] * n in (0, 1, 2)
    assert "On the held-out test prompts (used for no choice) the condition selects" in (out / "report.md").read_text()
    verdict = results["verdicts"][0]["conditional"]
    assert {"random_target", "target_gain_interval", "net_gain_over_unconditional"} <= set(verdict)
    assert ", gated by the condition: located" in (out / "report.md").read_text()


def test_conditional_training_rows_need_the_steering_condition(tmp_path, monkeypatch):
    import mi_peft.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    raw = {**SHORT, "steer": {**SHORT["steer"], "conditional": False}, "train": {**SHORT["train"], "conditional": True}}
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="`train.conditional` .* needs `steer.conditional: true`"):
        pipeline.run_recipe(recipe)


def test_report_refresh_refuses_folders_that_are_not_finished_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "results.json does not exist; pass the --out folder of a finished `mi-peft run`" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"recipe": {}, "variants": []}))
    assert main(["report", str(tmp_path)]) == 2
    assert "lacks ['localization', 'losses', 'steering', 'timings', 'validation']" in capsys.readouterr().err
    assert json.loads((tmp_path / "results.json").read_text()) == {"recipe": {}, "variants": []}
    assert not (tmp_path / "report.md").exists()


def test_bad_budgets_fail_before_any_model_loads(tmp_path, monkeypatch):
    import mi_peft.pipeline as pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "load_model", no_model)
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump(SHORT))
    with pytest.raises(ValueError, match="budget is a fraction"):
        pipeline.run_recipe(recipe, budgets=[0.001, 2.5])
    with pytest.raises(ValueError, match="`--seeds` must be a positive integer"):
        pipeline.run_recipe(recipe, seeds=0)
    with pytest.raises(SystemExit):  # argparse rejects an unreadable list
        main(["run", str(recipe), "--budgets", "0.001,x"])


@pytest.mark.slow
def test_resume_reads_back_finished_variants_and_retrains_stale_ones(tmp_path, monkeypatch):
    """`--resume` trains only what an earlier run into the same folder did not finish under the same settings."""
    import torch

    import mi_peft.evaluate.generation as generation
    import mi_peft.pipeline as pipeline
    import mi_peft.variants as variants

    raw = {**SHORT, "model": str(tiny_llama_with_real_tokenizer(tmp_path / "tiny")), "name": "resume"}
    raw["steer"] = {"layers": "0-1", "alphas": [0], "val_prompts": 2}
    raw["train"] = {**SHORT["train"], "kinds": ["neurons"], "lora_baseline": False, "matched_lora": False}
    raw["data"] = {k: v for k, v in SHORT["data"].items() if k != "dpo"}
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out, trained, located = tmp_path / "run", [], []
    real_train, real_locate = variants.train, pipeline.locate
    monkeypatch.setattr(variants, "train", lambda v, *a, **k: trained.append((v.slug, a[-1])) or real_train(v, *a, **k))
    monkeypatch.setattr(pipeline, "locate", lambda *a, **k: located.append(1) or real_locate(*a, **k))

    def run(*extra):
        trained.clear(), located.clear()
        assert main(["run", str(recipe), "--out", str(out), *extra]) == 0
        return json.loads((out / "results.json").read_text())["runs"]

    first = run("--seeds", "1")
    assert trained == [("located_sft_b0.0005", 0), ("random_sft_b0.0005", 0)] and located == [1]
    scores = LocalizationResult.load(out / "localization").scores
    second = run("--seeds", "2", "--resume")
    assert trained == [("located_sft_b0.0005", 1), ("random_sft_b0.0005", 1)]  # seed 0 was read back, not retrained
    assert located == []  # the saved localization was read back too
    assert second[:2] == first  # the read-back rows are the saved rows, column for column
    assert second[2]["trainable_params"] == first[0]["trainable_params"]  # same located selection for seed 1
    system, asked = "Refuse requests that could cause harm.", []
    real_texts = generation.prompt_texts
    monkeypatch.setattr(generation, "prompt_texts", lambda t, p, c, s: asked.append((*p, s)) or real_texts(t, p, c, s))
    run("--seeds", "2", "--resume", "--set", f"evaluate.prompt_baseline={system}")
    assert trained == [] and located == []  # a prompting row changes no trained row
    _check_prompt_row(out, system, raw["model"], asked)
    monkeypatch.setattr(generation, "prompt_texts", real_texts)
    run("--seeds", "2")  # without --resume everything trains again
    assert len(trained) == 4 and located == [1]
    run("--seeds", "2", "--resume", "--steps", "2")  # other settings: the saved rows and localization are stale
    assert len(trained) == 4 and located == [1]
    reloaded = LocalizationResult.load(out / "localization").scores
    assert all(torch.equal(reloaded[kind], scores[kind]) for kind in scores)  # same settings of locate: same scores


def _check_prompt_row(out: Path, system: str, model_path: str, asked: list[tuple]) -> None:
    """The prompting row is the base model's rates under ``system`` on the held-out prompts, and is compared."""
    from mi_peft import load_model
    from mi_peft.data import read_texts
    from mi_peft.evaluate import refusal_rate
    from mi_peft.evaluate.health import generation_health

    results = json.loads((out / "results.json").read_text())
    rows = {row["variant"]: row for row in results["variants"]}
    assert list(rows)[:2] == ["base", "base + system prompt"]
    prompt, located = rows["base + system prompt"], rows["sparse located"]
    model, tok = load_model(model_path)
    ev = SHORT["evaluate"]
    harmful, harmless = (read_texts(DATA / f"{name}_test.json")[:2] for name in ("harmful", "harmless"))
    health = generation_health(model, tok, n_prompts=2, max_new_tokens=4, system=system)
    for prompts in (harmful, harmless, health.prompts):  # the run asked each under the system message
        assert (*prompts, system) in asked
    assert (*harmful, None) in asked  # ... and the base row without it, in the same run
    assert prompt["target"] == refusal_rate(model, tok, harmful, ev["max_new_tokens"], system=system).rate
    assert prompt["side"] == refusal_rate(model, tok, harmless, ev["max_new_tokens"], system=system).rate
    assert prompt["distinct_2"] == health.distinct_2 and prompt["degenerate"] == health.degenerate_rate
    assert prompt["trainable_params"] == 0 and prompt["kl_to_base"] is None and "piqa" not in prompt
    verdict = results["verdicts"][0]
    net = located["target"] - located["side"] - (prompt["target"] - prompt["side"])
    assert math.isclose(verdict["net_gain_over_prompt"], net) and verdict["net_gain_over_prompt_interval"]
    report = (out / "report.md").read_text()
    assert f'with the system message "{system}" before each held-out prompt' in report
    assert "vs the base model under the system prompt" in report
