import pytest
from conftest import make_tiny

from mi_peft.arch import spec_for
from mi_peft.components import ComponentSet, Head, Neuron, head_parameters, neuron_parameters


def test_counts_per_mode():
    spec = spec_for(make_tiny("llama"))  # d_model 32, head_dim 8, 4 heads / 2 kv heads, 48 neurons
    cs = ComponentSet(heads={0: [0, 1, 2]}, neurons={1: [5, 5, 7]}, spec=spec)
    assert cs.n_heads == 3 and cs.n_neurons == 2
    assert cs.num_parameters("out", "out") == 3 * 32 * 8 + 2 * 32
    assert cs.num_parameters("scale", "scale") == 5
    assert cs.num_parameters("bias", "in_out") == 3 * 8 + 2 * 3 * 32
    # qkvo: heads 0,1 share kv head 0; head 2 reads kv head 1 -> 2 kv heads counted once each
    assert cs.num_parameters("qkvo", "out") == 3 * 2 * 32 * 8 + 2 * 2 * 32 * 8 + 2 * 32
    assert head_parameters(spec, "qkvo") == 4 * 32 * 8 and neuron_parameters(spec, "in_out") == 96


def test_iteration_and_round_trip():
    cs = ComponentSet.from_components([Head(1, 2), Neuron(0, 3), Head(1, 0)])
    assert list(cs) == [Head(1, 0), Head(1, 2), Neuron(0, 3)]
    assert ComponentSet.from_dict(cs.to_dict()) == cs


def test_errors():
    spec = spec_for(make_tiny("gpt2"))
    with pytest.raises(ValueError, match="no architecture attached"):
        ComponentSet(heads={0: [0]}).num_parameters()
    with pytest.raises(ValueError, match=r"head index 4 is out of range.*0\.\.3"):
        ComponentSet(heads={0: [4]}).num_parameters(spec=spec)
    with pytest.raises(ValueError, match="head_mode"):
        ComponentSet(heads={0: [1]}, spec=spec).num_parameters(head_mode="rows")
