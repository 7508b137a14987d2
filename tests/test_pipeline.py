"""End-to-end `mi-peft run` on a short setting of the refusal recipe (embedded model)."""

import json
import math
from pathlib import Path

import pytest
import yaml

from mi_peft.cli import main
from mi_peft.report import comparison_table

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "refusal"

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
    "evaluate": {"n_test": 2, "max_new_tokens": 6, "n_neutral": 2},
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
    for row in results["variants"]:
        for key in ("target", "side", "kl_to_base", "trainable_pct", "train_seconds"):
            assert math.isfinite(row[key]), (row["variant"], key)
        assert 0.0 <= row["target"] <= 1.0 and 0.0 <= row["side"] <= 1.0
    located = results["variants"][names.index("sparse located")]
    lora = results["variants"][names.index("LoRA r=8")]
    assert 0 < located["trainable_params"] <= 0.0005 * 134_515_008 < lora["trainable_params"]
    assert located["adapter_bytes"] > 0 and results["variants"][0]["trainable_params"] == 0
    assert comparison_table(results["variants"]) in (out / "report.md").read_text()
    assert comparison_table(results["variants"]) in capsys.readouterr().out


RECIPES = DATA.parents[1]
TINY = {
    "locate": {"pairs": 4, "batch_size": 4},
    "validate": {"top_k": 3, "pairs": 2},
    "steer": {"layers": "8-9", "val_prompts": 2},
    "train": {"steps": 1, "batch_size": 2, "param_budget": 0.0005},
    "evaluate": {"n_test": 2, "max_new_tokens": 4, "n_neutral": 2},
}


def _tiny_copy(name: str, tmp_path: Path) -> Path:
    """The shipped recipe with absolute data paths and every size cut to a few items."""
    raw = yaml.safe_load((RECIPES / name).read_text())
    for key, value in raw["data"].items():
        if isinstance(value, str):
            raw["data"][key] = str(RECIPES / value)
    for section, values in TINY.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["steer"]["alphas"] = raw["steer"]["alphas"][:2]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["language.yaml", "sycophancy.yaml", "sentiment.yaml"])
def test_every_shipped_recipe_runs(tmp_path, name):
    out = tmp_path / "run"
    assert main(["run", str(_tiny_copy(name, tmp_path)), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [row["variant"] for row in results["variants"]]
    assert names[0] == "base" and names[1].startswith("steering add")
    assert {"sparse located", "sparse random", "LoRA r=8"} <= set(names)
    assert ("sparse located DPO" in names) == (name == "sycophancy.yaml")
    for row in results["variants"]:
        assert 0.0 <= row["target"] <= 1.0, row
        assert row["side"] is None or 0.0 <= row["side"] <= 1.0, row
        assert row["kl_to_base"] is not None and row["kl_to_base"] >= 0.0, row
    assert math.isfinite(results["validation"]["top_effect"])
    assert comparison_table(results["variants"]) in (out / "report.md").read_text()
