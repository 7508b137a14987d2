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
    },
    "locate": {"pairs": 4, "batch_size": 4},
    "validate": {"top_k": 3, "pairs": 2},
    "steer": {"layers": "8-10", "alphas": [0, 4], "val_prompts": 2},
    "train": {"steps": 1, "batch_size": 2, "max_length": 96, "param_budget": 0.0005},
    "evaluate": {"n_test": 2, "max_new_tokens": 6, "n_neutral": 2},
}


@pytest.mark.slow
def test_run_writes_consistent_report(tmp_path, capsys):
    recipe = tmp_path / "short.yaml"
    recipe.write_text(yaml.safe_dump(SHORT))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for name in ("report.md", "results.json", "plots/heads.png", "plots/steering_sweep.png", "plots/metrics.png"):
        assert (out / name).is_file(), name
    assert (out / "localization" / "scores.safetensors").is_file()
    results = json.loads((out / "results.json").read_text())
    names = [row["variant"] for row in results["variants"]]
    assert names[0] == "base" and "sparse located" in names and "sparse random" in names and "LoRA r=8" in names
    assert "sparse located DPO" in names and "conditional steering" in names
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
