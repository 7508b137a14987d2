import dataclasses

import pytest
import torch
from conftest import TINY_CONFIGS, make_tiny

from mi_peft import arch
from mi_peft.arch import ArchSpec, spec_for


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_spec_matches_modules(model_type):
    model = make_tiny(model_type)
    spec = spec_for(model)
    assert spec.n_layers == 2 and spec.n_heads == 4
    out = spec.attn_out_module(model, 0)
    mlp = spec.mlp_out_module(model, 1)
    in_dim = out.weight.shape[0] if spec.conv1d else out.weight.shape[1]
    assert in_dim == spec.n_heads * spec.head_dim
    mlp_in = mlp.weight.shape[0] if spec.conv1d else mlp.weight.shape[1]
    assert mlp_in == spec.n_neurons
    # q/k/v rows of the last head land inside the projection(s)
    for path, rows in spec.head_qkv_rows(spec.n_heads - 1).items():
        mod = spec.layer_module(model, 0, path)
        n_out = mod.weight.shape[1] if spec.conv1d else mod.weight.shape[0]
        assert int(rows.max()) < n_out and rows.numel() > 0
    for path, rows in spec.neuron_in_rows(spec.n_neurons - 1).items():
        mod = spec.layer_module(model, 0, path)
        n_out = mod.weight.shape[1] if spec.conv1d else mod.weight.shape[0]
        assert int(rows.max()) < n_out
    norm = spec.final_norm_module(model)
    assert isinstance(norm, torch.nn.Module) and norm.weight.shape == (spec.d_model,)
    assert any(norm is module for module in model.modules())
    assert spec.unembed_module(model).weight.shape[0] == model.config.vocab_size


def test_gqa_rows_shared_within_group():
    spec = spec_for(make_tiny("llama"))
    assert spec.n_kv_heads == 2 and spec.group_size == 2
    a, b, c = (spec.head_qkv_rows(h) for h in (0, 1, 2))
    assert torch.equal(a["self_attn.k_proj"], b["self_attn.k_proj"])
    assert not torch.equal(a["self_attn.k_proj"], c["self_attn.k_proj"])
    assert not torch.equal(a["self_attn.q_proj"], b["self_attn.q_proj"])


def test_unsupported_architecture_lists_types_and_register_hint():
    class Cfg:
        model_type = "mystery"

    with pytest.raises(ValueError, match="Unsupported architecture 'mystery'") as err:
        spec_for(Cfg())
    assert "llama" in str(err.value) and "arch.register" in str(err.value)


def test_missing_module_path_raises_instead_of_returning_none():
    model = make_tiny("llama")
    broken = dataclasses.replace(spec_for(model), final_norm="model.no_such_norm")
    with pytest.raises(ValueError, match=r"module path 'model.no_such_norm' not found.*failed at 'no_such_norm'"):
        broken.final_norm_module(model)


@pytest.fixture
def isolated_registry(monkeypatch):
    """A private copy of the registry, so registrations made by a test never outlive it."""
    monkeypatch.setattr(arch, "_REGISTRY", dict(arch._REGISTRY))
    return arch._REGISTRY


def _register_custom_spec_and_check():
    spec = ArchSpec(model_type="test_custom_llama", **arch.llama_like_paths())
    assert "test_custom_llama" not in arch.supported_model_types()
    arch.register(spec)
    with pytest.raises(ValueError, match="already registered"):
        arch.register(spec)
    assert "test_custom_llama" in arch.supported_model_types()
    model = make_tiny("llama")
    model.config.model_type = "test_custom_llama"
    assert spec_for(model).n_heads == 4


def test_register_custom_spec(isolated_registry):
    _register_custom_spec_and_check()


def test_register_custom_spec_leaves_no_trace_between_runs(monkeypatch):
    before = arch.supported_model_types()
    for _ in range(2):
        with monkeypatch.context() as patch:
            patch.setattr(arch, "_REGISTRY", dict(arch._REGISTRY))
            _register_custom_spec_and_check()
    assert arch.supported_model_types() == before


@pytest.mark.parametrize(
    ("method", "value", "allowed"),
    [("check_layer", 2, "0..1"), ("check_head", 4, "0..3"), ("check_neuron", -1, "0..47")],
)
def test_out_of_range_index_names_allowed_range(method, value, allowed):
    spec = spec_for(make_tiny("llama"))
    with pytest.raises(ValueError, match=f"out of range.*{allowed}"):
        getattr(spec, method)(value)
