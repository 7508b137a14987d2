"""llama.cpp exports without llama.cpp: control-vector and LoRA GGUF layout, factors, refusals.

That llama.cpp itself applies both files like the adapters do (control-vector layer numbering, LoRA
scale and q/k row order) is checked by tests/test_llama_cpp.py on the embedded model.
"""

import copy
import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, make_tiny
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import mi_peft.tuners.sparse  # noqa: F401  (registers the "sparse" PEFT method)
import mi_peft.tuners.steering  # noqa: F401  (registers the "steering" PEFT method)
from mi_peft.arch import spec_for
from mi_peft.export import gguf as gguf_export
from mi_peft.export import to_lora
from mi_peft.export.gguf import from_gguf_control_vector, to_gguf_control_vector, to_gguf_lora
from mi_peft.tuners.sparse import SparseConfig
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
    with pytest.raises(ValueError, match="head/neuron-scale"):
        to_gguf_control_vector(tmp_path / "scales", tmp_path / "steer.gguf")
    # a residual `add` together with head steering: the head part must not be dropped silently
    spec_heads = {0: {1: torch.ones(8)}}  # tiny llama: head_dim 8
    config = SteeringConfig.from_directions({0: torch.ones(32)}, layers=[0], alpha=2.0)
    config.head_directions, config.head_stds = spec_heads, {0: {1: 0.5}}
    pm = get_peft_model(make_tiny("llama"), config)
    pm.save_pretrained(tmp_path / "with_heads")
    with pytest.raises(ValueError, match="steers attention heads"):
        to_gguf_control_vector(tmp_path / "with_heads", tmp_path / "steer.gguf")
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


# ---- llama.cpp LoRA GGUF ----------------------------------------------------------------------

HEADS, NEURONS = {0: [0, 1], 1: [3]}, {1: [2, 5, 40]}
GGUF_ARCH = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}


def sparse_model(model, head_mode="qkvo", neuron_mode="in_out"):
    config = SparseConfig(
        heads=HEADS, neurons=NEURONS, head_mode=head_mode, neuron_mode=neuron_mode, init_weights=False
    )
    return get_peft_model(copy.deepcopy(model), config)


def converter_rows(model_type, module, w, n_head, n_kv):
    """convert_hf_to_gguf.py's row reorder of a base weight, written the way that script writes it."""
    if model_type in ("llama", "mistral") and module.endswith(("q_proj", "k_proj")):
        n = n_kv if module.endswith("k_proj") and n_kv != n_head else n_head  # LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if model_type == "gpt_neox" and module.endswith("query_key_value"):
        d_in = w.shape[1]
        qkv = w.reshape((n_head, 3, w.shape[0] // 3 // n_head, d_in))
        return torch.cat([qkv[:, 0].reshape(-1, d_in), qkv[:, 1].reshape(-1, d_in), qkv[:, 2].reshape(-1, d_in)])
    return w


def gguf_deltas(path):
    """``{base tensor name: (alpha / r) * B @ A}``, the weight change llama.cpp applies from a LoRA GGUF."""
    reader = gguf.GGUFReader(str(path))
    alpha = float(field(reader, "adapter.lora.alpha"))
    data = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    names = sorted({name.rsplit(".", 1)[0] for name in data})
    return {n: (alpha / data[f"{n}.lora_a"].shape[0]) * data[f"{n}.lora_b"] @ data[f"{n}.lora_a"] for n in names}


def peft_deltas(model, lora):
    """``{module: delta [d_out, d_in]}`` of a PEFT LoRA model (folder or in memory), from PEFT's ``get_delta_weight``."""
    if not isinstance(lora, PeftModel):
        lora = PeftModel.from_pretrained(copy.deepcopy(model), lora)
    conv1d = spec_for(model).conv1d
    return {
        name.removeprefix("base_model.model."): m.get_delta_weight("default").T
        if conv1d
        else m.get_delta_weight("default")
        for name, m in lora.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }


def assert_llama_cpp_deltas(model, expected, gguf_file, arch):
    """Each module's delta sits under gguf-py's own name for that weight, rows ordered like the converted weight."""
    spec, actual = spec_for(model), gguf_deltas(gguf_file)
    names = gguf.get_tensor_name_map(GGUF_ARCH[{"gpt_neox": "gptneox"}.get(arch, arch)], spec.n_layers)
    assert len(actual) == len(expected)
    for module, delta in expected.items():
        rows = converter_rows(arch, module, delta.float(), spec.n_heads, spec.n_kv_heads)
        torch.testing.assert_close(actual[names.get_name(module) + ".weight"], rows, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox", "phi3", "gpt2"])
def test_lora_gguf_holds_the_sparse_deltas_in_llama_cpp_layout(arch, tmp_path):
    model = make_tiny(arch)
    sparse_model(model).save_pretrained(tmp_path / "sparse")
    out = to_gguf_lora(tmp_path / "sparse", tmp_path / "lora.gguf")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["lora.gguf"]
    reader = gguf.GGUFReader(str(out))
    assert field(reader, "general.architecture") == {"gpt_neox": "gptneox"}.get(arch, arch)
    assert (field(reader, "general.type"), field(reader, "adapter.type")) == ("adapter", "lora")
    to_lora(tmp_path / "sparse", tmp_path / "lora")
    ranks = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["rank_pattern"]
    assert field(reader, "adapter.lora.alpha") == max(ranks.values()) and len(set(ranks.values())) > 1
    assert_llama_cpp_deltas(model, peft_deltas(model, tmp_path / "lora"), out, arch)


def test_folder_lora_folder_and_peft_model_give_the_same_file(tmp_path):
    model = make_tiny("llama")
    sparse = sparse_model(model, head_mode="scale", neuron_mode="in_out")
    sparse.save_pretrained(tmp_path / "sparse")
    to_lora(tmp_path / "sparse", tmp_path / "lora", base_model=model)
    files = [
        to_gguf_lora(tmp_path / "sparse", tmp_path / "a.gguf", base_model=model),
        to_gguf_lora(tmp_path / "lora", tmp_path / "b.gguf", base_model=model),
        to_gguf_lora(sparse, tmp_path / "c.gguf"),
    ]
    deltas = [gguf_deltas(f) for f in files]
    for other in deltas[1:]:
        assert other.keys() == deltas[0].keys()
        for name, delta in deltas[0].items():
            torch.testing.assert_close(other[name], delta, atol=1e-6, rtol=1e-5)


def test_peft_lora_scales_are_folded_into_b(tmp_path):
    """llama.cpp has one alpha; per-module alpha_pattern, rank_pattern and rsLoRA scales must survive."""
    model = make_tiny("llama")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "o_proj", "down_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
        init_lora_weights=False,
    )
    lora = get_peft_model(copy.deepcopy(model), config)
    lora.save_pretrained(tmp_path / "lora")
    out = to_gguf_lora(tmp_path / "lora", tmp_path / "lora.gguf", base_model=model)
    assert_llama_cpp_deltas(model, peft_deltas(model, lora), out, "llama")
    assert_llama_cpp_deltas(model, peft_deltas(model, lora), to_gguf_lora(lora, tmp_path / "mem.gguf"), "llama")
    wider = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**TINY, "hidden_size": 64}))
    with pytest.raises(
        ValueError,
        match=r"down_proj: the LoRA factors give a \[32, 48\] delta, but llama layer 0 of 2 has a \[64, 48\] weight",
    ):
        to_gguf_lora(tmp_path / "lora", tmp_path / "wider.gguf", base_model=wider)


