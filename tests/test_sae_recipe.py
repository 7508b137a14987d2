"""The SAE row of a recipe run (`steer.sae`): latents located on the recipe's pairs steer next to diff-in-means."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_llama_with_real_tokenizer
from peft import PeftModel
from test_pipeline import SHORT

from mi_peft.cli import main
from mi_peft.models import load_model
from mi_peft.pipeline import run_recipe

SAE = {"layer": 1, "d_sae": 128, "k": 4, "tokens": 1500, "epochs": 1, "top_k": 2, "alphas": [1.0, 4.0]}


def _recipe(tmp_path, sae):
    raw = {**SHORT, "model": str(tiny_llama_with_real_tokenizer(tmp_path / "tiny")), "name": "sae-row"}
    raw["steer"] = {"layers": "0-1", "alphas": [0, 2], "val_prompts": 2, "sae": sae}
    raw["data"] = {k: v for k, v in SHORT["data"].items() if k != "dpo"}
    raw["train"] = {**SHORT["train"], "kinds": ["neurons"], "matched_lora": False, "lora_baseline": False}
    path = tmp_path / "sae.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_sae_row_sits_next_to_diff_in_means_and_its_adapter_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_PEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", str(_recipe(tmp_path, SAE)), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [row["variant"] for row in results["variants"]]
    sae_row = next(row for row in results["variants"] if row["variant"].startswith("SAE latents"))
    assert any(n.startswith("steering add") for n in names)
    assert 0.0 <= sae_row["target"] <= 1.0 and sae_row["trainable_params"] == 0
    info = results["steering"]["sae"]
    assert len(info["latents"]) == 2 and info["best_alpha"] in (1.0, 4.0)
    assert [r["alpha"] for r in info["sweep"]] == [1.0, 4.0]
    assert info["reconstruction"]["fvu"] >= 0.0 and info["reconstruction"]["l0"] > 0
    report = (out / "report.md").read_text()
    assert (
        "SAE latents add" in report
        and f"SAE steering: the top 2 latents by `mean_diff` on the steering pairs ({', '.join(map(str, info['latents']))})"
        in report
    )
    # the saved adapter is self-contained: it reloads without the SAE and changes the logits
    model, tok = load_model(results["recipe"]["model"])
    batch = tok(["Tell me a story."], return_tensors="pt")
    with torch.no_grad():
        clean = model(**batch).logits
        steered = PeftModel.from_pretrained(model, out / "adapters" / "steering_sae")(**batch).logits
    assert not torch.allclose(clean, steered)


@pytest.mark.parametrize(
    ("sae", "message"),
    [
        ({"d_sae": 64}, "at least `layer`"),
        ({"layer": 1, "width": 64}, "unknown `steer.sae` keys"),
        ({"layer": 1, "top_k": 0}, "`steer.sae.top_k` must be a positive integer"),
        ({"layer": 1, "alphas": []}, "`steer.sae.alphas` must be a non-empty list"),
        ({"layer": 1, "alphas": ["x"]}, "`steer.sae.alphas` must be a non-empty list"),
    ],
)
def test_bad_sae_settings_fail_before_any_model_loads(tmp_path, monkeypatch, sae, message):
    import mi_peft.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    raw = {**SHORT, "steer": {**SHORT["steer"], "sae": sae}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message.replace("`", r"\`").replace("[", r"\[")):
        run_recipe(path)
