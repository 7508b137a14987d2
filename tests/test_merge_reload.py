"""Merged adapters survive save_pretrained + from_pretrained exactly, and merges are all or nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import mi_peft.tuners.steering.layer as steering_layer
from mi_peft.arch import spec_for
from mi_peft.tuners.sparse import SparseConfig
from mi_peft.tuners.sparse.layer import SparseLayer
from mi_peft.tuners.steering import SteeringConfig

ARCHS = sorted(TINY_CONFIGS)
SPARSE_MODES = [
    ("heads", "out"),
    ("heads", "qkvo"),
    ("heads", "bias"),
    ("heads", "scale"),
    ("neurons", "out"),
    ("neurons", "in_out"),
    ("neurons", "scale"),
]
# bias mode needs a bias on the attention output projection; these families have none and no
# config flag that would make transformers build one (Qwen2: q/k/v always biased, o never)
SPARSE_REFUSED = {("bias", "mistral"), ("bias", "qwen2"), ("bias", "phi3")}
STEERING_OPS = ["add", "ablate", "scales"]
# `add` merges into the MLP output bias: only GPT-2 and GPT-NeoX have one; ablation has no exact
# weight form where a norm follows each sublayer output
STEERING_MERGES = {
    "add": {"gpt2", "gpt_neox"},
    "ablate": set(ARCHS) - {"gemma2", "gemma3_text", "olmo2"},
    "scales": set(ARCHS),
}
REFUSAL = {"add": "to_gguf_control_vector", "ablate": "cannot merge exactly into"}


def _ids() -> torch.Tensor:
    return torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained_sparse(arch: str, kind: str, mode: str):
    """A sparse adapter whose every slice parameter holds a clearly nonzero value."""
    model = make_tiny(arch)
    selection = {"heads": {0: [0, 2], 1: [3]}} if kind == "heads" else {"neurons": {0: [1, 7], 1: [4, 30]}}
    modes = {"head_mode": mode} if kind == "heads" else {"neuron_mode": mode}
    peft_model = get_peft_model(copy.deepcopy(model), SparseConfig(**selection, **modes, init_weights=False))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    return model, peft_model


def _steered(arch: str, op: str):
    model = make_tiny(arch)
    spec = spec_for(model)
    gen = torch.Generator().manual_seed(0)
    dirs = {layer: torch.randn(spec.d_model, generator=gen) for layer in range(spec.n_layers)}
    if op == "scales":
        config = SteeringConfig(head_scales={0: {1: 0.0, 3: 2.5}}, neuron_scales={1: {2: 0.0, 7: 3.0}})
    elif op == "add":
        config = SteeringConfig.from_directions(dirs, layers=[0, 1], alpha=3.0)
    else:
        config = SteeringConfig.from_directions(dirs, layers=[1], op="ablate")
    return model, get_peft_model(copy.deepcopy(model), config)


def _weights(model) -> dict[str, torch.Tensor]:
    """Every parameter, keyed as in the unwrapped base model (PEFT's ``.base_layer`` removed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        name.replace(".base_layer", ""): param.detach().clone()
        for name, param in base.named_parameters()
        if "sparse_" not in name
    }


def _assert_bit_identical(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert sorted(after) == sorted(before), "merging added or removed parameters"
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


def _assert_reloads_exactly(merged, expected: torch.Tensor, tmp_path) -> None:
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert set(reloaded.state_dict()) == set(merged.state_dict()), "the reloaded model lost or gained tensors"
    torch.testing.assert_close(_logits(reloaded, _ids()), expected, atol=1e-5, rtol=0)


# ---- merged -> save_pretrained -> from_pretrained -------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind,mode", SPARSE_MODES)
def test_sparse_merge_reloads_exactly_or_refuses(arch, kind, mode, tmp_path):
    model, peft_model = _trained_sparse(arch, kind, mode)
    ids = _ids()
    adapted = _logits(peft_model, ids)
    assert (adapted - _logits(model, ids)).abs().max() > 1e-4  # the adapter does something
    if (mode, arch) in SPARSE_REFUSED:
        before = _weights(peft_model)
        with pytest.raises(ValueError, match="no config flag .* Keep the adapter unmerged, or export it to LoRA"):
            peft_model.merge_and_unload()
        _assert_bit_identical(before, _weights(peft_model))
        assert torch.equal(_logits(peft_model, ids), adapted)
        return
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), adapted, atol=1e-5, rtol=0)
    _assert_reloads_exactly(merged, adapted, tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", STEERING_OPS)
def test_steering_merge_reloads_exactly_or_refuses(arch, op, tmp_path):
    model, peft_model = _steered(arch, op)
    ids = _ids()
    steered = _logits(peft_model, ids)
    assert (steered - _logits(model, ids)).abs().max() > 1e-3
    if arch not in STEERING_MERGES[op]:
        before = _weights(peft_model)
        with pytest.raises(ValueError, match=REFUSAL[op]):
            peft_model.merge_and_unload()
        _assert_bit_identical(before, _weights(peft_model))
        assert torch.equal(_logits(peft_model, ids), steered)
        return
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), steered, atol=1e-5, rtol=0)
    _assert_reloads_exactly(merged, steered, tmp_path)


def test_bias_mode_sets_the_config_flag_and_zero_biases_on_siblings():
    model, peft_model = _trained_sparse("llama", "heads", "bias")
    merged = peft_model.merge_and_unload()
    assert merged.config.attention_bias is True and not merged.config.mlp_bias
    for layer in merged.model.layers:
        attn = layer.self_attn
        assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        assert attn.o_proj.bias.abs().max() > 0
        assert layer.mlp.down_proj.bias is None


