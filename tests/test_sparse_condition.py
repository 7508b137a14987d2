"""Conditional sparse adapters: the slices act only on the sequences the condition selects, read on the base model."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

from mi_peft import capture
from mi_peft.export.lora import to_lora
from mi_peft.tuners.sparse import SparseConfig
from mi_peft.tuners.steering import SteeringCondition
from mi_peft.tuners.steering.condition import condition_scores

D_MODEL = 64


def base_model(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def sparse_config(**extra) -> SparseConfig:
    return SparseConfig(heads={1: [0, 2]}, neurons={0: [3, 64], 2: [5]}, init_weights=False, **extra)


def batch(seed: int = 1, rows: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.randint(3, 120, (rows, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def splitting_condition(model, inputs, layer: int = 1) -> tuple[SteeringCondition, torch.Tensor]:
    """A condition whose threshold lies between the base model's scores, so some rows are selected and some not."""
    torch.manual_seed(7)
    direction = torch.randn(D_MODEL)
    with torch.no_grad(), capture.record(model, residual=[layer], positions="all") as cache:
        model(**inputs, use_cache=False)
    scores = condition_scores(cache.residual[layer], direction / direction.norm(), inputs["attention_mask"], "cosine")
    threshold = float(scores.median())
    condition = SteeringCondition(direction=direction, layer=layer, threshold=threshold)
    return condition, scores > threshold


def conditional_model(layer: int = 1, task_type: str | None = None):
    """A conditional sparse adapter on a fresh base model, its inputs, condition and selected rows."""
    inputs = batch()
    base = base_model()
    condition, selected = splitting_condition(base, inputs, layer)
    model = get_peft_model(base, sparse_config(task_type=task_type))
    model.set_condition(condition)
    return model, inputs, condition, selected


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


TASK_TYPES = pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])  # PeftModel and PeftModelForCausalLM


@TASK_TYPES
def test_selected_rows_get_the_adapter_and_the_others_the_base_model_exactly(task_type):
    inputs = batch()
    base = base_model()
    base_logits = logits(base, inputs)
    condition, selected = splitting_condition(base, inputs)
    assert 0 < int(selected.sum()) < len(selected)
    model = get_peft_model(base, sparse_config(task_type=task_type))
    adapted_logits = logits(model, inputs)
    model.set_condition(condition)
    gated_logits = logits(model, inputs)
    assert torch.equal(gated_logits[~selected], base_logits[~selected])
    assert torch.allclose(gated_logits[selected], adapted_logits[selected], atol=1e-5)
    assert not torch.allclose(adapted_logits[~selected], base_logits[~selected], atol=1e-3)  # the slices do act


@TASK_TYPES
def test_generate_decides_on_the_prompt_and_keeps_it_for_every_generated_token(task_type):
    inputs = batch(rows=4, length=6)
    base = base_model()
    condition, selected = splitting_condition(base, inputs)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base_out = base.generate(**inputs, **options)
        model = get_peft_model(base, sparse_config(task_type=task_type))
        adapted_out = model.generate(**inputs, **options)
        model.set_condition(condition)
        gated_out = model.generate(**inputs, **options)
    assert torch.equal(gated_out[~selected], base_out[~selected])
    assert torch.equal(gated_out[selected], adapted_out[selected])
    assert not torch.equal(adapted_out, base_out)


def test_the_condition_is_read_on_the_base_model_not_on_the_adapted_one():
    inputs = batch()
    base = base_model()
    condition, selected = splitting_condition(base, inputs, layer=2)  # layer 2 lies after adapted layers 0 and 1
    model = get_peft_model(base, sparse_config())
    with torch.no_grad(), capture.record(model, residual=[2], positions="all") as cache:
        model(**inputs, use_cache=False)
    adapted_scores = condition_scores(cache.residual[2], condition.direction, inputs["attention_mask"], "cosine")
    assert not torch.equal(adapted_scores > condition.threshold, selected)  # read there, the decision would differ
    model.set_condition(condition)
    model(**inputs)
    assert torch.equal(model.base_model.sparse_gate.rows["default"], selected)


@TASK_TYPES
def test_only_selected_rows_train(task_type):
    model, inputs, condition, selected = conditional_model(task_type=task_type)
    out = model(**inputs)
    out.logits[~selected].float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or not g.any() for g in grads)
    model.zero_grad()
    out = model(**inputs)
    out.logits[selected].float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters() if p.requires_grad)


def test_save_and_reload_keep_the_condition_exactly(tmp_path):
    model, inputs, condition, _ = conditional_model()
    before = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter")
    config = reloaded.peft_config["default"]
    assert config.condition == condition.to_dict()
    assert torch.equal(torch.tensor(config.condition_direction), condition.direction)
    assert torch.equal(logits(reloaded, inputs), before)


def test_merge_is_refused_and_leaves_the_weights_as_they_were():
    model, inputs, condition, _ = conditional_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge conditional sparse adapter.*set_condition\(None\)"):
        model.merge_and_unload()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    model.set_condition(None)
    unconditional = logits(model, inputs)
    merged = model.merge_and_unload()
    assert torch.allclose(logits(merged, inputs), unconditional, atol=1e-5)


def test_export_refuses_a_conditional_adapter(tmp_path):
    base = base_model()
    condition, _ = splitting_condition(base, batch())
    model = get_peft_model(base, sparse_config())
    model.set_condition(condition)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="conditional sparse adapter.*set_condition\\(None\\)"):
        to_lora(tmp_path / "adapter", tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_bad_conditions_are_refused_with_the_fix():
    model = get_peft_model(base_model(), sparse_config())
    with pytest.raises(ValueError, match="has 32 values; this model's d_model is 64"):
        model.set_condition(SteeringCondition(direction=torch.ones(32), layer=0, threshold=0.0))
    with pytest.raises(ValueError, match="layer"):
        model.set_condition(SteeringCondition(direction=torch.ones(D_MODEL), layer=9, threshold=0.0))
    with pytest.raises(TypeError, match="must be a SteeringCondition"):
        model.set_condition(0.5)
    with pytest.raises(ValueError, match="go together"):
        sparse_config(condition={"layer": 0, "threshold": 0.1})
    with pytest.raises(ValueError, match="zero vector"):
        sparse_config(condition={"layer": 0, "threshold": 0.1}, condition_direction=[0.0] * D_MODEL)
    assert model.peft_config["default"].condition is None  # nothing was set by the refused calls
