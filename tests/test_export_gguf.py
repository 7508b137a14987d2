"""llama.cpp control-vector export: round trip through the gguf reader, layer numbering, refusals."""

import copy

import gguf
import pytest
import torch
from conftest import make_tiny
from peft import get_peft_model

import mi_peft.tuners.steering  # noqa: F401  (registers the "steering" PEFT method)
from mi_peft import capture
from mi_peft.export.gguf import from_gguf_control_vector, to_gguf_control_vector
from mi_peft.tuners.steering import SteeringCondition, SteeringConfig


def save_adapter(model, folder, directions=None, **kwargs):
    directions = {1: torch.arange(32, dtype=torch.float32) - 10.0} if directions is None else directions
    pm = get_peft_model(copy.deepcopy(model), SteeringConfig.from_directions(directions, **kwargs))
    pm.save_pretrained(folder)
    return pm


def field(reader, key):
    return reader.get_field(key).contents()


@pytest.mark.parametrize(("arch", "hint"), [("llama", "llama"), ("gpt_neox", "gptneox"), ("qwen2", "qwen2")])
def test_round_trip_through_gguf_reader(arch, hint, tmp_path):
    model = make_tiny(arch)
    direction = torch.arange(32, dtype=torch.float32) - 10.0
    save_adapter(model, tmp_path / "adapter", {1: direction}, layers=[1], alpha=2.5)
    out = to_gguf_control_vector(tmp_path / "adapter", tmp_path / "cv" / "steer.gguf")
    assert out == tmp_path / "cv" / "steer.gguf" and [p.name for p in out.parent.iterdir()] == ["steer.gguf"]
    reader = gguf.GGUFReader(str(out))
    assert field(reader, "general.architecture") == "controlvector"
    assert field(reader, "controlvector.model_hint") == hint
    assert field(reader, "controlvector.layer_count") == 1
    assert [t.name for t in reader.tensors] == ["direction.1"]
    expected = 2.5 * direction / direction.norm()
    torch.testing.assert_close(torch.from_numpy(reader.tensors[0].data.copy()), expected)
    vectors = from_gguf_control_vector(out)
    assert list(vectors) == [1]
    torch.testing.assert_close(vectors[1], expected)


def test_direction_n_is_added_to_the_output_of_layer_n(tmp_path):
    """llama.cpp adds direction.N after decoder layer N; the adapter's add at layer N is the same edit."""
    model = make_tiny("llama")
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    pm = save_adapter(model, tmp_path / "adapter", layers=[1], alpha=4.0)
    vectors = from_gguf_control_vector(to_gguf_control_vector(tmp_path / "adapter", tmp_path / "steer.gguf"))
    with torch.no_grad(), capture.edit(model, residual={n: (lambda x, v=v: x + v) for n, v in vectors.items()}):
        manual = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, manual, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layers=[1], op="ablate"), "`op='ablate'` steering adapter cannot be exported"),
        (dict(layers=[1], op="clamp", value=1.0), "`op='clamp'` steering adapter cannot be exported"),
        (dict(layers=[1], positions="generated"), "every token"),
        (dict(layers=[1], head_scales={1: {0: 0.0}}), "scales heads/neurons"),
        (dict(layers=[0, 1]), "layer 0"),
        (
            dict(layers=[1], condition=SteeringCondition(direction=torch.ones(32), layer=0, threshold=0.0)),
            "every token",
        ),
    ],
)
def test_adapters_a_control_vector_cannot_express_are_refused(kwargs, message, tmp_path):
    directions = {0: torch.ones(32), 1: torch.arange(32, dtype=torch.float32)}
    save_adapter(make_tiny("llama"), tmp_path / "adapter", directions, **kwargs)
    with pytest.raises(ValueError, match=message):
        to_gguf_control_vector(tmp_path / "adapter", tmp_path / "steer.gguf")
    assert not (tmp_path / "steer.gguf").exists()


def test_scale_only_adapter_and_bad_paths_are_refused(tmp_path):
    pm = get_peft_model(make_tiny("llama"), SteeringConfig(neuron_scales={1: {3: 0.0}}))
    pm.save_pretrained(tmp_path / "scales")
    with pytest.raises(ValueError, match="scale-only"):
        to_gguf_control_vector(tmp_path / "scales", tmp_path / "steer.gguf")
    with pytest.raises(ValueError, match="not a saved steering adapter"):
        to_gguf_control_vector(tmp_path / "missing", tmp_path / "steer.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a control vector"):
        from_gguf_control_vector(tmp_path / "model.gguf")