def test_unmerge_removes_the_added_biases_and_flag():
    model, peft_model = _trained_sparse("gemma", "heads", "bias")
    ids = _ids()
    adapted = _logits(peft_model, ids)
    peft_model.base_model.merge_adapter()
    assert peft_model.get_base_model().config.attention_bias is True
    torch.testing.assert_close(_logits(peft_model, ids), adapted, atol=1e-5, rtol=0)
    peft_model.base_model.unmerge_adapter()
    assert peft_model.get_base_model().config.attention_bias is False
    assert sorted(_weights(peft_model)) == sorted(_weights(model))
    torch.testing.assert_close(_logits(peft_model, ids), adapted, atol=1e-6, rtol=0)


# ---- all or nothing ---------------------------------------------------------------------------


def _fail_on_second_call(real):
    """``real`` that raises on its second call (the first call's caller has already merged)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected merge failure")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("unload", [False, True])
def test_steering_merge_failing_halfway_changes_nothing(monkeypatch, unload):
    """Layer 0 merges; layer 1 computes o_proj's new weight, then computing down_proj's raises."""
    model = make_tiny("llama")
    config = SteeringConfig(head_scales={0: {1: 0.0}, 1: {1: 2.0}}, neuron_scales={1: {2: 3.0}})
    peft_model = get_peft_model(copy.deepcopy(model), config)
    ids = _ids()
    steered = _logits(peft_model, ids)
    before = _weights(peft_model)
    real = steering_layer._scale_weight
    made = []

    def scale_weight(*args, **kwargs):
        made.append(real(*args, **kwargs))
        if len(made) < 3:  # layer 0 o_proj, layer 1 o_proj
            return made[-1]

        def broken(weight, bias):
            raise RuntimeError("injected merge failure")

        return broken

    monkeypatch.setattr(steering_layer, "_scale_weight", scale_weight)
    with pytest.raises(RuntimeError, match="injected merge failure"):
        peft_model.merge_and_unload() if unload else peft_model.base_model.merge_adapter()
    assert len(made) == 3
    _assert_bit_identical(before, _weights(peft_model))
    assert not any(m.merged_adapters for m in peft_model.modules() if hasattr(m, "steer_plan"))
    assert torch.equal(_logits(peft_model, ids), steered)
    monkeypatch.setattr(steering_layer, "_scale_weight", real)
    torch.testing.assert_close(_logits(peft_model.merge_and_unload(), ids), steered, atol=1e-5, rtol=0)


def test_steering_nan_under_safe_merge_changes_nothing():
    model = make_tiny("gpt2")
    spec = spec_for(model)
    dirs = {layer: torch.randn(spec.d_model, generator=torch.Generator().manual_seed(layer)) for layer in range(2)}
    peft_model = get_peft_model(copy.deepcopy(model), SteeringConfig.from_directions(dirs, layers=[0, 1], alpha=2.0))
    peft_model.add_adapter("scales", SteeringConfig(neuron_scales={1: {2: 3.0}}))
    peft_model.base_model.set_adapter(["default", "scales"])
    ids = _ids()
    steered = _logits(peft_model, ids)
    before = _weights(peft_model)
    layer1 = peft_model.get_base_model().transformer.h[1]
    layer1.steer_neuron_scale["scales"][5] = float("nan")  # layer 0 merges first, layer 1 then fails
    with pytest.raises(ValueError, match="NaNs detected"):
        peft_model.merge_and_unload(safe_merge=True)
    _assert_bit_identical(before, _weights(peft_model))
    layer1.steer_neuron_scale["scales"][5] = 1.0
    assert torch.equal(_logits(peft_model, ids), steered)


@pytest.mark.parametrize("unload", [False, True])
def test_sparse_merge_failing_in_a_later_layer_changes_nothing(monkeypatch, unload):
    """The second sparse layer to merge raises while computing its increments; the first is rolled back."""
    model, peft_model = _trained_sparse("llama", "heads", "bias")
    ids = _ids()
    adapted = _logits(peft_model, ids)
    before = _weights(peft_model)
    monkeypatch.setattr(SparseLayer, "_increments", _fail_on_second_call(SparseLayer._increments))
    with pytest.raises(RuntimeError, match="injected merge failure"):
        peft_model.merge_and_unload() if unload else peft_model.base_model.merge_adapter()
    _assert_bit_identical(before, _weights(peft_model))
    assert peft_model.get_base_model().config.attention_bias is False
    assert not any(m.merged_adapters for m in peft_model.modules() if isinstance(m, SparseLayer))
    assert torch.equal(_logits(peft_model, ids), adapted)


def test_sparse_nan_under_safe_merge_changes_nothing():
    model, peft_model = _trained_sparse("gpt_neox", "neurons", "in_out")
    ids = _ids()
    adapted = _logits(peft_model, ids)
    before = _weights(peft_model)
    down = peft_model.get_base_model().gpt_neox.layers[1].mlp.dense_4h_to_h
    saved = down.sparse_delta["default"].detach().clone()
    with torch.no_grad():
        down.sparse_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        peft_model.merge_and_unload(safe_merge=True)
    _assert_bit_identical(before, _weights(peft_model))
    with torch.no_grad():
        down.sparse_delta["default"].copy_(saved)
    assert torch.equal(_logits(peft_model, ids), adapted)
