"""Fingerprints: one checkpoint in any float dtype or 4-bit shares one; another checkpoint does not."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, make_tiny
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import mi_peft.tuners.sparse  # noqa: F401  (registers the "sparse" PEFT method)
from mi_peft.fingerprint import FingerprintMismatchError, fingerprints_match, model_fingerprint
from mi_peft.tuners.sparse import SparseConfig

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# head_dim 64 and an MLP of 256: 4-bit blocks of 64 divide every projection, as in real checkpoints
QUANT_CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2)


def _ids() -> torch.Tensor:
    return torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_float_dtypes_share_and_other_checkpoints_do_not(arch):
    model = make_tiny(arch)
    prints = [model_fingerprint(copy.deepcopy(model).to(dtype)) for dtype in DTYPES]
    for a in prints:
        for b in prints:
            assert fingerprints_match(a, b), (a, b)
    assert not fingerprints_match(prints[0], model_fingerprint(make_tiny(arch, seed=1)))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.get_input_embeddings().weight[0, 0] += 1.0  # one weight, at a sampled position
    assert not fingerprints_match(prints[0], model_fingerprint(changed))


def test_structure_counts_and_adapters_do_not():
    model = make_tiny("llama")
    wider = transformers.LlamaConfig(**{**TINY_CONFIGS["llama"]().to_dict(), "num_hidden_layers": 3})
    deeper = AutoModelForCausalLM.from_config(wider)
    assert model_fingerprint(model).split(".")[0] != model_fingerprint(deeper).split(".")[0]
    wrapped = get_peft_model(copy.deepcopy(model), SparseConfig(heads={0: [1]}, init_weights=False))
    assert model_fingerprint(wrapped) == model_fingerprint(model)


def test_codes_tolerate_one_step_only():
    base = model_fingerprint(make_tiny("gpt2"))
    structure, codes = base.split(".")
    first = int(codes[:2], 16)
    assert fingerprints_match(base, f"{structure}.{first + 1:02x}{codes[2:]}")
    assert not fingerprints_match(base, f"{structure}.{first + 2:02x}{codes[2:]}")
    assert not fingerprints_match(base, f"{'0' * 16}.{codes}")


def _float_and_4bit(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**QUANT_CONFIG, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu"
    ).eval()
    with torch.no_grad():
        quantized(_ids())  # bitsandbytes must really run here: an error fails the test
    assert isinstance(quantized.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
    return original, quantized


def test_4bit_base_shares_with_its_float_original(tmp_path):
    original, quantized = _float_and_4bit(tmp_path)
    assert fingerprints_match(model_fingerprint(quantized), model_fingerprint(original))
    torch.manual_seed(5)
    other = AutoModelForCausalLM.from_config(original.config)
    assert not fingerprints_match(model_fingerprint(quantized), model_fingerprint(other))


def test_adapter_trained_on_4bit_loads_and_merges_on_the_float_original(tmp_path):
    original, quantized = _float_and_4bit(tmp_path)
    config = SparseConfig(heads={0: [1]}, neurons={1: [3, 200]}, init_weights=False)
    get_peft_model(quantized, config).save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter")  # no ignore_fingerprint
    with torch.no_grad():
        adapted = loaded(_ids()).logits
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(_ids()).logits, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("saved_dtype", [torch.bfloat16, torch.float16])
def test_adapter_saved_on_half_precision_loads_on_float32(tmp_path, saved_dtype):
    model = make_tiny("qwen2")
    half = get_peft_model(copy.deepcopy(model).to(saved_dtype), SparseConfig(heads={1: [2]}, init_weights=False))
    half.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)  # no ignore_fingerprint
    assert loaded.peft_config["default"].base_model_fingerprint == half.peft_config["default"].base_model_fingerprint
    with pytest.raises(FingerprintMismatchError, match="ignore_fingerprint=True"):
        PeftModel.from_pretrained(make_tiny("qwen2", seed=1), tmp_path)