def _peft_lora(tmp_path, model, save_embedding_layers=False, **lora_kwargs):
    config = LoraConfig(**{"r": 2, "target_modules": ["q_proj"], "init_lora_weights": False, **lora_kwargs})
    lora = get_peft_model(copy.deepcopy(model), config)
    lora.save_pretrained(tmp_path / "other", save_embedding_layers=save_embedding_layers)
    return tmp_path / "other"


@pytest.mark.parametrize(
    ("make_source", "kwargs", "error", "message"),
    [
        (
            lambda t, m: sparse_model(m, "bias").save_pretrained(t / "a") or t / "a",
            "base",
            ValueError,
            "head_mode='bias'",
        ),
        (lambda t, m: save_adapter(m, t / "a", layers=[1]) and t / "a", {}, ValueError, "to_gguf_control_vector"),
        (lambda t, m: t / "missing", {}, ValueError, "not a saved adapter"),
        (
            lambda t, m: sparse_model(m, "scale").save_pretrained(t / "a") or t / "a",
            {},
            ValueError,
            "pass `base_model=`",
        ),
        (lambda t, m: _peft_lora(t, m), {}, ValueError, "records no architecture: pass `base_model=`"),
        (lambda t, m: _peft_lora(t, m, use_dora=True), "base", ValueError, "use_dora"),
        (lambda t, m: _peft_lora(t, m, target_modules=["lm_head"]), "base", ValueError, "decoder-layer projection"),
        (lambda t, m: _peft_lora(t, m, True, target_modules=["lm_head"]), "base", ValueError, "cannot carry it"),
        (lambda t, m: sparse_model(m), "base", ValueError, "only for adapter folders"),
        (lambda t, m: 42, {}, TypeError, "adapter folder or a PeftModel"),
    ],
    ids=[
        "bias-mode",
        "steering",
        "missing",
        "scale-no-base",
        "lora-no-base",
        "dora",
        "lm_head",
        "lm_head-saved",
        "peft+base",
        "int",
    ],
)
def test_to_gguf_lora_refuses_what_llama_cpp_lora_cannot_hold(make_source, kwargs, error, message, tmp_path):
    model = make_tiny("llama")
    source = make_source(tmp_path, model)
    with pytest.raises(error, match=message):
        to_gguf_lora(source, tmp_path / "lora.gguf", **({"base_model": model} if kwargs == "base" else kwargs))
    assert not (tmp_path / "lora.gguf").exists()


def test_to_gguf_lora_refuses_unknown_layouts_and_folders_as_files(tmp_path, monkeypatch):
    model = make_tiny("llama")
    sparse_model(model).save_pretrained(tmp_path / "sparse")
    with pytest.raises(ValueError, match="is a folder; pass a file path"):
        to_gguf_lora(tmp_path / "sparse", tmp_path)
    monkeypatch.setattr(gguf_export, "LORA_MODEL_TYPES", ("gpt2",))
    with pytest.raises(ValueError, match="no llama.cpp tensor layout is known for model_type 'llama'"):
        to_gguf_lora(tmp_path / "sparse", tmp_path / "lora.gguf")


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model = make_tiny("llama")
    sparse_model(model).save_pretrained(tmp_path / "sparse")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "lora.gguf").write_text("previous")
    monkeypatch.setattr(
        gguf.GGUFWriter, "write_tensors_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        to_gguf_lora(tmp_path / "sparse", tmp_path / "out" / "lora.gguf")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lora.gguf"]
    assert (tmp_path / "out" / "lora.gguf").read_text() == "previous"
