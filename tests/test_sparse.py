"""Sparse "located components" adapter: identity init, exact counts, merge, save/load, validation, training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import mi_peft.tuners.sparse  # noqa: F401  (registers the "sparse" PEFT method)
from mi_peft.arch import spec_for
from mi_peft.components import ComponentSet
from mi_peft.fingerprint import FingerprintMismatchError
from mi_peft.tuners.sparse import SparseConfig, SparseLinear, save_adapter

ARCHS = ["llama", "gpt2", "gpt_neox", "phi3"]
MODES = [("out", "out"), ("qkvo", "in_out"), ("bias", "scale"), ("scale", "in_out")]
# layer 0 heads 0 and 1 share a key/value head in the tiny llama/phi3 (4 heads, 2 kv heads)
HEADS = {0: [0, 1], 1: [3]}
NEURONS = {1: [2, 5, 40]}
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(seed))


def _wrap(model, head_mode="out", neuron_mode="out", init_weights=True, **kwargs):
    config = SparseConfig(
        heads=HEADS, neurons=NEURONS, head_mode=head_mode, neuron_mode=neuron_mode, init_weights=init_weights, **kwargs
    )
    return get_peft_model(copy.deepcopy(model), config)


def _expected_changes(model, config: SparseConfig) -> dict[str, torch.Tensor]:
    """Boolean masks over each base weight [out, in] (and bias) of the entries the adapter may change."""
    spec = spec_for(model)
    masks = {}
    for name, slices in config.module_slices(spec).items():
        module = model.get_submodule(name)
        d_in, d_out = module.weight.shape if spec.conv1d else module.weight.shape[::-1]
        mask = torch.zeros(d_out, d_in, dtype=torch.bool)
        if slices.col_mode in ("delta", "scale"):
            mask[:, list(slices.cols)] = True
        mask[list(slices.rows), :] = True
        masks[f"{name}.weight"] = mask.T if spec.conv1d else mask
        if slices.col_mode == "bias":
            masks[f"{name}.bias"] = torch.ones(d_out, dtype=torch.bool)
    return masks


def _assert_only_slices_changed(base, merged, config: SparseConfig) -> None:
    masks = _expected_changes(base, config)
    before, after = base.state_dict(), merged.state_dict()
    for key, value in after.items():
        old = before.get(key)
        if old is None:  # a bias created by merging bias mode, or a zero one the config flag also turns on
            assert torch.any(value != 0) if key in masks else key.endswith(".bias") and not torch.any(value != 0), key
            continue
        changed = value != old
        expected = masks.get(key, torch.zeros_like(changed))
        assert torch.equal(changed, expected), f"{key}: changed {int(changed.sum())}, expected {int(expected.sum())}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_mode,neuron_mode", MODES)
def test_identity_init_and_exact_parameter_count(arch, head_mode, neuron_mode):
    model = make_tiny(arch)
    peft_model = _wrap(model, head_mode, neuron_mode)
    with torch.no_grad():
        assert torch.equal(peft_model(_ids()).logits, model(_ids()).logits)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    expected = ComponentSet(heads=HEADS, neurons=NEURONS).num_parameters(head_mode, neuron_mode, spec=spec_for(model))
    assert trainable == expected
    assert all("sparse_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head_mode,neuron_mode", MODES)
def test_merge_is_exact_and_touches_only_the_slices(arch, head_mode, neuron_mode):
    model = make_tiny(arch)
    peft_model = _wrap(model, head_mode, neuron_mode, init_weights=False)
    ids = _ids()
    if (arch, head_mode) == ("phi3", "bias"):  # Phi-3 has no config flag for an o_proj bias (test_merge_reload.py)
        with pytest.raises(ValueError, match="no config flag"):
            peft_model.merge_and_unload()
        return
    with torch.no_grad():
        adapted = peft_model(ids).logits
        assert (adapted - model(ids).logits).abs().max() > 1e-4  # the random deltas do something
        with peft_model.disable_adapter():
            assert torch.equal(peft_model(ids).logits, model(ids).logits)
        peft_model.merge_adapter()
        assert (peft_model(ids).logits - adapted).abs().max() <= 1e-5
        peft_model.unmerge_adapter()
        for key, value in peft_model.get_base_model().state_dict().items():
            if "sparse_" not in key:
                base_key = key.replace(".base_layer", "")
                assert (value - model.state_dict()[base_key]).abs().max() <= 1e-6, key
        assert torch.equal(peft_model(ids).logits, adapted) or (peft_model(ids).logits - adapted).abs().max() <= 1e-6
        merged = peft_model.merge_and_unload()
        assert (merged(ids).logits - adapted).abs().max() <= 1e-5
    assert not any(isinstance(m, SparseLinear) for m in merged.modules())
    _assert_only_slices_changed(model, merged, peft_model.peft_config["default"])


@pytest.mark.parametrize("head_mode,neuron_mode", MODES)
def test_merge_is_exact_in_float64(head_mode, neuron_mode):
    model = make_tiny("llama" if head_mode == "bias" else "phi3").double()  # Phi-3 refuses bias-mode merges
    peft_model = _wrap(model, head_mode, neuron_mode, init_weights=False)
    with torch.no_grad():
        adapted = peft_model(_ids()).logits
        assert (peft_model.merge_and_unload()(_ids()).logits - adapted).abs().max() <= 1e-12


def test_gqa_heads_of_one_group_share_kv_rows_once():
    model = make_tiny("llama")  # 4 heads, 2 kv heads, head_dim 8
    peft_model = get_peft_model(copy.deepcopy(model), SparseConfig(heads={0: [0, 1]}, head_mode="qkvo"))
    attn = peft_model.get_base_model().model.layers[0].self_attn
    assert attn.q_proj.sparse_row_delta["default"].shape == (16, 32)  # two query heads
    assert attn.k_proj.sparse_row_delta["default"].shape == (8, 32)  # their one kv head
    assert attn.v_proj.sparse_row_delta["default"].shape == (8, 32)
    assert attn.o_proj.sparse_delta["default"].shape == (32, 16)
    assert peft_model.get_nb_trainable_parameters()[0] == (16 + 8 + 8) * 32 + 32 * 16


def test_save_load_round_trip(tmp_path):
    model = make_tiny("llama")
    peft_model = _wrap(model, "qkvo", "in_out", init_weights=False)
    ids = _ids()
    adapted = peft_model(ids).logits.detach()
    peft_model.save_pretrained(tmp_path)
    # PEFT's standard model card README.md sits beside the two adapter files; nothing pickled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", *ADAPTER_FILES]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["heads"] == {"0": [0, 1], "1": [3]} and "ignore_fingerprint" not in saved
    assert saved["peft_type"] == "SPARSE" and saved["arch"]["model_type"] == "llama"
    n_saved = sum(t.numel() for t in load_file(tmp_path / "adapter_model.safetensors").values())
    assert n_saved == peft_model.get_nb_trainable_parameters()[0]

    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert loaded.peft_config["default"].heads == {0: [0, 1], 1: [3]}
    assert torch.equal(loaded(ids).logits, adapted)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == n_saved


def test_fingerprint_is_checked_on_load(tmp_path):
    model = make_tiny("llama")
    peft_model = _wrap(model)
    assert peft_model.peft_config["default"].base_model_fingerprint is not None
    peft_model.save_pretrained(tmp_path)
    other = make_tiny("llama", seed=7)
    with pytest.raises(FingerprintMismatchError, match="ignore_fingerprint=True"):
        PeftModel.from_pretrained(copy.deepcopy(other), tmp_path)
    PeftModel.from_pretrained(copy.deepcopy(other), tmp_path, ignore_fingerprint=True)
    config = SparseConfig.from_pretrained(str(tmp_path))
    config.ignore_fingerprint = True
    PeftModel.from_pretrained(copy.deepcopy(other), tmp_path, config=config)


def test_named_adapters_coexist_and_switch():
    model = make_tiny("llama")
    ids = _ids()
    first = _wrap(model, init_weights=False)
    out_a = first(ids).logits.detach()
    second_config = SparseConfig(neurons={0: [1, 2]}, neuron_mode="in_out", init_weights=False)
    first.add_adapter("b", second_config)
    assert torch.equal(first(ids).logits, out_a)  # adding does not activate
    first.set_adapter("b")
    out_b = first(ids).logits.detach()
    assert not torch.allclose(out_b, out_a)
    assert first.get_nb_trainable_parameters()[0] == 2 * 3 * 32
    first.set_adapter("default")
    assert torch.equal(first(ids).logits, out_a)
    with first.disable_adapter():
        assert torch.equal(first(ids).logits, model(ids).logits)
    first.delete_adapter("b")
    assert torch.equal(first(ids).logits, out_a)


def test_active_adapters_add_up_and_merge_together():
    model = make_tiny("llama")
    ids = _ids()
    peft_model = get_peft_model(
        copy.deepcopy(model), SparseConfig(heads={0: [0, 1]}, head_mode="bias", init_weights=False)
    )
    peft_model.add_adapter("scale", SparseConfig(heads={0: [1, 2]}, head_mode="scale", init_weights=False))
    peft_model.add_adapter("delta", SparseConfig(heads={0: [1]}, init_weights=False))
    with torch.no_grad():
        base = model(ids).logits
        alone = {}
        for name in ("default", "scale", "delta"):
            peft_model.base_model.set_adapter(name)
            alone[name] = peft_model(ids).logits
        peft_model.base_model.set_adapter(["default", "scale", "delta"])
        both = peft_model(ids).logits
        assert all(not torch.allclose(both, out) for out in alone.values())
        peft_model.merge_adapter()  # bias and scale read the base weights, the delta is merged last
        assert (peft_model(ids).logits - both).abs().max() <= 1e-5
        peft_model.unmerge_adapter()
        assert (peft_model(ids).logits - both).abs().max() <= 1e-6
        peft_model.base_model.set_adapter(["delta", "scale"])
        with pytest.raises(ValueError, match="defined on the base weights that 'delta' changes"):
            peft_model.merge_adapter()
    with peft_model.disable_adapter(), torch.no_grad():  # unmerge restored the base weights within rounding
        assert (peft_model(ids).logits - base).abs().max() <= 1e-6


def test_validation_errors():
    with pytest.raises(ValueError, match="selects nothing"):
        SparseConfig()
    with pytest.raises(ValueError, match="head_mode"):
        SparseConfig(heads={0: [0]}, head_mode="qk")
    with pytest.raises(ValueError, match="neuron_mode"):
        SparseConfig(neurons={0: [0]}, neuron_mode="in")
    with pytest.raises(ValueError, match="negative"):
        SparseConfig(heads={0: [-1]})
    assert SparseConfig(heads={"3": ["1", 0, 1]}).heads == {3: [0, 1]}  # JSON-style keys
    model = make_tiny("llama")
    for config, what in [
        (SparseConfig(heads={2: [0]}), "layer index 2 is out of range: this model has layers 0..1"),
        (SparseConfig(heads={0: [4]}), "head index 4 is out of range: this model has heads 0..3"),
        (SparseConfig(neurons={1: [48]}), "neuron index 48 is out of range: this model has neurons 0..47"),
    ]:
        with pytest.raises(ValueError, match=what):
            get_peft_model(copy.deepcopy(model), config)
    gpt2_config = _wrap(make_tiny("gpt2")).peft_config["default"]
    with pytest.raises(ValueError, match="another architecture"):
        get_peft_model(copy.deepcopy(model), SparseConfig(**{**gpt2_config.to_dict(), "base_model_fingerprint": None}))
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            word_embed_proj_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=32,
        )
    )
    with pytest.raises(ValueError, match="Unsupported architecture 'opt'"):
        get_peft_model(opt, SparseConfig(heads={0: [0]}))


class _FakeResult:
    """Duck-typed LocalizationResult: `select` returns a ComponentSet carrying the architecture."""

    model_fingerprint = "abc123"

    def __init__(self, spec):
        self.spec = spec
        self.calls = []

    def select(self, top_k=None, param_budget=None, head_mode="out", neuron_mode="out", kinds=("heads",)):
        self.calls.append(dict(top_k=top_k, param_budget=param_budget, head_mode=head_mode, kinds=kinds))
        return ComponentSet(heads={1: [2, 0]}, neurons={}, spec=self.spec)


def test_from_localization_and_components():
    model = make_tiny("llama")
    result = _FakeResult(spec_for(model))
    config = SparseConfig.from_localization(result, top_k=2, head_mode="scale", kinds=("heads",))
    assert result.calls == [dict(top_k=2, param_budget=None, head_mode="scale", kinds=("heads",))]
    assert config.heads == {1: [0, 2]} and config.head_mode == "scale"
    assert config.base_model_fingerprint == "abc123" and config.arch["n_heads"] == 4
    with pytest.raises(FingerprintMismatchError):
        get_peft_model(copy.deepcopy(model), config)
    from mi_peft.components import Head, Neuron

    config = SparseConfig.from_components([Head(1, 3), Neuron(0, 7)], neuron_mode="in_out")
    assert (config.heads, config.neurons) == ({1: [3]}, {0: [7]})
    with pytest.raises(ValueError, match="head index 9"):
        SparseConfig.from_components(ComponentSet(heads={0: [9]}, spec=spec_for(model)))


def test_from_a_real_localization_result():
    from mi_peft.locate.result import LocalizationResult

    model = make_tiny("llama")
    scores = {"heads": torch.arange(8.0).reshape(2, 4), "neurons": torch.linspace(0, 1, 96).reshape(2, 48)}
    result = LocalizationResult.from_model(model, scores, method="test")
    config = SparseConfig.from_localization(result, param_budget=1200, head_mode="qkvo", neuron_mode="in_out")
    peft_model = get_peft_model(copy.deepcopy(model), config)  # same base model: the fingerprint matches
    trainable = peft_model.get_nb_trainable_parameters()[0]
    assert trainable == config.num_parameters(spec_for(model)) <= 1200
    config = SparseConfig.from_localization(result, top_k=3, mode="scale")
    assert (config.head_mode, config.neuron_mode) == ("scale", "scale")


def test_save_adapter_is_all_or_nothing(tmp_path):
    class Broken:
        def save_pretrained(self, path):
            (tmp_path / "partial").write_text("x")
            open(f"{path}/adapter_config.json", "w").close()
            raise OSError("disk full")

    target = tmp_path / "adapter"
    with pytest.raises(OSError, match="disk full"):
        save_adapter(Broken(), target)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["partial"]
    peft_model = _wrap(make_tiny("llama"))
    assert save_adapter(peft_model, target) == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == ["README.md", *ADAPTER_FILES]


def _char_tokenizer():
    """A tiny character-level tokenizer with a chat template (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz :.\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def test_trl_sft_trains_only_the_selected_slices(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = make_tiny("llama")
    config = SparseConfig(heads={0: [1]}, neurons={1: [3, 7]}, head_mode="qkvo", neuron_mode="in_out")
    rows = [{"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]}] * 8
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=32,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=_char_tokenizer(),
        peft_config=config,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    merged = trainer.model.merge_and_unload()
    _assert_only_slices_changed(model, merged, config)


@pytest.mark.slow
def test_embedded_model(embedded, tmp_path):
    model, tokenizer = embedded
    base = copy.deepcopy(model)
    batch = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = base(**batch).logits
    config = SparseConfig(heads={5: [1, 4], 20: [7]}, neurons={15: list(range(0, 400, 20))})
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, base_logits)
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == config.num_parameters(spec_for(model)) == 3 * 576 * 64 + 20 * 576
    assert 0.01 < 100 * trainable / total < 0.13
    peft_model.print_trainable_parameters()

    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
        adapted = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    print(f"adapter_model.safetensors: {size} bytes, {size / trainable:.3f} bytes per trainable parameter")
    assert 4.0 <= size / trainable < 4.1

    loaded = PeftModel.from_pretrained(peft_model.unload(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, adapted)
        merged = loaded.merge_and_unload()
        diff = (merged(**batch).logits - adapted).abs().max().item()
    print(f"merge_and_unload max abs logit diff: {diff:.3g}")
    # float32 rounding over 30 layers (logits up to ~28): the same prompt in a batch of 1 vs 2 already
    # differs by ~3e-5 on this model; test_merge_is_exact_in_float64 shows the merge itself is exact
    assert diff <= 1e-4
